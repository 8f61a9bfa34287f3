"""Runs qwen_vl_triton/cli/eval.py, as its installed command does, from a checkout."""

from qwen_vl_triton.cli.eval import main

if __name__ == "__main__":
    main()
