"""Runs qwen_vl_triton/benchmarks/bench_structured.py from a checkout; results land in benchmarks/results/."""

from qwen_vl_triton.benchmarks.bench_structured import main

if __name__ == "__main__":
    main()
