"""`python -m benchmarks.compile_check` from a checkout: runs qwen_vl_triton/benchmarks/compile_check."""

import sys

from qwen_vl_triton.benchmarks.compile_check.__main__ import main

if __name__ == "__main__":
    sys.exit(main())
