"""Serve Qwen2-VL / Qwen2.5-VL / QVQ over HTTP: OpenAI-compatible and vLLM/MindIE-style APIs.

    python tools/serve.py --model_path CKPT --host 127.0.0.1 --port 1025 --allowed_media_dir /data
    python tools/serve.py --config mindie_config.json          # MindIE-Service's config.json
    python tools/serve.py --model_path CKPT --tensor_parallel_size 2  # tensor parallel, on this machine
    torchrun --nproc-per-node 2 tools/serve.py --model_path CKPT ...   # tensor parallel, also across machines

Endpoints: POST /v1/chat/completions, /v1/completions, /generate; GET /v1/models, /health
(200 once the model is loaded), /metrics (Prometheus). SIGTERM stops accepting requests, lets
in-flight ones finish (--graceful_timeout), aborts the rest and exits 0. A body over
--max_request_bytes is a 413, a request past a media or length limit a 400 naming it, each checked
before the work it bounds. See serving/.
"""

from __future__ import annotations

import argparse
import faulthandler
import logging
import os
import signal

from qwen_vl_triton.serving.config import add_serve_arguments, build_config


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    add_serve_arguments(p)
    p.add_argument("--access_log", action="store_true", help="log every HTTP request (uvicorn's access log)")
    return p.parse_args(argv)


class Terminated(Exception):
    """SIGTERM on rank 0: unwinds serve() (its finally blocks release the engine and the process
    group) and is caught in main(), so everything is freed before the interpreter shuts down."""


def _terminate(signum: int, frame: object) -> None:
    raise Terminated


def main(argv: list[str] | None = None) -> None:
    faulthandler.enable()  # a native crash (e.g. in a collective library) prints every thread's stack
    args = parse_args(argv)
    try:
        cfg, ignored = build_config(args)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    logging.basicConfig(level=cfg.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if ignored:
        logging.getLogger("serve").info("config keys not used by this server: %s", ", ".join(ignored))
    if int(os.environ.get("RANK", "0")) > 0:
        # Tensor-parallel followers leave when rank 0 shuts the engine down (after its graceful
        # drain); a signal here would pull a rank out from under requests still running.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    else:
        # uvicorn re-raises SIGTERM after its graceful shutdown; end with status 0 then (and during loading).
        signal.signal(signal.SIGTERM, _terminate)
    from qwen_vl_triton.serving.api_server import serve

    try:
        serve(cfg, access_log=args.access_log)
    except Terminated:
        logging.getLogger("serve").info("stopped by SIGTERM")


if __name__ == "__main__":
    main()
