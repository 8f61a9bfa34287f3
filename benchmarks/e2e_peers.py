"""Runs qwen_vl_triton/benchmarks/e2e_peers.py from a checkout; results land in benchmarks/results/."""

from qwen_vl_triton.benchmarks.e2e_peers import main

if __name__ == "__main__":
    main()
