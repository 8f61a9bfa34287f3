"""Runs qwen_vl_triton/benchmarks/bench_decode_graphs.py from a checkout; results land in benchmarks/results/."""

from qwen_vl_triton.benchmarks.bench_decode_graphs import main

if __name__ == "__main__":
    main()
