"""Runs qwen_vl_triton/cli/serve.py, as its installed command does, from a checkout."""

from qwen_vl_triton.cli.serve import main

if __name__ == "__main__":
    main()
