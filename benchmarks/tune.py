"""`make tune` from a checkout: runs qwen_vl_triton/benchmarks/tune.py (the attention plans of this
device into qwen_vl_triton/kernels/plans/<arch>.json; --help says more)."""

import sys

from qwen_vl_triton.benchmarks.tune import main

if __name__ == "__main__":
    sys.exit(main())
