"""Quantize a float Qwen2-VL / Qwen2.5-VL checkpoint to int8, in msModelSlim's or compressed-tensors'
format, round-to-nearest with per-channel weight scales (no calibration data needed, except a few
built-in prompts to set W8A8-static activation ranges).

    python tools/quantize.py --model_path FLOAT_CKPT --output_path OUT --format ascend-w8a8
    python tools/quantize.py --model_path FLOAT_CKPT --output_path OUT --format compressed-tensors-w8a8
    python tools/quantize.py --model_path FLOAT_CKPT --output_path OUT --format ascend-w8a16 --layout typed

The ascend formats write msModelSlim's files in one of its two namings (--layout): `description`
(the default, what msModelSlim's current saver writes: quant_model_description.json and
quant_model_weights*.safetensors) or `typed` (its older saver's, which MindIE reads:
quant_model_description_<type>.json and quant_model_weight_<type>*.safetensors); the description
lists every tensor's type and model_quant_type, nothing else (the tool has no msModelSlim
arguments to record). config.json gets "quantize": "<type>" either way.

OUT must be a new or empty folder; --overwrite deletes what a non-empty one holds first (the loader
reads every weight file in a folder, so another checkpoint's would be loaded beside the new ones).

The formats (--format, listed below) and each one's tensors are modeling/quant_formats.py's
tables, the rounding modeling/quant_rounding.py's; tools/generate.py and tools/serve.py load the
output with the format detected. This tool reads, calibrates and writes.

Only the decoder's linear layers (q/k/v, o, gate/up, down) are quantized; the embedding, the LM
head and the vision tower stay float, as both tools' Qwen-VL recipes keep them. Weights: symmetric
per output channel, scale = max|w| / 127, q = round(w / scale). Static activation ranges come from
the float model run (this engine, eagerly, in one process: the float model must fit one device)
over --calib_prompts prompts about the bundled sample image (or --calib_images), their prompts and
16 greedy tokens each (reproducible). The other formats need no model run: tensors are streamed from the float
files to the output's, about 4 GiB at a time.
"""

from __future__ import annotations

import argparse
import json
import shutil
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from tqdm import tqdm

from qwen_vl_triton.modeling import quantization
from qwen_vl_triton.modeling import weight_table as table
from qwen_vl_triton.modeling.config import load_config
from qwen_vl_triton.modeling.quant_formats import (
    ASCEND,
    ASCEND_LAYOUTS,
    DEFAULT_LAYOUT,
    FLOAT,
    FORMATS,
    OUTPUT_FORMATS,
    OutputFormat,
)
from qwen_vl_triton.modeling.quant_rounding import quantize_layer
from qwen_vl_triton.modeling.weights import CheckpointReader

SHARD_BYTES = 4 << 30  # output files of at most about this size
CALIB_QUESTIONS = ("Describe this image.", "What colours are in the picture?", "Count the objects you see.",
                   "Write a short poem about it.", "What is written here?", "Where might this be?",
                   "Summarise the scene in one sentence.", "What happens next?")


# ----------------------------------------------------------------------------- calibration


@dataclass
class RangeObserver:
    """Stands in for a float linear weight during calibration (modeling.linear.linear calls it):
    records the smallest and largest input value, then computes F.linear. No host sync."""

    weight: torch.Tensor
    low: torch.Tensor | None = field(default=None)
    high: torch.Tensor | None = field(default=None)

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        lo, hi = x.detach().amin().float(), x.detach().amax().float()
        self.low = lo if self.low is None else torch.minimum(self.low, lo)
        self.high = hi if self.high is None else torch.maximum(self.high, hi)
        return F.linear(x, self.weight, bias)


def calibrate(model_path: Path, images: list[Path], prompts: int, device: str | None) -> dict[str, tuple[float, float]]:
    """Input range (low, high) of every decoder linear layer's weight name (q, k and v share theirs),
    over `prompts` requests about `images`, run by this engine on the float checkpoint."""
    from qwen_vl_triton.engine.llm import LLM, Prompt
    from qwen_vl_triton.engine.media import Media
    from qwen_vl_triton.engine.sampling import SamplingParams

    llm = LLM(model_path, device=device, enforce_eager=True, kv_cache_gb=1.0, max_batch_size=8)
    observers: dict[str, RangeObserver] = {}
    groups = {"qkv_weight": (table.Q_PROJ, table.K_PROJ, table.V_PROJ), "o_weight": (table.O_PROJ,),
              "gate_up_weight": (table.GATE_PROJ, table.UP_PROJ), "down_weight": (table.DOWN_PROJ,)}
    for i, layer in enumerate(llm.model.weights.language.layers):
        for attr, entries in groups.items():
            observer = RangeObserver(getattr(layer, attr))
            setattr(layer, attr, observer)
            observers.update({e.name(i): observer for e in entries})
    requests = [Prompt(CALIB_QUESTIONS[k % len(CALIB_QUESTIONS)],
                       media=[Media(images[k % len(images)], "image")] if images else [])
                for k in range(prompts)]
    try:
        llm.generate(requests, SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True), progress=True)
    finally:
        llm.shutdown()
    return {name: (float(o.low), float(o.high)) for name, o in observers.items()}


# ----------------------------------------------------------------------------- the checkpoint


def quantized_tensors(reader: CheckpointReader, num_layers: int, fmt: OutputFormat,
                      ranges: dict[str, tuple[float, float]] | None) -> Iterator[tuple[dict[str, torch.Tensor], str]]:
    """(tensors under their names in the file, their type: FLOAT or the layer's kind, as msModelSlim's
    description lists it) per source tensor; a quantized layer yields all of its tensors at once, its
    bias with them."""
    layers = {e.name(i) for e in quantization.QUANTIZABLE for i in range(num_layers)}
    biases = {n[: -len("weight")] + "bias" for n in layers}
    for name in tqdm(sorted(reader.names()), desc="quantizing", unit="tensor"):
        original = reader.original_name(name)
        if name in biases:
            continue  # written with its layer
        if name not in layers:
            yield {original: reader.get(name)}, FLOAT
            continue
        prefix_canon = name[: -len("weight")]
        prefix = original[: -len("weight")]
        bias = reader.get(prefix_canon + "bias") if prefix_canon + "bias" in reader else None
        value_range = ranges.get(name) if ranges is not None else None
        tensors = quantize_layer(fmt.layer, reader.get(name), bias, value_range)
        yield {prefix + s: t for s, t in tensors.items()}, fmt.layer.kind


def write_shards(out: Path, stem: str, pieces: Iterator[tuple[dict[str, torch.Tensor], str]]
                 ) -> dict[str, str]:
    """Write the tensors in files of about SHARD_BYTES (`stem`.safetensors, or `stem`-0000i-of-0000n
    plus `stem`.safetensors.index.json); returns every tensor name's type."""
    types: dict[str, str] = {}
    shards: list[list[str]] = []  # temporary file per shard, renamed once the count is known
    current: dict[str, torch.Tensor] = {}
    size = 0

    def flush() -> None:
        nonlocal current, size
        if current:
            path = out / f".{stem}-part{len(shards)}.safetensors"
            save_file({k: v.contiguous() for k, v in current.items()}, str(path), metadata={"format": "pt"})
            shards.append(list(current))
            current, size = {}, 0

    for tensors, kind in pieces:
        for name, t in tensors.items():
            types[name] = kind
            current[name] = t
            size += t.numel() * t.element_size()
        if size >= SHARD_BYTES:
            flush()
    flush()
    if len(shards) == 1:
        (out / f".{stem}-part0.safetensors").rename(out / f"{stem}.safetensors")
        return types
    weight_map = {}
    for k, names in enumerate(shards):
        file = f"{stem}-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        (out / f".{stem}-part{k}.safetensors").rename(out / file)
        weight_map.update(dict.fromkeys(names, file))
    index = {"metadata": {}, "weight_map": weight_map}
    (out / f"{stem}.safetensors.index.json").write_text(json.dumps(index, indent=1))
    return types


def check_output_folder(model_path: Path, output_path: Path, overwrite: bool) -> None:
    """ValueError unless `output_path` may receive the checkpoint: a new or empty folder, or (with
    `overwrite`) a non-empty one whose clearing leaves `model_path` alone. The loader reads every
    *.safetensors (or an index) in a folder, so another checkpoint's files left beside the new ones
    would be loaded with them."""
    if output_path.resolve() == model_path.resolve():
        raise ValueError("--output_path must differ from --model_path")
    if not output_path.exists():
        return
    if not output_path.is_dir():
        raise ValueError(f"--output_path {output_path} is a file, not a folder")
    entries = sorted(f.name for f in output_path.iterdir())
    if not entries:
        return
    if not overwrite:
        shown = ", ".join(entries[:5]) + (" ..." if len(entries) > 5 else "")
        raise ValueError(f"--output_path {output_path} is not empty ({len(entries)} entries: {shown}); another "
                         f"checkpoint's weights there would be loaded beside the new ones: choose a new or empty "
                         f"folder, or pass --overwrite to delete what it holds first")
    if model_path.resolve().is_relative_to(output_path.resolve()):
        raise ValueError(f"--overwrite would delete the float checkpoint {model_path}, which is inside "
                         f"--output_path {output_path}: choose another output folder")


def clear_folder(folder: Path) -> None:
    """Delete everything in `folder`, keeping the folder. A link is removed, never followed."""
    for entry in folder.iterdir():
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def quantize_checkpoint(model_path: Path, output_path: Path, fmt: str, calib_images: list[Path] | None = None,
                        calib_prompts: int = 8, device: str | None = None, overwrite: bool = False,
                        layout: str | None = None) -> Path:
    """Write `fmt`'s quantized copy of float checkpoint `model_path` to `output_path` (see the module
    docstring); the non-weight files (config, tokenizer, processor, chat template) are copied.
    `output_path` must be new or empty; `overwrite` deletes what a non-empty one holds first.
    layout: the ascend formats' file names (an ASCEND_LAYOUTS key; None: DEFAULT_LAYOUT)."""
    if fmt not in OUTPUT_FORMATS:
        raise ValueError(f"--format {fmt!r} is not one of {', '.join(FORMATS)}")
    output = OUTPUT_FORMATS[fmt]
    if layout is not None and output.layer.method != ASCEND:
        raise ValueError(f"--layout names msModelSlim's files; --format {fmt} writes compressed-tensors' "
                         f"(model*.safetensors, config.json's quantization_config): drop --layout")
    if layout is not None and layout not in ASCEND_LAYOUTS:
        raise ValueError(f"--layout {layout!r} is not one of {', '.join(ASCEND_LAYOUTS)}")
    model_path, output_path = Path(model_path), Path(output_path)
    num_layers = load_config(model_path).text.num_layers  # a clear error for a folder that is not a Qwen-VL one
    if (found := quantization.detect(model_path)) is not None:
        raise ValueError(f"{model_path} is already quantized ({found.describe()})")
    check_output_folder(model_path, output_path, overwrite)  # before calibration: a refusal costs nothing
    ranges = None
    if output.calibrated:
        from qwen_vl_triton.modeling.processing import SAMPLE_IMAGE_PATH

        ranges = calibrate(model_path, list(calib_images or [SAMPLE_IMAGE_PATH]), calib_prompts, device)
    if overwrite and output_path.is_dir():  # only now: a failed calibration leaves the old files in place
        clear_folder(output_path)
    output_path.mkdir(parents=True, exist_ok=True)
    for f in model_path.iterdir():  # everything but the float weights
        if f.is_file() and not f.name.endswith((".safetensors", ".safetensors.index.json")):
            shutil.copy2(f, output_path / f.name)
    reader = CheckpointReader(model_path)
    config = json.loads((model_path / "config.json").read_text())
    description_file, stem = output.files(layout or DEFAULT_LAYOUT)
    types = write_shards(output_path, stem, quantized_tensors(reader, num_layers, output, ranges))
    if description_file is not None:
        (output_path / description_file).write_text(json.dumps(output.description(types), indent=1) + "\n")
    config.update(output.config_entries())
    (output_path / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return output_path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    formats = "\n".join(textwrap.fill(f"{f.summary}; out = {f.layer.formula}", 100, initial_indent=f"  {f.name:<32}",
                                       subsequent_indent=" " * 34) for f in OUTPUT_FORMATS.values())
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=f"formats:\n{formats}", allow_abbrev=False)
    p.add_argument("--model_path", type=Path, required=True, help="the float checkpoint folder")
    p.add_argument("--output_path", type=Path, required=True,
                   help="where the quantized checkpoint goes: a new or empty folder (created if missing)")
    p.add_argument("--overwrite", action="store_true",
                   help="--output_path may be a non-empty folder: everything in it is deleted first")
    p.add_argument("--format", choices=FORMATS, required=True, help="output format (see the formats below)")
    p.add_argument("--layout", choices=tuple(ASCEND_LAYOUTS),
                   help="the ascend formats' file names (not for compressed-tensors): "
                        + "; ".join(f"{lay.name}: {lay.summary}" for lay in ASCEND_LAYOUTS.values())
                        + f". Default: {DEFAULT_LAYOUT}. The loader reads both")
    p.add_argument("--calib_images", type=Path, nargs="+",
                   help="images the static formats' calibration prompts ask about (default: the bundled sample)")
    p.add_argument("--calib_prompts", type=int, default=8, help="calibration requests (static formats)")
    p.add_argument("--device", help="device of the calibration run (default: the first accelerator, else cpu)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> Path:
    a = parse_args(argv)
    try:
        out = quantize_checkpoint(a.model_path, a.output_path, a.format, a.calib_images, a.calib_prompts, a.device,
                                  a.overwrite, a.layout)
    except (ValueError, OSError) as e:
        raise SystemExit(f"error: {e}") from None
    print(f"wrote {out} ({a.format})")
    return out


if __name__ == "__main__":
    main()
