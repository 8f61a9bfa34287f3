"""Runs qwen_vl_triton/benchmarks/quant_accuracy.py from a checkout; results land in benchmarks/results/."""

from qwen_vl_triton.benchmarks.quant_accuracy import main

if __name__ == "__main__":
    main()
