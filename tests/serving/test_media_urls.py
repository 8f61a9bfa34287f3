"""http(s) media URLs (qwen_vl_triton/serving/media_fetch.py): the address classification, the
--allowed_media_domains settings, the fetcher against a local HTTP(S) server (with a stub resolver
where a host name must resolve to a chosen address), and one live server fetching from it.

The local site listens on 127.0.0.1 only and serves a PNG, a video, and the faults: a body that
trickles past the fetch timeout, bodies over the byte limit (with and without Content-Length),
redirects away, in a loop and to file://, HTML, a 404 and a gzip-encoded body. It counts the hits on
each path, so a test can tell a refused URL was never contacted.
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import io
import ipaddress
import socket
import ssl
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from qwen_vl_triton.modeling.processing import MediaKind
from qwen_vl_triton.serving.config import add_serve_arguments, build_config, media_domains
from qwen_vl_triton.serving.media_fetch import FetchedRef, MediaFetcher, is_public_address, system_resolve
from qwen_vl_triton.serving.protocol import APIError, ChatMessage, MediaRef
from qwen_vl_triton.testing.media import synthetic_frame
from tests.serving.conftest import REQUEST_TIMEOUT_S, free_port, start_server, stop_server

FETCH_TIMEOUT = 3.0       # the live server's --image_fetch_timeout / --video_fetch_timeout
TRICKLE_S = 60.0          # how long /slow.png keeps sending (far past FETCH_TIMEOUT)
LIMITS = {MediaKind.IMAGE: 20 << 20, MediaKind.VIDEO: 512 << 20}


# ------------------------------------------------------------------------------------- the local site


@dataclass
class Site:
    """The local media site: its base URL, and what it saw."""

    url: str
    port: int
    hits: Counter = field(default_factory=Counter)
    hosts: list[str] = field(default_factory=list)   # each request's Host header
    slow_started: threading.Event = field(default_factory=threading.Event)


def png_bytes() -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(synthetic_frame(56, 84)).save(out, format="PNG")
    return out.getvalue()


def serve_site(video: bytes, tls: ssl.SSLContext | None = None) -> tuple[ThreadingHTTPServer, Site]:
    """Start the site on 127.0.0.1 in a thread (HTTPS with `tls`)."""
    png = png_bytes()
    port_box: list[int] = []
    site_box: list[Site] = []

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:  # quiet
            pass

        def send(self, status: int, body: bytes = b"", content_type: str = "image/png", **headers: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            for key, value in headers.items():
                self.send_header(key.replace("_", "-"), value)
            self.end_headers()
            self.wfile.write(body)

        def trickle(self, chunk: bytes, pause: float, total: float, **headers: str) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            for key, value in headers.items():
                self.send_header(key.replace("_", "-"), value)
            self.end_headers()
            end = time.monotonic() + total
            try:
                while time.monotonic() < end:
                    self.wfile.write(chunk)
                    self.wfile.flush()
                    time.sleep(pause)
            except (BrokenPipeError, ConnectionResetError):  # the fetcher gave up: what the test wants
                pass

        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            site = site_box[0]
            path = self.path.split("?")[0]
            site.hits[path] += 1
            site.hosts.append(self.headers.get("Host", ""))
            port = port_box[0]
            if path == "/image.png":
                self.send(200, png)
            elif path == "/octet":
                self.send(200, png, "application/octet-stream")
            elif path == "/clip.mp4":
                self.send(200, video, "video/mp4")
            elif path == "/page.html":
                self.send(200, b"<html><body>not a picture</body></html>", "text/html; charset=utf-8")
            elif path == "/gzip.png":
                self.send(200, gzip.compress(png), Content_Encoding="gzip")
            elif path == "/slow.png":
                site.slow_started.set()
                self.trickle(b"\x89", 0.1, TRICKLE_S, Content_Length=str(1 << 20))
            elif path == "/huge-declared.png":
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", str(21 << 20))
                self.end_headers()
            elif path == "/huge-streamed.png":  # no Content-Length: HTTP/1.0, the body ends when the connection does
                self.trickle(b"\0" * (256 << 10), 0.0, TRICKLE_S)
            elif path == "/redirect-here":
                self.send(302, content_type="text/plain", Location="/image.png")
            elif path == "/redirect-away":  # 127.0.0.2: loopback too, but not the listed 127.0.0.1
                self.send(302, content_type="text/plain", Location=f"http://127.0.0.2:{port}/image.png")
            elif path == "/redirect-loop":
                self.send(302, content_type="text/plain", Location="/redirect-loop")
            elif path == "/redirect-file":
                self.send(302, content_type="text/plain", Location="file:///etc/passwd")
            else:
                self.send(404, b"no such file", "text/plain")

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    if tls is not None:
        httpd.socket = tls.wrap_socket(httpd.socket, server_side=True)
    port = httpd.server_address[1]
    port_box.append(port)
    site_box.append(Site(f"{'https' if tls else 'http'}://127.0.0.1:{port}", port))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return httpd, site_box[0]


@pytest.fixture(scope="module")
def video(media_dir) -> bytes:
    return next(iter(sorted((media_dir / "videobench").rglob("*.mp4")))).read_bytes()


@pytest.fixture(scope="module")
def site(video) -> Iterator[Site]:
    httpd, info = serve_site(video)
    yield info
    httpd.shutdown()


# ------------------------------------------------------------------------------------- addresses


@pytest.mark.parametrize("text,public", [
    ("8.8.8.8", True), ("1.1.1.1", True), ("2606:4700:4700::1111", True), ("::ffff:8.8.8.8", True),
    ("64:ff9b::808:808", True), ("2002:808:808::1", True),
    ("127.0.0.1", False), ("127.0.0.2", False), ("10.1.2.3", False), ("172.16.0.1", False), ("192.168.1.1", False),
    ("169.254.169.254", False), ("100.64.0.1", False), ("0.0.0.0", False), ("255.255.255.255", False),
    ("224.0.0.1", False), ("240.0.0.1", False), ("192.0.2.1", False),
    ("::1", False), ("::", False), ("fe80::1", False), ("fc00::1", False), ("fec0::1", False), ("ff02::1", False),
    ("2001:db8::1", False), ("::ffff:127.0.0.1", False), ("::ffff:10.0.0.1", False), ("64:ff9b::7f00:1", False),
    ("2002:7f00:1::1", False), ("2002:a9fe:a9fe::1", False), ("::127.0.0.1", False),
])
def test_address_classification_examples(text, public):
    assert is_public_address(ipaddress.ip_address(text)) is public


@given(st.ip_addresses())
def test_an_address_python_flags_as_special_is_never_public(address):
    special = (address.is_private or address.is_loopback or address.is_link_local or address.is_multicast
               or address.is_reserved or address.is_unspecified or not address.is_global)
    embeds = isinstance(address, ipaddress.IPv6Address) and (
        address.ipv4_mapped or address.sixtofour or address in ipaddress.IPv6Network("64:ff9b::/96"))
    if special and not embeds:
        assert not is_public_address(address)
    if is_public_address(address) and not embeds:
        assert address.is_global


@given(st.ip_addresses(v=4))
def test_ipv6_embedding_an_ipv4_address_is_judged_by_it(v4):
    expected = is_public_address(v4)
    n = int(v4)
    for v6 in (ipaddress.IPv6Address((0xFFFF << 32) | n),                      # ::ffff:a.b.c.d
               ipaddress.IPv6Address((0x2002 << 112) | (n << 80) | 1),         # 6to4 2002:aabb:ccdd::1
               ipaddress.IPv6Address((0x64FF9B << 96) | n)):                   # NAT64 64:ff9b::a.b.c.d
        assert is_public_address(v6) is expected, v6


# ------------------------------------------------------------------------------------- settings


def _config(*flags: str):
    parser = argparse.ArgumentParser(allow_abbrev=False)
    add_serve_arguments(parser)
    return build_config(parser.parse_args(["--model_path", "ckpt", *flags]))[0]


def test_allowed_media_domains_are_normalized_and_bare_hosts_only():
    assert media_domains(["Media.Example.COM.", "[::1]", "0:0::1", "127.0.0.1"]) == [
        "media.example.com", "::1", "::1", "127.0.0.1"]
    for bad in ("*.example.com", "http://example.com", "example.com:8080", "example.com/x", "", "user@host"):
        with pytest.raises(ValueError, match="bare host name"):
            media_domains([bad])


def test_fetch_timeouts_flags_then_vllm_env_then_defaults(monkeypatch):
    monkeypatch.delenv("VLLM_IMAGE_FETCH_TIMEOUT", raising=False)
    monkeypatch.delenv("VLLM_VIDEO_FETCH_TIMEOUT", raising=False)
    cfg = _config()
    assert (cfg.image_fetch_timeout, cfg.video_fetch_timeout, cfg.allowed_media_domains) == (5.0, 30.0, [])
    monkeypatch.setenv("VLLM_IMAGE_FETCH_TIMEOUT", "7")
    monkeypatch.setenv("VLLM_VIDEO_FETCH_TIMEOUT", "60")
    assert (_config().image_fetch_timeout, _config().video_fetch_timeout) == (7.0, 60.0)
    assert _config("--image_fetch_timeout", "2.5").image_fetch_timeout == 2.5
    monkeypatch.setenv("VLLM_IMAGE_FETCH_TIMEOUT", "soon")
    with pytest.raises(ValueError, match="VLLM_IMAGE_FETCH_TIMEOUT"):
        _config()
    with pytest.raises(ValueError, match="video_fetch_timeout must be > 0"):
        _config("--image_fetch_timeout", "1", "--video_fetch_timeout", "0")
    with pytest.raises(ValueError, match="bare host name"):
        _config("--image_fetch_timeout", "1", "--allowed_media_domains", "*.example.com")


# ------------------------------------------------------------------------------------- the fetcher


def _fetch(url: str, allowed: tuple[str, ...] = (), hosts: dict[str, list[str]] | None = None,
           kind: MediaKind = MediaKind.IMAGE, ssl_context: ssl.SSLContext | None = None) -> bytes:
    """One fetch by a fresh MediaFetcher (a stub resolver when `hosts` is given: name -> addresses)."""
    async def stub(host: str, port: int) -> list[str]:
        if host not in hosts:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return hosts[host]

    async def run() -> bytes:
        fetcher = MediaFetcher(allowed, {MediaKind.IMAGE: 5.0, MediaKind.VIDEO: 5.0}, LIMITS,
                               stub if hosts is not None else system_resolve, ssl_context)
        try:
            return await fetcher.fetch(MediaRef(kind, url, {}, "messages[0].content[0].image_url"))
        finally:
            await fetcher.aclose()

    return asyncio.run(run())


def _refused(url: str, code: str, **kw) -> APIError:
    with pytest.raises(APIError) as info:
        _fetch(url, **kw)
    error = info.value
    assert (error.status, error.code, error.param) == (400, code, "messages[0].content[0].image_url"), error.body()
    assert url[:60] in error.message, error.message
    return error


def test_without_allowed_domains_loopback_is_refused_before_any_connection(site):
    before = sum(site.hits.values())
    _refused(f"{site.url}/image.png", "media_address_not_allowed")
    error = _refused(f"http://127.0.0.2:{site.port}/image.png", "media_address_not_allowed")
    assert "127.0.0.2, which is not a public address" in error.message
    error = _refused(f"http://localhost:{site.port}/image.png", "media_address_not_allowed")  # after resolving
    assert "'localhost' resolves to" in error.message
    _refused(f"http://[::ffff:127.0.0.1]:{site.port}/image.png", "media_address_not_allowed")
    assert sum(site.hits.values()) == before


def test_a_name_is_checked_on_every_address_it_resolves_to(site):
    before = site.hits["/image.png"]
    hosts = {"media.test": ["93.184.216.34", "10.0.0.7"]}  # one public address is not enough
    error = _refused(f"http://media.test:{site.port}/image.png", "media_address_not_allowed", hosts=hosts)
    assert "10.0.0.7" in error.message
    _refused(f"http://nowhere.test:{site.port}/image.png", "media_dns_failure", hosts=hosts)
    assert site.hits["/image.png"] == before


def test_a_listed_name_connects_to_the_address_it_was_resolved_to(site):
    """media.test exists only in the stub resolver: the fetch works only because the fetcher
    connects to the address it checked, while the request still names the host."""
    body = _fetch(f"http://MEDIA.test:{site.port}/image.png", allowed=("media.test",),
                  hosts={"media.test": ["127.0.0.1"]})
    assert body == png_bytes()
    assert site.hosts[-1] == f"media.test:{site.port}"
    _refused(f"http://other.test:{site.port}/image.png", "media_host_not_allowed", allowed=("media.test",),
             hosts={"other.test": ["127.0.0.1"]})


def test_https_verifies_and_sends_sni_for_the_name_not_the_address(tmp_path, video):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj",
                    "/CN=media.test", "-addext", "subjectAltName=DNS:media.test", "-keyout", str(key),
                    "-out", str(cert)], check=True, capture_output=True, timeout=60)
    server_tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_tls.load_cert_chain(cert, key)
    names: list[str | None] = []
    server_tls.sni_callback = lambda sock, name, ctx: names.append(name)
    httpd, tls_site = serve_site(video, server_tls)
    try:
        url = f"https://media.test:{tls_site.port}/image.png"
        body = _fetch(url, allowed=("media.test",), hosts={"media.test": ["127.0.0.1"]},
                      ssl_context=ssl.create_default_context(cafile=str(cert)))
        assert body == png_bytes() and names == ["media.test"]
        error = _refused(url, "media_fetch_failed", allowed=("media.test",), hosts={"media.test": ["127.0.0.1"]})
        assert "CERTIFICATE_VERIFY_FAILED" in error.message  # the default trust store does not know this certificate
    finally:
        httpd.shutdown()


def test_fetch_into_replaces_url_parts_with_their_bodies(site, video):
    listed = ("127.0.0.1",)
    messages = [ChatMessage("user", ["Compare", MediaRef(MediaKind.IMAGE, f"{site.url}/redirect-here", {}, "a"),
                                     MediaRef(MediaKind.VIDEO, f" {site.url}/clip.mp4", {"fps": 1.0}, "b"),
                                     MediaRef(MediaKind.IMAGE, "data:image/png;base64,AAAA", {}, "c")])]

    async def run(max_media: int) -> None:
        fetcher = MediaFetcher(listed, {MediaKind.IMAGE: 5.0, MediaKind.VIDEO: 5.0}, LIMITS)
        try:
            await fetcher.fetch_into(messages, max_media)
        finally:
            await fetcher.aclose()

    asyncio.run(run(max_media=2))  # over the count: nothing fetched (the preparer refuses it)
    assert not any(isinstance(p, FetchedRef) for p in messages[0].parts)
    asyncio.run(run(max_media=3))
    text, image, clip, inline = messages[0].parts
    assert text == "Compare" and isinstance(image, FetchedRef) and isinstance(clip, FetchedRef)
    assert (image.data, image.param) == (png_bytes(), "a")
    assert (clip.data, clip.kind, clip.options) == (video, MediaKind.VIDEO, {"fps": 1.0})
    assert not isinstance(inline, FetchedRef)


def test_the_first_failing_url_of_a_request_ends_its_other_fetches(site):
    """/slow.png would take the whole 30 s timeout; the HTML part's refusal ends the request first."""
    messages = [ChatMessage("user", [MediaRef(MediaKind.IMAGE, f"{site.url}/slow.png", {}, "slow"),
                                     MediaRef(MediaKind.IMAGE, f"{site.url}/page.html", {}, "html")])]

    async def run() -> APIError:
        fetcher = MediaFetcher(("127.0.0.1",), {MediaKind.IMAGE: 30.0, MediaKind.VIDEO: 30.0}, LIMITS)
        try:
            with pytest.raises(APIError) as info:
                await fetcher.fetch_into(messages, 32)
            return info.value
        finally:
            await fetcher.aclose()

    start = time.monotonic()
    error = asyncio.run(run())
    assert (error.code, error.param) == ("media_not_media", "html")
    assert time.monotonic() - start < 15.0  # not the slow part's 30 s
    assert not any(isinstance(p, FetchedRef) for p in messages[0].parts)


# ------------------------------------------------------------------------------------- a live server


@pytest.fixture(scope="module")
def fetching_server(serving_ckpt, media_dir, tmp_path_factory):
    """The server with 127.0.0.1 listed, short fetch timeouts, and one preparation thread: a fetch
    that held that thread would hold every other request back."""
    timeout = str(FETCH_TIMEOUT)
    live = start_server(serving_ckpt, media_dir, tmp_path_factory.mktemp("fetch-log") / "server.log",
                        "--allowed_media_domains", "127.0.0.1", "--image_fetch_timeout", timeout,
                        "--video_fetch_timeout", timeout, "--preprocess_workers", "1")
    yield live
    stop_server(live)


def _chat(*parts: dict) -> dict:
    return {"messages": [{"role": "user", "content": [*parts, {"type": "text", "text": "What is it?"}]}],
            "max_tokens": 3}


def _image(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def test_live_image_and_video_urls_are_fetched(fetching_server, site):
    def chat(*parts: dict) -> dict:
        r = httpx.post(fetching_server.url + "/v1/chat/completions", json=_chat(*parts), timeout=REQUEST_TIMEOUT_S)
        assert r.status_code == 200, r.text
        return r.json()["usage"]

    text_only = chat()
    image = chat(_image(f"{site.url}/image.png"))
    both = chat(_image(f"{site.url}/image.png"),
                {"type": "video_url", "video_url": {"url": f"{site.url}/clip.mp4", "fps": 2.0}})
    assert both["completion_tokens"] == 3
    assert text_only["prompt_tokens"] < image["prompt_tokens"] < both["prompt_tokens"]  # the media's tokens
    r = httpx.post(fetching_server.url + "/generate", timeout=REQUEST_TIMEOUT_S,
                   json={"prompt": [{"type": "text", "text": "Describe."}, _image(f"{site.url}/octet")],
                         "max_tokens": 2})
    assert r.status_code == 200 and len(r.json()["text"]) == 1, r.text


LIVE_FAULTS = [
    # (name, path or full URL ({port}: the site's), code, words the message holds)
    ("not media", "/page.html", "media_not_media", "'text/html', not an image or video"),
    ("404", "/missing.png", "media_http_status", "HTTP 404"),
    ("declared too large", "/huge-declared.png", "media_too_large", "Content-Length of 22020096 bytes"),
    ("streamed too large", "/huge-streamed.png", "media_too_large", "passed the 20 MB image limit"),
    ("redirect to an unlisted host", "/redirect-away", "media_redirect_not_allowed",
     "host '127.0.0.2' is not in the server's --allowed_media_domains"),
    ("redirect loop", "/redirect-loop", "media_too_many_redirects", "more than 5 redirects"),
    ("redirect to file://", "/redirect-file", "media_redirect_not_allowed", "not an http(s) URL"),
    ("gzip body", "/gzip.png", "media_fetch_failed", "gzip-encoded"),
    ("unlisted loopback address", "http://127.0.0.2:{port}/image.png", "media_host_not_allowed", "'127.0.0.2'"),
    ("unlisted name of a listed address", "http://localhost:{port}/image.png", "media_host_not_allowed",
     "'localhost'"),
    ("nothing listening", "http://127.0.0.1:{closed}/image.png", "media_fetch_failed", "ConnectError"),
    ("invalid URL", "http://[::1/image.png", "media_url_invalid", "not a valid URL"),
]


@pytest.mark.parametrize("name,where,code,words", LIVE_FAULTS, ids=[f[0] for f in LIVE_FAULTS])
def test_live_fetch_faults_are_400s_naming_url_and_reason(fetching_server, site, name, where, code, words):
    url = site.url + where if where.startswith("/") else where.format(port=site.port, closed=free_port())
    r = httpx.post(fetching_server.url + "/v1/chat/completions", json=_chat(_image(url)), timeout=REQUEST_TIMEOUT_S)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert (error["code"], error["param"]) == (code, "messages[0].content[0].image_url"), error
    assert f"cannot fetch {url!r}" in error["message"] and words in error["message"], error["message"]


def test_live_long_url_is_cut_in_the_message(fetching_server, site):
    url = f"{site.url}/page.html?q=" + "x" * 5000
    r = httpx.post(fetching_server.url + "/v1/chat/completions", json=_chat(_image(url)), timeout=REQUEST_TIMEOUT_S)
    error = r.json()["error"]
    assert r.status_code == 400 and error["code"] == "media_not_media"
    assert repr(url[:120] + "...") in error["message"] and len(error["message"]) < 400


def test_live_slow_url_times_out_alone(fetching_server, site):
    """A body that trickles for a minute is a 400 after FETCH_TIMEOUT; a request sent while it is
    being fetched finishes first, though the server prepares on one thread."""
    site.slow_started.clear()
    finished: dict[str, float] = {}

    def post(name: str, body: dict) -> httpx.Response:
        r = httpx.post(fetching_server.url + "/v1/chat/completions", json=body, timeout=REQUEST_TIMEOUT_S)
        finished[name] = time.monotonic()
        return r

    with ThreadPoolExecutor(2) as pool:
        start = time.monotonic()
        slow = pool.submit(post, "slow", _chat(_image(f"{site.url}/slow.png")))
        assert site.slow_started.wait(REQUEST_TIMEOUT_S), "the server never fetched /slow.png"
        normal = pool.submit(post, "normal", _chat(_image(f"{site.url}/image.png")))
        slow_r, normal_r = slow.result(), normal.result()
    assert normal_r.status_code == 200, normal_r.text
    assert slow_r.status_code == 400 and slow_r.json()["error"]["code"] == "media_fetch_timeout", slow_r.text
    assert f"within {FETCH_TIMEOUT:g} s (--image_fetch_timeout)" in slow_r.json()["error"]["message"]
    assert finished["normal"] < finished["slow"], finished
    assert finished["slow"] - start < TRICKLE_S / 2  # ended by the timeout, not by the body's end
    ok = httpx.post(fetching_server.url + "/v1/chat/completions", json=_chat(_image(f"{site.url}/image.png")),
                    timeout=REQUEST_TIMEOUT_S)
    assert ok.status_code == 200, ok.text
