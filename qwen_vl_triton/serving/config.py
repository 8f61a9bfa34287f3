"""Server settings: the command line, and MindIE-Service's config.json mapped onto it.

Precedence: a flag given on the command line, then the value from `--config` (MindIE's
config.json), then the default here; the media fetch timeouts' defaults can also be set by vLLM's
environment variables VLLM_IMAGE_FETCH_TIMEOUT / VLLM_VIDEO_FETCH_TIMEOUT (seconds), as vLLM's
server reads them. MindIE keys that are read:

    ServerConfig.ipAddress / port                          -> host / port
    ServerConfig.httpsEnabled                              -> must be false (TLS: put a proxy in front)
    BackendConfig.ModelDeployConfig.maxSeqLen              -> max_seq_len
    BackendConfig.ModelDeployConfig.maxInputTokenLen       -> max_input_length
    BackendConfig.ModelDeployConfig.ModelConfig[0].modelName       -> served_model_name
    BackendConfig.ModelDeployConfig.ModelConfig[0].modelWeightPath -> model_path
    BackendConfig.ModelDeployConfig.ModelConfig[0].npuMemSize      -> kv_cache_gb (-1: automatic)
    BackendConfig.ModelDeployConfig.ModelConfig[0].worldSize       -> tensor_parallel_size
    BackendConfig.ScheduleConfig.maxPrefillTokens          -> max_prefill_tokens
    BackendConfig.ScheduleConfig.maxBatchSize              -> max_batch_size
    BackendConfig.ScheduleConfig.maxIterTimes              -> max_iter_times (output length cap)
    BackendConfig.ScheduleConfig.cacheBlockSize            -> block_size
    BackendConfig.ScheduleConfig.maxQueueLen (ours, optional) -> max_waiting

Other keys (managementPort, npuDeviceIds, maxLinkNum, ...) are accepted and listed as ignored.
MindIE's README writes its examples with `#` comments and trailing commas; both are accepted.
Tensor parallelism over N devices of this machine: --tensor_parallel_size N (or worldSize), and the
engine starts the other N-1 processes itself; across machines, torchrun as for tools/generate.py
(`torchrun --nproc-per-node N tools/serve.py ...`: rank 0 serves HTTP and drives the engine, the
other ranks follow it), and a tensor_parallel_size given must equal its world size.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from qwen_vl_triton.engine.config import EngineConfig, add_engine_args


@dataclass
class ServeConfig:
    """Everything `tools/serve.py` needs: the HTTP server's settings, and the engine's (one
    EngineConfig, the same settings and flags as every other command's)."""

    model_path: str | None = None
    engine: EngineConfig = field(default_factory=EngineConfig)
    host: str = "127.0.0.1"
    port: int = 1025
    served_model_name: list[str] = field(default_factory=list)
    allowed_media_dir: str | None = None
    # http(s) media (serving/media_fetch.py): only these hosts when given (exact names or addresses,
    # as vLLM's --allowed-media-domains), which may then also be private addresses; else any public host
    allowed_media_domains: list[str] = field(default_factory=list)
    image_fetch_timeout: float = 5.0   # seconds per image URL, all of it (vLLM's defaults)
    # A request's own chat_template is Jinja run by the server: sandboxed, but with no bound on its
    # time or memory. Refused unless the operator trusts the clients (vLLM's opt-in).
    trust_request_chat_template: bool = False
    video_fetch_timeout: float = 30.0  # seconds per video URL
    max_iter_times: int = 1024
    max_waiting: int = 1024
    graceful_timeout: float = 30.0
    preprocess_workers: int = 2
    # 413 past it (serving/limits.py): two 20 MB images fit as base64, or a 48 MB video; larger media
    # go by path under --allowed_media_dir. Each request in flight buffers at most this much.
    max_request_bytes: int = 64 << 20
    log_level: str = "info"

    def model_names(self) -> list[str]:
        """Names the server answers to: --served_model_name, else the checkpoint folder's name
        and 'qwen2_vl' (the name MindIE's examples send)."""
        if self.served_model_name:
            return list(self.served_model_name)
        names = [Path(self.model_path).name] if self.model_path else []
        return names + [n for n in ("qwen2_vl",) if n not in names]


# vLLM's environment variables for the fetch timeouts: the defaults when no flag is given
FETCH_TIMEOUT_ENV = {"image_fetch_timeout": "VLLM_IMAGE_FETCH_TIMEOUT",
                     "video_fetch_timeout": "VLLM_VIDEO_FETCH_TIMEOUT"}


def normalize_host(host: str) -> str:
    """A host name or IP address as --allowed_media_domains entries and URL hosts are compared:
    lower case, without IPv6 brackets or a trailing dot, IP addresses in their canonical form
    (so that "[::1]" names the same host as "0:0::1")."""
    host = host.strip().lower().removeprefix("[").removesuffix("]").rstrip(".")
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        return host


def media_domains(hosts: list[str]) -> list[str]:
    """--allowed_media_domains normalized (normalize_host); ValueError naming an entry that is not a
    bare host name or IP address (a URL, a port, a wildcard: vLLM matches names exactly too)."""
    out = []
    for entry in hosts:
        host = normalize_host(entry)
        if not host or (not _is_ip(host) and any(c in host for c in " */:@?#[]")):
            raise ValueError(f"--allowed_media_domains {entry!r}: give a bare host name or IP address, matched "
                             "exactly (no scheme, port, path or wildcard)")
        out.append(host)
    return out


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


# ------------------------------------------------------------------------------------- MindIE JSON


def strip_json_comments(text: str) -> str:
    """JSON with `#` / `//` line comments and trailing commas (as MindIE's README writes its
    config.json examples) turned into strict JSON. String contents are left alone."""
    out: list[str] = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c == '"':
            end = _string_end(text, i)
            out.append(text[i:end])
            i = end
        elif _comment_at(text, i):
            i = _line_end(text, i)
        elif c == "," and text.startswith(("}", "]"), _next_token(text, i + 1)):
            i += 1  # a trailing comma: followed (past whitespace and comments) by } or ]
        else:
            out.append(c)
            i += 1
    return "".join(out)


def _string_end(text: str, i: int) -> int:
    """Index just past the JSON string opening at text[i] (the end of text if it never closes)."""
    i += 1
    while i < len(text):
        if text[i] == "\\":
            i += 2
        elif text[i] == '"':
            return i + 1
        else:
            i += 1
    return len(text)


def _comment_at(text: str, i: int) -> bool:
    return text[i] == "#" or text.startswith("//", i)


def _line_end(text: str, i: int) -> int:
    """Index of the newline ending text[i]'s line (the end of text on the last line)."""
    j = text.find("\n", i)
    return len(text) if j < 0 else j


def _next_token(text: str, i: int) -> int:
    """Index of the first character at or after i that is neither whitespace nor in a comment."""
    while i < len(text):
        if text[i] in " \t\r\n":
            i += 1
        elif _comment_at(text, i):
            i = _line_end(text, i)
        else:
            break
    return i


def read_mindie_config(path: str | Path) -> tuple[dict[str, Any], list[str]]:
    """(ServeConfig field -> value, ignored MindIE keys) from a MindIE-Service config.json.
    Raises ValueError naming the problem (unreadable JSON, https, several models)."""
    text = Path(path).read_text(encoding="utf-8")
    try:
        doc = json.loads(strip_json_comments(text))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON even with comments and trailing commas removed ({e})") from e
    if not isinstance(doc, dict):
        raise ValueError(f"{path}: the top level must be an object")
    values: dict[str, Any] = {}
    ignored: list[str] = []

    def take(section: dict[str, Any], prefix: str, mapping: dict[str, tuple[str | None, Callable[[Any], Any]]],
             handled: tuple[str, ...] = ()) -> None:
        """values[field] = convert(value) for the keys in mapping (field None: only checked), the
        others (but those handled elsewhere) reported in `ignored` as prefix + key, in order."""
        for key, value in section.items():
            if key in mapping:
                name, convert = mapping[key]
                converted = convert(value)
                if name is not None:
                    values[name] = converted
            elif key not in handled:
                ignored.append(prefix + key)

    def https_off(value: Any) -> None:
        if value:
            raise ValueError(f"{path}: ServerConfig.httpsEnabled is true, but this server speaks plain "
                             "HTTP only; terminate TLS in a reverse proxy and set it to false")

    take(doc.get("ServerConfig") or {}, "ServerConfig.",
         {"ipAddress": ("host", str), "port": ("port", int), "httpsEnabled": (None, https_off)})
    backend = doc.get("BackendConfig") or {}
    take(backend, "BackendConfig.", {}, handled=("ModelDeployConfig", "ScheduleConfig"))
    deploy = backend.get("ModelDeployConfig") or {}
    take(deploy, "ModelDeployConfig.", {"maxSeqLen": ("max_seq_len", int),
                                        "maxInputTokenLen": ("max_input_length", int)}, handled=("ModelConfig",))
    models = deploy.get("ModelConfig") or []
    if isinstance(models, dict):
        models = [models]
    if len(models) > 1:
        raise ValueError(f"{path}: {len(models)} ModelConfig entries; this server serves one model")
    take(models[0] if models else {}, "ModelConfig.",
         {"modelName": ("served_model_name", lambda v: [str(v)]), "modelWeightPath": ("model_path", str),
          "npuMemSize": ("kv_cache_gb", lambda v: None if float(v) < 0 else float(v)),
          "worldSize": ("tensor_parallel_size", int)})
    take(backend.get("ScheduleConfig") or {}, "ScheduleConfig.",
         {"maxPrefillTokens": ("max_prefill_tokens", int), "maxBatchSize": ("max_batch_size", int),
          "maxIterTimes": ("max_iter_times", int), "cacheBlockSize": ("block_size", int),
          "maxQueueLen": ("max_waiting", int)})
    take(doc, "", {}, handled=("ServerConfig", "BackendConfig"))
    return values, ignored


# ------------------------------------------------------------------------------------- command line


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    """The server's flags. Defaults are None here so that a flag given wins over --config;
    `build_config` fills in ServeConfig's defaults (shown in each help text)."""
    d = ServeConfig()
    add = p.add_argument
    add("--model_path", help="HF-format checkpoint directory (or ModelConfig.modelWeightPath in --config)")
    add("--config", type=Path, help="a MindIE-Service config.json (comments and trailing commas allowed); "
                                    "flags given on the command line override its values")
    add("--host", help=f"address to listen on (default: {d.host})")
    add("--port", type=int, help=f"port to listen on (default: {d.port})")
    add("--served_model_name", nargs="+", metavar="NAME",
        help="model name(s) requests may name; the first is reported by /v1/models (default: the "
             "checkpoint folder's name, and 'qwen2_vl' as MindIE's examples send)")
    add("--allowed_media_dir", help="local folder whose files requests may name as media (paths and file:// "
                                    "URLs; anything outside it is refused); without it only data: URIs are read")
    add("--allowed_media_domains", nargs="+", metavar="HOST",
        help="fetch http(s) media URLs (redirects included) only from these hosts: names or IP addresses, "
             "matched exactly and case-insensitively; a listed host may also be a private or loopback address "
             "(default: any host whose addresses are all public)")
    add("--image_fetch_timeout", type=float, metavar="SECONDS",
        help=f"time to fetch one image URL, from resolving its host to its last byte (default: "
             f"${FETCH_TIMEOUT_ENV['image_fetch_timeout']} if set, else {d.image_fetch_timeout:g})")
    add("--video_fetch_timeout", type=float, metavar="SECONDS",
        help=f"time to fetch one video URL (default: ${FETCH_TIMEOUT_ENV['video_fetch_timeout']} if set, "
             f"else {d.video_fetch_timeout:g})")
    add("--trust_request_chat_template", action="store_true", default=None,
        help="accept a request's own chat_template (Jinja the server runs, sandboxed but unbounded in time and "
             "memory; vLLM's --trust-request-chat-template); without it such a request is a 400")
    add("--max_iter_times", type=int,
        help=f"output tokens per request at most; also the max_tokens default (default: {d.max_iter_times})")
    add("--max_waiting", type=int, help=f"requests accepted but not yet running before new ones get 503 "
                                        f"(default: {d.max_waiting})")
    add("--graceful_timeout", type=float,
        help=f"seconds SIGTERM waits for in-flight requests before aborting them (default: {d.graceful_timeout})")
    add("--preprocess_workers", type=int,
        help=f"threads decoding media and tokenizing prompts (default: {d.preprocess_workers})")
    add("--max_request_bytes", type=int,
        help=f"request body size in bytes; larger bodies get a 413 before they are read whole (default: "
             f"{d.max_request_bytes}, 64 MiB: send larger media as paths under --allowed_media_dir)")
    add("--log_level", choices=["debug", "info", "warning", "error"], help=f"(default: {d.log_level})")
    add_engine_args(p)


def build_config(args: argparse.Namespace) -> tuple[ServeConfig, list[str]]:
    """ServeConfig from parsed flags (and --config); also the MindIE keys that were ignored. A value
    out of its limits raises ValueError naming the setting."""
    values: dict[str, Any] = {}
    ignored: list[str] = []
    if getattr(args, "config", None) is not None:
        values, ignored = read_mindie_config(args.config)
    engine_names = {f.name for f in fields(EngineConfig)}
    engine = EngineConfig.from_args(args, **{k: v for k, v in values.items() if k in engine_names})
    serve_names = {f.name for f in fields(ServeConfig)} - {"engine"}
    values = {k: v for k, v in values.items() if k in serve_names}
    values.update({name: value for name, value in vars(args).items() if name in serve_names and value is not None})
    for name, env in FETCH_TIMEOUT_ENV.items():
        if name not in values and os.environ.get(env):
            try:
                values[name] = float(os.environ[env])
            except ValueError:
                raise ValueError(f"${env}={os.environ[env]!r}: not a number of seconds") from None
    cfg = ServeConfig(engine=engine, **values)
    if not cfg.model_path:
        raise ValueError("no model: pass --model_path, or --config with ModelConfig.modelWeightPath")
    for name in ("max_iter_times", "max_waiting", "preprocess_workers", "max_request_bytes"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"{name} must be >= 1, got {getattr(cfg, name)}")
    for name in FETCH_TIMEOUT_ENV:
        if not getattr(cfg, name) > 0:  # also refuses NaN
            raise ValueError(f"{name} must be > 0 seconds, got {getattr(cfg, name)}")
    cfg.allowed_media_domains = media_domains(cfg.allowed_media_domains)
    if cfg.allowed_media_dir is not None and not Path(cfg.allowed_media_dir).is_dir():
        raise ValueError(f"--allowed_media_dir {cfg.allowed_media_dir}: not a directory")
    return cfg, ignored
