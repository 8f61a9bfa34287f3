"""The command lines, one module each, installed as console scripts (pyproject.toml) and also run
from a checkout as `python tools/<name>.py`:

    generate.py              qvl-generate              offline generation (MindIE's run_pa.py flags)
    serve.py                 qvl-serve                 the OpenAI-compatible server
    benchmark.py             qvl-benchmark             the load benchmark against a server (or in-process)
    eval.py                  qvl-eval                  TextVQA / VideoBench accuracy
    quantize.py              qvl-quantize              W8A8 / W8A16 checkpoints (msModelSlim, compressed-tensors)
    make_tiny_checkpoint.py  qvl-make-tiny-checkpoint  a small random checkpoint for trying things out

Each module's `main(argv)` returns what the tests read; the console scripts enter through the `run_<name>`
functions below, which return nothing (a console script exits with what its entry returns).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable


def _command(module: str) -> Callable[[], None]:
    def run() -> None:
        importlib.import_module(f"qwen_vl_triton.cli.{module}").main()

    run.__name__ = f"run_{module}"
    run.__doc__ = f"The console script of qwen_vl_triton/cli/{module}.py."
    return run


run_generate = _command("generate")
run_serve = _command("serve")
run_benchmark = _command("benchmark")
run_eval = _command("eval")
run_quantize = _command("quantize")
run_make_tiny_checkpoint = _command("make_tiny_checkpoint")
