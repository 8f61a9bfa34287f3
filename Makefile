# qwen-vl-triton: `make test` does all the set-up on a fresh clone.
PY        ?= python3
VENV      := .venv
VPY       := $(VENV)/bin/python
TORCH_PIN := torch==2.13.0
STAMP     := $(VENV)/.installed

# Stock Triton, or triton-ascend on an Ascend host (the two cannot be installed together).
KERNEL_EXTRA ?= $(shell command -v npu-smi >/dev/null 2>&1 && echo ascend || echo triton)

.PHONY: install test bench lint demo clean

install: $(STAMP)

# torch goes in first, pinned, and only when missing: an unpinned resolve would pull GBs of CUDA wheels.
$(STAMP): pyproject.toml
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -c "import torch" 2>/dev/null || $(VPY) -m pip install -q $(TORCH_PIN)
	$(VPY) -m pip install -q -e ".[$(KERNEL_EXTRA),serve,dev]"
	touch $(STAMP)

# Kernels run on the Triton path everywhere (tests/conftest.py picks the interpreter when there is
# no GPU or NPU).
test: install
	QVL_KERNELS=triton $(VPY) -m pytest -n 2 tests

# The whole path on a tiny random checkpoint (made once under ~/.cache/qwen-vl-triton) and a sample image.
demo: install
	$(VPY) tools/generate.py --max_output_length 32

bench: install
	$(VPY) benchmarks/run_all.py

lint: install
	$(VPY) -m ruff check .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis
