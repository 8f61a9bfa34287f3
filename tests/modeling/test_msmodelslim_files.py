"""msModelSlim checkpoints as its savers and example scripts write them: both file namings
(quant_model_description.json + quant_model_weights*.safetensors; quant_model_description_<type>.json
+ quant_model_weight_<type>*.safetensors), sharded or not, with or without an index, descriptions
carrying the VLM example scripts' arguments (metadata, never an error) beside the tensors' types.
Each loads and gives the greedy tokens of the tool-written checkpoint's dequantized float reference;
the three description errors name the file and the problem; tools/quantize.py --layout round-trips.

Kernels run as their PyTorch references (QVL_KERNELS=torch): what is under test is which files and
keys the loader reads; the int8 kernels are tests/modeling/test_quantization.py's."""

from __future__ import annotations

import json
import logging
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from qwen_vl_triton.cli import quantize
from qwen_vl_triton.cli.quantize import quantize_checkpoint
from qwen_vl_triton.modeling import quantization
from qwen_vl_triton.modeling.linear import Int8Linear, dequantized
from qwen_vl_triton.modeling.model import load_model
from qwen_vl_triton.modeling.quant_formats import (
    ASCEND_LAYOUTS,
    DESCRIPTION_FILE,
    MODEL_QUANT_TYPE,
    MSMODELSLIM_LAYERS,
)
from qwen_vl_triton.modeling.quantization import TENSOR_SUFFIXES, MsModelSlimFormat, QuantizationError
from qwen_vl_triton.modeling.weights import CheckpointReader
from qwen_vl_triton.testing.tiny_checkpoint import make_tiny_checkpoint
from tests.modeling.greedy import greedy_generate
from tests.modeling.test_quantization import edit_json
from tests.parallel.test_tp_engine import TP_SIZES

FORMAT = {"W8A8": "ascend-w8a8", "W8A8_DYNAMIC": "ascend-w8a8-dynamic", "W8A16": "ascend-w8a16"}
PROMPT = torch.randint(0, 500, (9,), generator=torch.Generator().manual_seed(5))
STEPS = 3
DOWN = "model.layers.0.mlp.down_proj.weight"


def example_arguments(kind: str) -> dict[str, Any]:
    """What msModelSlim's VLM example scripts merge into the description: their argument dict
    (group_size 64 beside per-channel scales, anti_method "m2", ...) and the saver's own keys."""
    return {MODEL_QUANT_TYPE: kind, "version": "1.0.0", "w_bit": 8, "a_bit": 16 if kind == "W8A16" else 8,
            "is_dynamic": kind == "W8A8_DYNAMIC", "group_size": 64, "act_method": 3 if kind == "W8A8" else 1,
            "anti_method": "m2", "dev_type": "npu", "dev_id": 0, "disable_names": ["model.visual.merger.mlp.0",
                                                                                     "lm_head"],
            "disable_level": "L0", "fraction": 0.01, "co_sparse": False, "use_kvcache_quant": False,
            "is_lowbit": False, "w_sym": True, "mm_tensor": False, "open_outlier": True, "pr": 1.0,
            "nonuniform": False, "calib_file": "./calib_data/textvqa.jsonl", "kv_cache_type": None,
            "metadata": {}, "tokenizer_args": {"padding_side": "left"}}


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> dict[str, Path]:
    """tools/quantize.py's checkpoint per type (its default layout) of one float checkpoint with
    transformers >= 4.52's nested names (model.language_model.*), as msModelSlim sees them today."""
    root = tmp_path_factory.mktemp("msmodelslim")
    src = make_tiny_checkpoint(root / "float", "qwen2_5_vl", seed=5, weight_names="language_model", **TP_SIZES)
    return {kind: quantize_checkpoint(src, root / kind, fmt, calib_prompts=2) for kind, fmt in FORMAT.items()}


@pytest.fixture(scope="module", autouse=True)
def torch_kernels() -> Iterator[None]:
    """The kernels' PyTorch references, for the whole module (module scope: hypothesis's test too)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("QVL_KERNELS", "torch")
        yield


@pytest.fixture(scope="module")
def reference(written) -> dict[str, list[int]]:
    """The greedy tokens of each written checkpoint's dequantized float reference."""
    tokens = {}
    for kind, path in written.items():
        model = load_model(path, "float32")
        model.weights = dequantized(model.weights)
        tokens[kind] = greedy_generate(model, PROMPT, STEPS)[1]
    return tokens


def types_of(path: Path) -> dict[str, str]:
    """The tensor entries of a tool-written checkpoint's description (its one metadata key dropped)."""
    description = json.loads((path / DESCRIPTION_FILE).read_text())
    description.pop(MODEL_QUANT_TYPE)
    return description


def rewrite(src: Path, out: Path, layout: str, kind: str, shards: int = 1, index: bool = False,
            description: dict[str, Any] | None = None, quantize: str | None = "") -> Path:
    """`src` (a tool-written checkpoint of type `kind`) as msModelSlim's `layout` names its files:
    its tensors in `shards` files (the typed layout's shards numbered as the older saver did, without
    zero padding), an index when `index`, the description `description` (default: the tensors'
    types and the example scripts' arguments). quantize: config.json's (None: absent; "": kind's)."""
    out.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if not f.name.startswith("quant_model_"):
            shutil.copy2(f, out / f.name)
    tensors = {k: v for f in sorted(src.glob("*.safetensors")) for k, v in load_file(f).items()}
    description_file, stem = ASCEND_LAYOUTS[layout].files(kind)
    names = sorted(tensors)
    weight_map = {}
    for k in range(shards):
        part = names[k::shards]
        if shards == 1:
            file = f"{stem}.safetensors"
        else:
            file = f"{stem}-{k + 1:05d}-of-{shards:05d}.safetensors" if layout == "description" else \
                f"{stem}-{k + 1}-of-{shards}.safetensors"
        save_file({n: tensors[n] for n in part}, str(out / file))
        weight_map.update(dict.fromkeys(part, file))
    if index:
        (out / f"{stem}.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    if description is None:
        description = {**types_of(src), **example_arguments(kind)}
    (out / description_file).write_text(json.dumps(description))

    def set_quantize(config: dict) -> None:
        config.pop("quantize", None)
        if quantize is not None:
            config["quantize"] = quantize or kind.lower()

    edit_json(out / "config.json", set_quantize)
    return out


def greedy(path: Path) -> list[int]:
    return greedy_generate(load_model(path, "float32"), PROMPT, STEPS)[1]


# ----------------------------------------------------------------------------- both layouts load


FILES = {"one file": (1, False), "one file + index": (1, True), "2 shards": (2, False), "2 shards + index": (2, True)}


@pytest.mark.parametrize("files", FILES)
@pytest.mark.parametrize("kind", FORMAT)
@pytest.mark.parametrize("layout", ASCEND_LAYOUTS)
def test_both_layouts_load_with_the_example_scripts_keys(layout: str, kind: str, files: str, written, reference,
                                                        tmp_path: Path, caplog) -> None:
    shards, index = FILES[files]
    folder = rewrite(written[kind], tmp_path / "ckpt", layout, kind, shards, index)
    with caplog.at_level(logging.INFO, logger=quantization.__name__):
        model = load_model(folder, "float32")
    fmt = model.weights.quantization
    assert isinstance(fmt, MsModelSlimFormat) and fmt.metadata == example_arguments(kind)
    assert model.quantization == f"ascend (msModelSlim) {kind}"
    assert fmt.types[DOWN] == kind and isinstance(model.weights.language.layers[0].down_weight, Int8Linear)
    description_file = ASCEND_LAYOUTS[layout].files(kind)[0]
    assert f"from {description_file} and {shards} weight file(s)" in fmt.details()
    assert "anti_method='m2'" in fmt.details() and "group_size=64" in fmt.details()
    logged = [r.getMessage() for r in caplog.records if r.name == quantization.__name__]
    assert len(logged) == 1 and description_file in logged[0] and "anti_method='m2'" in logged[0]
    assert greedy_generate(model, PROMPT, STEPS)[1] == reference[kind]


@pytest.mark.parametrize("layout", ASCEND_LAYOUTS)
def test_config_json_may_lack_quantize(layout: str, written, reference, tmp_path: Path) -> None:
    folder = rewrite(written["W8A8_DYNAMIC"], tmp_path / "ckpt", layout, "W8A8_DYNAMIC", quantize=None)
    assert greedy(folder) == reference["W8A8_DYNAMIC"]


def test_of_several_descriptions_config_json_picks_one(written, reference, tmp_path: Path) -> None:
    """Two typed checkpoints (and an untyped description) in one folder: config.json's quantize
    picks the typed description, whose own weights are then read; without a pick, an error."""
    folder = rewrite(written["W8A8"], tmp_path / "ckpt", "typed", "W8A8")
    rewrite(written["W8A16"], folder, "typed", "W8A16", shards=2, index=True)
    (folder / DESCRIPTION_FILE).write_text(json.dumps(types_of(written["W8A8_DYNAMIC"])))
    for kind in ("W8A16", "W8A8"):
        edit_json(folder / "config.json", lambda c, k=kind: c.update(quantize=k.lower()))
        model = load_model(folder, "float32")
        assert model.quantization == f"ascend (msModelSlim) {kind}"
        assert model.weights.language.layers[0].down_weight.activations is MSMODELSLIM_LAYERS[kind].scheme
        assert greedy_generate(model, PROMPT, STEPS)[1] == reference[kind]
    for switch, said in ((None, "config.json has no quantize"),
                         ("w8a8_dynamic", "config.json says quantize='w8a8_dynamic', which matches none of them")):
        edit_json(folder / "config.json", lambda c, q=switch: c.update(quantize=q))
        with pytest.raises(QuantizationError, match=re.escape(f"has 3 msModelSlim descriptions ({DESCRIPTION_FILE}, "
                                                              f"quant_model_description_w8a16.json, "
                                                              f"quant_model_description_w8a8.json) and {said}")):
            load_model(folder, "float32")


def test_the_tools_earlier_naming_loads_and_a_float_index_is_not_read(written, reference, tmp_path: Path) -> None:
    """quant_model_description.json beside quant_model_weight_<type>.safetensors (tools/quantize.py's
    names before --layout), and a model.safetensors.index.json copied over from the float model,
    naming files that are not there: the description's weights are read, the index is not."""
    folder = rewrite(written["W8A16"], tmp_path / "ckpt", "description", "W8A16")
    (folder / "quant_model_weights.safetensors").rename(folder / "quant_model_weight_w8a16.safetensors")
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"lm_head.weight": "model-00001-of-00002.safetensors"}}))
    assert greedy(folder) == reference["W8A16"]


def test_an_index_naming_an_absent_shard_is_an_error(written, tmp_path: Path) -> None:
    folder = rewrite(written["W8A16"], tmp_path / "ckpt", "description", "W8A16", shards=2, index=True)
    (folder / "quant_model_weights-00002-of-00002.safetensors").unlink()
    with pytest.raises(QuantizationError, match=r"quant_model_weights.safetensors.index.json lists 1 weight file\(s\) "
                                                r".* lacks: quant_model_weights-00002-of-00002.safetensors"):
        load_model(folder, "float32")


# ----------------------------------------------------------------------------- the three errors


ERRORS = {
    "unsupported type": (lambda d: d.update({DOWN: "W4A8_DYNAMIC"}),
                         f"quant_model_description_w8a8.json: tensor {DOWN} has type 'W4A8_DYNAMIC', which is not "
                         f"supported; supported types: FLOAT, W8A16, W8A8_DYNAMIC, W8A8_MIX, W8A8"),
    "unsupported type, absent tensor": (lambda d: d.update({"model.layers.7.mlp.up_proj.weight_scale": "W4A16"}),
                                        "tensor model.layers.7.mlp.up_proj.weight_scale has type 'W4A16'"),
    "unlisted int8 tensor": (lambda d: d.pop("model.language_model.layers.1.mlp.down_proj.weight"),
                             "quant_model_description_w8a8.json does not list 1 int8 tensor(s) of the weight files, "
                             "so their quantization type is unknown: model.layers.1.mlp.down_proj.weight"),
    "another model's names": (lambda d: [d.update({"transformer." + k: d.pop(k)}) for k in [k for k in d if "." in k]],
                              "quant_model_description_w8a8.json lists no tensor of the checkpoint's weight files"),
    "metadata alone": (lambda d: [d.pop(k) for k in [k for k in d if "." in k]],
                       "quant_model_description_w8a8.json lists no tensor of the checkpoint's weight files (its 0 "
                       "tensor entries"),
}


@pytest.mark.parametrize("error", ERRORS)
def test_description_errors_name_the_file_and_the_problem(error: str, written, tmp_path: Path) -> None:
    change, message = ERRORS[error]
    description = {**types_of(written["W8A8"]), **example_arguments("W8A8")}
    change(description)
    folder = rewrite(written["W8A8"], tmp_path / "ckpt", "typed", "W8A8", description=description)
    with pytest.raises(QuantizationError, match=re.escape(message)):
        load_model(folder, "float32")


# ----------------------------------------------------------------------------- metadata never breaks loading


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
                    max_leaves=6)
KEYS = st.text(st.characters(codec="ascii", exclude_characters="\x00"), min_size=1, max_size=24)


@settings(max_examples=60)
@given(extra=st.dictionaries(KEYS, JSON, max_size=6))
def test_any_metadata_is_kept_and_changes_nothing(extra: dict[str, Any], written) -> None:
    """Keys that name no tensor of the files (and, with a string value, end in no tensor suffix)
    are metadata whatever they and their values are (kv_cache_type aside, a truthy one being
    KV-cache quantization): the tensor types are the same."""
    path = written["W8A8_DYNAMIC"]
    reader = CheckpointReader(path)
    stored = {n: reader.dtype_name(n) for n in reader.names()}
    types = types_of(path)
    extra = {k: v for k, v in extra.items() if k not in types and k != "kv_cache_type"
             and not (isinstance(v, str) and k.endswith(TENSOR_SUFFIXES))}
    fmt = MsModelSlimFormat({**types, **extra}, stored)
    baseline = MsModelSlimFormat(types, stored)
    assert fmt.metadata == extra and fmt.types == baseline.types
    assert all(repr(v) in fmt.details() for v in extra.values())


# ----------------------------------------------------------------------------- the tool's --layout


@pytest.mark.parametrize("layout", ASCEND_LAYOUTS)
def test_quantize_tool_layout_round_trip(layout: str, written, reference, tmp_path: Path, monkeypatch) -> None:
    """--layout's files, one and sharded: the names msModelSlim gives them, loaded to the same tokens."""
    src = written["W8A16"].parent / "float"
    description_file, stem = ASCEND_LAYOUTS[layout].files("W8A16")
    for sharded in (False, True):
        if sharded:
            monkeypatch.setattr(quantize, "SHARD_BYTES", 256 << 10)
        out = quantize.main(["--model_path", str(src), "--output_path", str(tmp_path / f"{layout}-{sharded}"),
                             "--format", "ascend-w8a16", "--layout", layout])
        shards = sorted(f.name for f in out.glob("*.safetensors"))
        n = len(shards)
        want = [f"{stem}-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)] if sharded else \
            [f"{stem}.safetensors"]
        assert shards == want and (n > 1) == sharded
        assert (out / description_file).is_file() and (out / f"{stem}.safetensors.index.json").is_file() == (n > 1)
        assert json.loads((out / "config.json").read_text())["quantize"] == "w8a16"
        assert greedy(out) == reference["W8A16"]
    with pytest.raises(SystemExit, match="--layout names msModelSlim's files; --format compressed-tensors-w8a8"):
        quantize.main(["--model_path", str(src), "--output_path", str(tmp_path / "ct"), "--format",
                       "compressed-tensors-w8a8", "--layout", layout])
