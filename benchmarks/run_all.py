"""Runs qwen_vl_triton/benchmarks/run_all.py from a checkout; results land in benchmarks/results/."""

from qwen_vl_triton.benchmarks.run_all import main

if __name__ == "__main__":
    main()
