"""Fetching http(s) media URLs for the server, on its event loop, guarded against SSRF.

Where: `MediaFetcher.fetch_into` runs in the request's handler on the event loop, before the
request goes to the preparation threads (`--preprocess_workers`): a URL that is slow to answer
holds a coroutine, not a worker thread, so it delays no other request. A request's URLs are
fetched concurrently; the first that fails fails the request (its other fetches are cancelled).
Each fetched part becomes a `FetchedRef` carrying the body, which `prompting.resolve_source` hands
on like a data URI's decoded bytes.

What is refused, each a 400 naming the part, the URL (cut to URL_SHOWN characters) and the reason,
with its own `code`:

  * media_url_invalid: not a URL with a host;
  * media_host_not_allowed: with `--allowed_media_domains`, a host it does not list;
  * media_redirect_not_allowed: a redirect to a host it does not list, or to a non-http(s) URL;
  * media_too_many_redirects: more than MAX_REDIRECTS hops;
  * media_dns_failure: the host does not resolve;
  * media_address_not_allowed: the host resolves to an address that is not public (private,
    loopback, link-local, multicast, reserved, unspecified, CGNAT, or an IPv6 address embedding
    one) and `--allowed_media_domains` does not list the host;
  * media_fetch_timeout: the whole fetch (DNS, connect, redirects, body) took longer than
    `--image_fetch_timeout` / `--video_fetch_timeout`;
  * media_fetch_failed: the connection failed (refused, reset, TLS, HTTP protocol error), or the
    body came content-encoded although identity was asked for;
  * media_http_status: a final status other than 2xx;
  * media_not_media: a Content-Type other than image/*, video/* or a generic binary type;
  * media_too_large: a body over the kind's byte limit, by its Content-Length before it is read,
    else as soon as the bytes read pass it (the rest is not read).

The SSRF guard sits where the connection is made: `GuardedBackend`, the network backend of the
client's connection pool, resolves the host itself, checks every address it resolves to, and
connects to a checked address (an IP literal), so the name is not resolved a second time (no DNS
rebinding between check and connect). TLS still verifies the certificate for, and sends SNI of,
the URL's host name: httpcore takes `server_hostname` from the request's origin, not from the
address connect_tcp used. Every connection goes through it, redirects' included. Proxies from the
environment are not used: a proxy would connect on our behalf, past the guard.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import socket
import ssl
from collections.abc import Awaitable, Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import httpcore
import httpx

from qwen_vl_triton.modeling.processing import MediaKind
from qwen_vl_triton.serving.config import normalize_host
from qwen_vl_triton.serving.protocol import APIError, ChatMessage, MediaRef

MAX_REDIRECTS = 5
URL_SHOWN = 120      # characters of a URL quoted in an error message
REDIRECTS = {301, 302, 303, 307, 308}
# Content-Types that may carry media: S3 and many CDNs serve any upload as a generic binary type.
BINARY_TYPES = {"application/octet-stream", "binary/octet-stream", "application/binary"}
# IPv6 prefixes whose addresses carry an IPv4 address the packets may end up at.
NAT64 = ipaddress.IPv6Network("64:ff9b::/96")  # DNS64 answers for IPv4-only hosts on IPv6-only networks
NOT_GLOBAL_V4 = ipaddress.IPv4Network("100.64.0.0/10")  # carrier-grade NAT (not in every Python's is_private)

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[[str, int], Awaitable[list[str]]]


def is_public_address(address: Address) -> bool:
    """Whether a connection to `address` can only reach the public internet: it is globally
    routable and neither private, loopback, link-local, site-local, multicast, reserved, unspecified
    nor carrier-grade NAT. IPv6 addresses that embed an IPv4 address (IPv4-mapped ::ffff:a.b.c.d,
    6to4 2002::/16, NAT64 64:ff9b::/96) are judged by the IPv4 address they lead to."""
    if isinstance(address, ipaddress.IPv6Address):
        embedded = address.ipv4_mapped or address.sixtofour or (
            ipaddress.IPv4Address(int(address) & 0xFFFFFFFF) if address in NAT64 else None)
        if embedded is not None:
            return is_public_address(embedded)
        if address.is_site_local:
            return False
    elif address in NOT_GLOBAL_V4:
        return False
    return address.is_global and not (address.is_private or address.is_loopback or address.is_link_local
                                      or address.is_multicast or address.is_reserved or address.is_unspecified)


class FetchError(Exception):
    """Why a URL is not fetched: the API error code and the reason, for the 400."""

    def __init__(self, code: str, reason: str):
        super().__init__(reason)
        self.code = code
        self.reason = reason


# getaddrinfo blocks a thread until the resolver answers; its own threads, so that lookups stuck on
# a slow DNS server take none of the loop's default executor (nor one another's, up to 32).
_DNS_THREADS = ThreadPoolExecutor(max_workers=32, thread_name_prefix="qvl-dns")


async def system_resolve(host: str, port: int) -> list[str]:
    """The host's addresses (the system resolver, on the DNS threads), in its order, once each."""
    infos = await asyncio.get_running_loop().run_in_executor(
        _DNS_THREADS, functools.partial(socket.getaddrinfo, host, port, type=socket.SOCK_STREAM))
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


class GuardedBackend(httpcore.AsyncNetworkBackend):
    """httpcore's network backend that connects only to checked addresses: it resolves the host,
    refuses (FetchError) when any of its addresses is not public unless the host is allowed
    explicitly, then connects to those addresses in order (the first that accepts)."""

    def __init__(self, allowed: frozenset[str], resolve: Resolver = system_resolve):
        self.allowed = allowed
        self.resolve = resolve
        self.inner = httpcore.AnyIOBackend()

    async def addresses(self, host: str, port: int) -> list[str]:
        """The addresses to connect to for host:port; FetchError if it does not resolve or may not be reached."""
        try:
            found = await self.resolve(host, port)
        except (OSError, UnicodeError) as e:  # socket.gaierror is an OSError
            raise FetchError("media_dns_failure", f"cannot resolve host {host!r}: {getattr(e, 'strerror', None) or e}"
                             ) from None
        if not found:
            raise FetchError("media_dns_failure", f"host {host!r} resolves to no address")
        if normalize_host(host) not in self.allowed:
            for text in found:
                if not is_public_address(ipaddress.ip_address(text)):
                    raise FetchError("media_address_not_allowed",
                                     f"host {host!r} resolves to {text}, which is not a public address; the server "
                                     "fetches from it only if --allowed_media_domains lists the host")
        return found

    async def connect_tcp(self, host: str, port: int, timeout: float | None = None, local_address: str | None = None,
                          socket_options: Iterable[Any] | None = None) -> httpcore.AsyncNetworkStream:
        failure: httpcore.ConnectError | httpcore.ConnectTimeout | None = None
        for address in await self.addresses(host, port):
            try:
                return await self.inner.connect_tcp(address, port, timeout, local_address, socket_options)
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as e:  # the next address may answer
                failure = e
        assert failure is not None  # addresses() returns at least one
        raise failure

    async def sleep(self, seconds: float) -> None:
        await self.inner.sleep(seconds)


class GuardedTransport(httpx.AsyncHTTPTransport):
    """httpx's transport over a connection pool whose every connection GuardedBackend makes."""

    def __init__(self, backend: GuardedBackend, ssl_context: ssl.SSLContext | None = None):
        super().__init__()
        # httpx takes no network backend, so its pool is rebuilt here as httpx builds it (the same
        # httpcore class and TLS defaults), with the guarded backend. No connection limit: a fetch
        # waiting for a free connection would wait on other requests' slow URLs (the fetches in
        # flight are bounded already: --max_waiting requests, --max_media_per_prompt URLs each).
        self._pool = httpcore.AsyncConnectionPool(ssl_context=ssl_context or httpx.create_ssl_context(),
                                                  max_connections=None, max_keepalive_connections=20,
                                                  keepalive_expiry=5.0, network_backend=backend)


@dataclass
class FetchedRef(MediaRef):
    """A media part whose http(s) URL the server fetched: its body, read as a data URI's bytes are."""

    data: bytes = field(repr=False)


def is_http_url(url: str) -> bool:
    """Whether a media part's URL is one the server fetches."""
    return url.lstrip()[:8].lower().startswith(("http://", "https://"))


def shown(url: str | httpx.URL) -> str:
    """A URL for an error message, cut to URL_SHOWN characters."""
    text = str(url)
    return repr(text if len(text) <= URL_SHOWN else text[:URL_SHOWN] + "...")


class MediaFetcher:
    """Fetches the http(s) media parts of requests (see the module's docstring): one per server,
    its connections pooled across requests. `timeouts` and `max_bytes` are per media kind."""

    def __init__(self, allowed_hosts: Iterable[str], timeouts: Mapping[MediaKind, float],
                 max_bytes: Mapping[MediaKind, int], resolve: Resolver = system_resolve,
                 ssl_context: ssl.SSLContext | None = None):
        self.allowed = frozenset(normalize_host(h) for h in allowed_hosts)
        self.timeouts = dict(timeouts)
        self.max_bytes = dict(max_bytes)
        transport = GuardedTransport(GuardedBackend(self.allowed, resolve), ssl_context)
        # identity: media are compressed already, and a decoded body could be far larger than the
        # bytes counted against the limit. trust_env=False: no proxies (module docstring).
        self.client = httpx.AsyncClient(transport=transport, trust_env=False, follow_redirects=False,
                                        headers={"Accept-Encoding": "identity", "User-Agent": "qwen-vl-triton"})

    async def aclose(self) -> None:
        """Close the pooled connections."""
        await self.client.aclose()

    async def fetch_into(self, messages: list[ChatMessage], max_media: int) -> None:
        """Fetch the messages' http(s) media parts concurrently, replacing each with its FetchedRef;
        an APIError (400) for the first that fails. Nothing is fetched when the messages hold more
        than max_media media (the preparer refuses them before reading any)."""
        spots = [(m, i, p) for m in messages for i, p in enumerate(m.parts)
                 if isinstance(p, MediaRef) and not isinstance(p, FetchedRef) and is_http_url(p.url)]
        if not spots or sum(isinstance(p, MediaRef) for m in messages for p in m.parts) > max_media:
            return
        tasks = [asyncio.ensure_future(self.fetch(ref)) for _, _, ref in spots]
        try:
            bodies = await asyncio.gather(*tasks)
        finally:
            for task in tasks:  # the first failure ends the request: its other fetches stop
                task.cancel()
        for (message, i, ref), body in zip(spots, bodies, strict=True):
            message.parts[i] = FetchedRef(ref.kind, ref.url, ref.options, ref.param, body)

    async def fetch(self, ref: MediaRef) -> bytes:
        """The body at the part's URL; APIError (400) naming the part, the URL and why not."""
        url = ref.url.strip()
        timeout = self.timeouts[ref.kind]
        where: list[httpx.URL] = []  # the URL of each hop, for messages about a redirect's target
        try:
            async with asyncio.timeout(timeout):
                return await self._get(url, ref.kind, where)
        except (TimeoutError, httpx.TimeoutException):
            code, reason = "media_fetch_timeout", (f"no complete answer within {timeout:g} s "
                                                   f"(--{ref.kind}_fetch_timeout)")
        except FetchError as e:
            code, reason = e.code, e.reason
        except (httpx.HTTPError, OSError) as e:  # refused, reset, TLS or HTTP protocol errors
            code, reason = "media_fetch_failed", f"{type(e).__name__}: {e}"[:300]
        if len(where) > 1:
            reason += f" (after a redirect to {shown(where[-1])})"
        raise APIError(f"'{ref.param}': cannot fetch {shown(url)}: {reason}", param=ref.param, code=code)

    def _check_host(self, url: httpx.URL, code: str) -> None:
        if url.scheme not in ("http", "https"):
            raise FetchError(code, f"not an http(s) URL: {shown(url)}")
        if not url.host:
            raise FetchError("media_url_invalid", "the URL names no host")
        if self.allowed and normalize_host(url.host) not in self.allowed:
            raise FetchError(code, f"host {url.host!r} is not in the server's --allowed_media_domains")

    async def _get(self, url: str, kind: MediaKind, where: list[httpx.URL]) -> bytes:
        try:
            target = httpx.URL(url)
        except httpx.InvalidURL as e:
            raise FetchError("media_url_invalid", f"not a valid URL ({e})") from None
        self._check_host(target, "media_host_not_allowed")
        for _ in range(MAX_REDIRECTS + 1):
            where.append(target)
            async with self.client.stream("GET", target, timeout=self.timeouts[kind]) as response:
                if response.status_code in REDIRECTS and "location" in response.headers:
                    try:
                        target = target.join(response.headers["location"])
                    except httpx.InvalidURL as e:
                        raise FetchError("media_redirect_not_allowed", f"redirected to an invalid URL ({e})") from None
                    self._check_host(target, "media_redirect_not_allowed")
                    continue
                if not response.is_success:
                    raise FetchError("media_http_status",
                                     f"the server answered HTTP {response.status_code} {response.reason_phrase}")
                return await self._read(response, kind)
        raise FetchError("media_too_many_redirects", f"more than {MAX_REDIRECTS} redirects")

    async def _read(self, response: httpx.Response, kind: MediaKind) -> bytes:
        """The response's body, checked to be media within the kind's byte limit."""
        content_type = response.headers.get("content-type", "").partition(";")[0].strip().lower()
        if content_type and not (content_type.startswith(("image/", "video/")) or content_type in BINARY_TYPES):
            raise FetchError("media_not_media", f"its Content-Type is {content_type!r}, not an image or video")
        encoding = response.headers.get("content-encoding", "identity").strip().lower()
        if encoding != "identity":
            raise FetchError("media_fetch_failed", f"the body is {encoding}-encoded although identity was asked for")
        limit = self.max_bytes[kind]
        declared = response.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise FetchError("media_too_large", f"its Content-Length of {declared} bytes is over the "
                                                f"{limit >> 20} MB {kind} limit")
        body = bytearray()
        async for chunk in response.aiter_raw():
            body += chunk
            if len(body) > limit:
                raise FetchError("media_too_large", f"its body passed the {limit >> 20} MB {kind} limit "
                                                    f"(reading stopped at {len(body)} bytes)")
        if not body:
            raise FetchError("media_not_media", "the body is empty")
        return bytes(body)
