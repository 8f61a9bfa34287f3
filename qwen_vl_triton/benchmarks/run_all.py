"""`make bench`: every benchmark family on the best device here, results under benchmarks/results/.

On a CUDA or Ascend device the full shapes run. Without one, kernels run in Triton's CPU
interpreter on a small smoke set: that proves the benchmarks work, and its timings are not
performance (the end-to-end comparison uses the PyTorch paths on CPU, as a CPU user would).
`--only NAME` runs one family.
"""

from __future__ import annotations

import argparse
import importlib
import os
import time

# family name -> module with `run(ctx)`
FAMILIES = {
    "elementwise": "qwen_vl_triton.benchmarks.bench_elementwise",
    "attention": "qwen_vl_triton.benchmarks.bench_attention",
    "video": "qwen_vl_triton.benchmarks.bench_video",
    "itl": "qwen_vl_triton.benchmarks.bench_itl",
    "structured": "qwen_vl_triton.benchmarks.bench_structured",
    "int8": "qwen_vl_triton.benchmarks.bench_quant",
    "quant_accuracy": "qwen_vl_triton.benchmarks.quant_accuracy",
    "e2e": "qwen_vl_triton.benchmarks.e2e_vs_hf",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--only", choices=list(FAMILIES), action="append", help="run only these families")
    parser.add_argument("--smoke", action="store_true", help="small shapes even on a device")
    args = parser.parse_args()

    from qwen_vl_triton.parallel.group import detect_device_type  # imports no triton

    if detect_device_type() == "cpu":  # no GPU and no Ascend NPU
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton's first import
    import torch

    from qwen_vl_triton.benchmarks.common import BenchContext, measure_copy_bandwidth, write_results

    device = torch.device(detect_device_type())  # the kernel families need nothing of the engine
    smoke = args.smoke or device.type == "cpu"
    if device.type == "cpu":
        print("No GPU/NPU: smoke run through Triton's CPU interpreter. Timings are NOT performance.")
    copy_gbs = measure_copy_bandwidth(device, 64 << 20 if smoke else 1 << 30)
    print(f"device={device} measured copy bandwidth {copy_gbs:.1f} GB/s")
    ctx = BenchContext(device=device, smoke=smoke, copy_gbs=copy_gbs)
    started = time.time()
    families = args.only or list(FAMILIES)
    for family in families:
        print(f"== {family}")
        importlib.import_module(FAMILIES[family]).run(ctx)
    path = write_results(ctx, {"families": families, "wall_s": round(time.time() - started, 1)})
    print(f"wrote {path} and {path.with_suffix('.md')}")


if __name__ == "__main__":
    main()
