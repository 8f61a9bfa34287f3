"""The measurements of `make bench`, `make compile-check` and `make device-check`.

They run from a checkout (`python benchmarks/run_all.py`, or `python -m qwen_vl_triton.benchmarks.run_all`)
and write their results files into the checkout's benchmarks/results/, which the README cites.
"""

from pathlib import Path

CHECKOUT = Path(__file__).resolve().parents[2]
RESULTS_DIR = CHECKOUT / "benchmarks" / "results"
