"""Test set-up: kernels on the Triton path everywhere (the interpreter when there is no GPU or NPU).

TRITON_INTERPRET is read when triton is imported, so it is set here, before any test module
imports kernels (and through them triton).
"""

import os

from qwen_vl_triton.parallel.group import detect_device_type  # imports no triton

if detect_device_type() == "cpu":  # no GPU and no Ascend NPU
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("QVL_KERNELS", "triton")

from hypothesis import HealthCheck, Phase, settings  # noqa: E402

from qwen_vl_triton.kernels import _backend  # noqa: E402

_backend.poison_outputs = True  # every kernel output starts as NaN

# The interpreter runs each program in Python: examples are slow, deadlines meaningless.
settings.register_profile(
    "qvl", deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    derandomize=False, print_blob=True,
    # No shrinking: an interpreted example costs seconds, and the failing example is printed.
    phases=(Phase.explicit, Phase.reuse, Phase.generate),
)
settings.load_profile("qvl")
