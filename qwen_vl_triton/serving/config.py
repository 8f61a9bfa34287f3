"""Server settings: the command line, and MindIE-Service's config.json mapped onto it.

Precedence: a flag given on the command line, then the value from `--config` (MindIE's
config.json), then the default here. MindIE keys that are read:

    ServerConfig.ipAddress / port                          -> host / port
    ServerConfig.httpsEnabled                              -> must be false (TLS: put a proxy in front)
    BackendConfig.ModelDeployConfig.maxSeqLen              -> max_seq_len
    BackendConfig.ModelDeployConfig.maxInputTokenLen       -> max_input_length
    BackendConfig.ModelDeployConfig.ModelConfig[0].modelName       -> served_model_name
    BackendConfig.ModelDeployConfig.ModelConfig[0].modelWeightPath -> model_path
    BackendConfig.ModelDeployConfig.ModelConfig[0].npuMemSize      -> kv_cache_gb (-1: automatic)
    BackendConfig.ModelDeployConfig.ModelConfig[0].worldSize       -> world_size (checked against torchrun's)
    BackendConfig.ScheduleConfig.maxPrefillTokens          -> max_prefill_tokens
    BackendConfig.ScheduleConfig.maxBatchSize              -> max_batch_size
    BackendConfig.ScheduleConfig.maxIterTimes              -> max_iter_times (output length cap)
    BackendConfig.ScheduleConfig.cacheBlockSize            -> block_size
    BackendConfig.ScheduleConfig.maxQueueLen (ours, optional) -> max_waiting

Other keys (managementPort, npuDeviceIds, maxLinkNum, ...) are accepted and listed as ignored.
MindIE's README writes its examples with `#` comments and trailing commas; both are accepted.
Tensor parallelism comes from the launcher, as for tools/generate.py: `torchrun --nproc-per-node N
tools/serve.py ...` (rank 0 serves HTTP and drives the engine, the other ranks follow it); a
worldSize in the config must match N.
"""

from __future__ import annotations

import argparse
import json
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
    max_iter_times: int = 1024
    max_waiting: int = 1024
    graceful_timeout: float = 30.0
    preprocess_workers: int = 2
    # 413 past it (serving/limits.py): two 20 MB images fit as base64, or a 48 MB video; larger media
    # go by path under --allowed_media_dir. Each request in flight buffers at most this much.
    max_request_bytes: int = 64 << 20
    log_level: str = "info"
    world_size: int | None = None  # MindIE's worldSize: must equal the torchrun world size when given

    def model_names(self) -> list[str]:
        """Names the server answers to: --served_model_name, else the checkpoint folder's name
        and 'qwen2_vl' (the name MindIE's examples send)."""
        if self.served_model_name:
            return list(self.served_model_name)
        names = [Path(self.model_path).name] if self.model_path else []
        return names + [n for n in ("qwen2_vl",) if n not in names]


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
    Raises ValueError naming the problem (unreadable JSON, https, worldSize > 1)."""
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
          "worldSize": ("world_size", int)})
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
    cfg = ServeConfig(engine=engine, **values)
    if not cfg.model_path:
        raise ValueError("no model: pass --model_path, or --config with ModelConfig.modelWeightPath")
    for name in ("max_iter_times", "max_waiting", "preprocess_workers", "max_request_bytes"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"{name} must be >= 1, got {getattr(cfg, name)}")
    if cfg.allowed_media_dir is not None and not Path(cfg.allowed_media_dir).is_dir():
        raise ValueError(f"--allowed_media_dir {cfg.allowed_media_dir}: not a directory")
    return cfg, ignored
