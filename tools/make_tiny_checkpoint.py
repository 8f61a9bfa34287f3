"""Runs qwen_vl_triton/cli/make_tiny_checkpoint.py, as its installed command does, from a checkout."""

from qwen_vl_triton.cli.make_tiny_checkpoint import main

if __name__ == "__main__":
    main()
