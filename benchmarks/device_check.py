"""`make device-check` from a checkout: runs qwen_vl_triton/benchmarks/device_check.py."""

import sys

from qwen_vl_triton.benchmarks.device_check import main

if __name__ == "__main__":
    sys.exit(main())
