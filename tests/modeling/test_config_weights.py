"""config.json parsing (flat hub layout and nested transformers-5 layout), the weight table and safetensors loading
(both weight-name layouts, shards, tied embeddings, slices, clear errors)."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from qwen_vl_triton.benchmarks.compile_check.launches import SHAPES_FILE
from qwen_vl_triton.modeling import weight_table
from qwen_vl_triton.modeling.config import ConfigError, load_config, parse_config
from qwen_vl_triton.modeling.weight_table import canonical_name
from qwen_vl_triton.modeling.weights import CheckpointReader, WeightsError, load_weights
from qwen_vl_triton.testing.tiny_checkpoint import make_tiny_checkpoint, special_token_ids

# The released checkpoints' shapes, kept in the repo for the compile check and the benchmarks.
SHAPES = json.loads(SHAPES_FILE.read_text())


def hub_config(shape: dict) -> dict:
    """A config.json as the released checkpoints have it (flat), from model_shapes.json's entry."""
    v = shape["vision"]
    if shape["arch"] == "qwen2_vl":
        vision = {"depth": v["depth"], "embed_dim": v["embed_dim"], "mlp_ratio": v["mlp_ratio"],
                  "num_heads": 16, "in_chans": 3, "hidden_size": v["out"], "patch_size": 14,
                  "spatial_merge_size": 2, "spatial_patch_size": 14, "temporal_patch_size": 2}
    else:
        vision = {"depth": v["depth"], "hidden_act": "silu", "hidden_size": v["hidden"],
                  "intermediate_size": v["intermediate"], "num_heads": 16, "in_chans": 3,
                  "out_hidden_size": v["out"],
                  "patch_size": 14, "spatial_merge_size": 2, "spatial_patch_size": 14,
                  "window_size": v["window_size"], "fullatt_block_indexes": v["fullatt_block_indexes"],
                  "tokens_per_second": v["tokens_per_second"], "temporal_patch_size": 2}
    return {
        "architectures": ["Qwen2VLForConditionalGeneration"], "model_type": shape["arch"],
        "bos_token_id": 151643, "eos_token_id": 151645, "vision_start_token_id": 151652,
        "vision_end_token_id": 151653, "vision_token_id": 151654, "image_token_id": 151655,
        "video_token_id": 151656, "hidden_act": "silu", "hidden_size": shape["hidden"],
        "intermediate_size": shape["intermediate"], "max_position_embeddings": 128000,
        "max_window_layers": shape["layers"], "num_attention_heads": shape["heads"],
        "num_hidden_layers": shape["layers"], "num_key_value_heads": shape["kv_heads"], "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0, "sliding_window": 32768, "tie_word_embeddings": shape["tied"],
        "torch_dtype": "bfloat16", "use_cache": True, "use_sliding_window": False, "vision_config": vision,
        "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]}, "vocab_size": shape["vocab"],
    }


def nested_from_transformers(flat: dict) -> dict:
    """The same config as transformers 5.x writes it (text_config, rope_parameters)."""
    from transformers import Qwen2_5_VLConfig, Qwen2VLConfig

    cls = Qwen2VLConfig if flat["model_type"] == "qwen2_vl" else Qwen2_5_VLConfig
    return json.loads(cls(**copy.deepcopy(flat)).to_json_string())


@pytest.mark.parametrize("name", [k for k in (SHAPES or {}) if not k.startswith("_")])
def test_released_shapes_parse_in_both_layouts(name: str) -> None:
    shape = SHAPES[name]
    flat = hub_config(shape)
    cfg = parse_config(flat)
    t, v = cfg.text, cfg.vision
    assert (cfg.model_type, t.hidden_size, t.intermediate_size, t.num_layers) == (
        shape["arch"], shape["hidden"], shape["intermediate"], shape["layers"])
    assert (t.num_heads, t.num_kv_heads, t.vocab_size, t.head_dim) == (
        shape["heads"], shape["kv_heads"], shape["vocab"], 128)
    assert t.mrope_section == (16, 24, 24) and t.rope_theta == 1e6 and t.rms_norm_eps == 1e-6
    assert cfg.tie_word_embeddings == shape["tied"] and cfg.torch_dtype == torch.bfloat16
    assert (cfg.image_token_id, cfg.video_token_id, cfg.vision_start_token_id) == (151655, 151656, 151652)
    assert cfg.eos_token_ids == (151645,)
    assert (v.depth, v.head_dim, v.out_hidden_size, v.patch_dim) == (32, 80, shape["hidden"], 3 * 2 * 14 * 14)
    if shape["arch"] == "qwen2_vl":
        assert (v.hidden_size, v.intermediate_size, v.norm) == (1280, 5120, "layernorm")
        assert v.window_size is None
    else:
        assert (v.hidden_size, v.norm) == (1280, "rmsnorm")
        assert v.intermediate_size == shape["vision"]["intermediate"]
        assert (v.window_size, v.fullatt_block_indexes, v.tokens_per_second) == (112, (7, 15, 23, 31), 2.0)
    nested = parse_config(nested_from_transformers(flat))
    assert nested == cfg


@pytest.mark.parametrize("arch", ["qwen2_vl", "qwen2_5_vl"])
def test_tiny_checkpoint_flat_and_nested_configs_agree(tmp_path: Path, arch: str) -> None:
    nested = load_config(make_tiny_checkpoint(tmp_path / "n", arch, layout="nested"))
    flat = load_config(make_tiny_checkpoint(tmp_path / "f", arch, layout="flat"))
    assert nested == flat
    ids = special_token_ids(512)
    assert nested.image_token_id == ids["<|image_pad|>"]  # read from config.json, not hardcoded
    # <|im_end|> from config.json, then <|endoftext|> from generation_config.json
    assert nested.eos_token_ids == (ids["<|im_end|>"], ids["<|endoftext|>"])


def test_missing_tokens_per_second_uses_qwen_release_value() -> None:
    flat = hub_config(SHAPES["Qwen2.5-VL-7B"])
    del flat["vision_config"]["tokens_per_second"]
    assert parse_config(flat).vision.tokens_per_second == 2.0  # not transformers' class default (4)


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d.update(model_type="llava"), "model_type 'llava' is not supported"),
    (lambda d: d.pop("num_attention_heads"), "num_attention_heads"),
    (lambda d: d.pop("vision_config"), "vision_config"),
    (lambda d: d["vision_config"].pop("embed_dim"), "embed_dim"),
    (lambda d: d.update(rope_scaling={"type": "mrope", "mrope_section": [16, 24, 16]}), "mrope_section"),
    (lambda d: d.pop("rope_scaling"), "mrope_section"),
    (lambda d: d.update(rope_scaling={"type": "yarn", "factor": 4, "mrope_section": [16, 24, 24]}), "yarn"),
    (lambda d: d.update(use_sliding_window=True), "use_sliding_window"),
    (lambda d: d.update(torch_dtype="float8"), "dtype"),
])
def test_config_errors_name_the_problem(mutate, message: str) -> None:
    d = {"model_type": "qwen2_vl", "hidden_size": 64, "num_attention_heads": 2, "num_hidden_layers": 1,
         "intermediate_size": 128, "vocab_size": 100,
         "rope_scaling": {"type": "mrope", "mrope_section": [4, 6, 6]},
         "vision_config": {"depth": 1, "embed_dim": 32, "num_heads": 2, "hidden_size": 64}}
    parse_config(copy.deepcopy(d))  # the unmutated dict is fine
    mutate(d)
    with pytest.raises(ConfigError, match=message):
        parse_config(d)


# ----------------------------------------------------------------------------- weights


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory) -> dict[str, Path]:
    """One Qwen2.5-VL model (seed 3) written in three ways."""
    root = tmp_path_factory.mktemp("weights")
    return {
        "transformers": make_tiny_checkpoint(root / "t", "qwen2_5_vl", seed=3),
        "legacy_flat": make_tiny_checkpoint(root / "l", "qwen2_5_vl", seed=3, layout="flat",
                                            weight_names="legacy"),
        "nested_sharded": make_tiny_checkpoint(root / "s", "qwen2_5_vl", seed=3,
                                               weight_names="language_model", sharded=True, num_shards=3),
    }


def _flatten(obj, prefix: str = "") -> dict[str, torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return {prefix: obj}
    if isinstance(obj, list):
        return {k: v for i, o in enumerate(obj) for k, v in _flatten(o, f"{prefix}.{i}").items()}
    if hasattr(obj, "__dataclass_fields__"):
        return {k: v for f in obj.__dataclass_fields__
                for k, v in _flatten(getattr(obj, f), f"{prefix}.{f}").items()}
    return {}


def test_weight_layouts_and_shards_load_identically(tiny_pair: dict[str, Path]) -> None:
    loaded = {k: _flatten(load_weights(p, load_config(p), torch.float32)) for k, p in tiny_pair.items()}
    ref = loaded["transformers"]
    assert len(list((tiny_pair["nested_sharded"]).glob("*.safetensors"))) == 3
    for name, tensors in loaded.items():
        assert tensors.keys() == ref.keys(), name
        for k in ref:
            assert torch.equal(tensors[k], ref[k]), (name, k)


def test_names_are_canonicalised() -> None:
    assert canonical_name("model.language_model.layers.3.mlp.up_proj.weight") == \
        "model.layers.3.mlp.up_proj.weight"
    assert canonical_name("model.visual.blocks.0.attn.qkv.bias") == "visual.blocks.0.attn.qkv.bias"
    assert canonical_name("model.language_model.embed_tokens.weight") == "model.embed_tokens.weight"
    assert canonical_name("lm_head.weight") == "lm_head.weight"
    assert canonical_name("visual.merger.mlp.0.weight") == "visual.merger.mlp.0.weight"


@pytest.mark.parametrize("arch", ["qwen2_vl", "qwen2_5_vl"])
def test_the_table_names_and_shapes_every_tensor_in_both_layouts(tmp_path: Path, arch: str) -> None:
    path = make_tiny_checkpoint(tmp_path / arch, arch, weight_names="language_model")
    config = load_config(path)
    stored = {k: list(v.shape) for k, v in load_file(str(path / "model.safetensors")).items()}
    entries = [(e, i) for e in weight_table.WEIGHTS if e.present(config)
               for i in (range(e.part.count(config)) if e.repeated else [None])]
    assert {e.name(i, nested=True): e.shape(config) for e, i in entries} == stored
    assert sorted(e.name(i) for e, i in entries) == sorted(weight_table.expected_names(config))
    assert all(weight_table.nested_name(canonical_name(n)) == n for n in stored)


def test_a_shape_that_contradicts_config_is_named(tiny_pair: dict[str, Path], tmp_path: Path) -> None:
    src = tiny_pair["transformers"]
    name = "model.layers.1.self_attn.o_proj.weight"  # not layer 0: every layer's shapes are checked
    bad = _copy_with(src, tmp_path / "bad", lambda t: t.update({name: t[name][:, :-1].contiguous()}))
    with pytest.raises(WeightsError, match=r"model\.layers\.1\.self_attn\.o_proj\.weight: shape \[128, 127\]"):
        load_weights(bad, load_config(bad), torch.float32)


def test_fused_layouts_match_the_checkpoint(tiny_pair: dict[str, Path]) -> None:
    path = tiny_pair["transformers"]
    cfg = load_config(path)
    w = load_weights(path, cfg, torch.float32)
    raw = {canonical_name(k): v for k, v in load_file(str(path / "model.safetensors")).items()}
    layer = w.language.layers[1]
    p = "model.layers.1."
    assert torch.equal(layer.qkv_weight, torch.cat([raw[p + f"self_attn.{x}_proj.weight"] for x in "qkv"]))
    assert torch.equal(layer.qkv_bias, torch.cat([raw[p + f"self_attn.{x}_proj.bias"] for x in "qkv"]))
    assert torch.equal(layer.gate_up_weight, torch.cat([raw[p + "mlp.gate_proj.weight"],
                                                         raw[p + "mlp.up_proj.weight"]]))
    blk = w.vision.blocks[0]
    assert torch.equal(blk.fc1_bias, torch.cat([raw["visual.blocks.0.mlp.gate_proj.bias"],
                                                raw["visual.blocks.0.mlp.up_proj.bias"]]))
    # The Conv3d patch embedding (stride == kernel) is one matmul over flattened patches.
    conv = raw["visual.patch_embed.proj.weight"]  # [E, C, tp, p, p]
    patches = torch.randn(5, cfg.vision.patch_dim, dtype=torch.float64)
    expected = F.conv3d(patches.view(5, *conv.shape[1:]), conv.double(), stride=conv.shape[2:]).view(5, -1)
    torch.testing.assert_close(F.linear(patches, w.vision.patch_embed.double()), expected)


def test_dtype_cast_and_fp16_vision_guard(tiny_pair: dict[str, Path]) -> None:
    path = tiny_pair["legacy_flat"]
    w = load_weights(path, load_config(path), torch.float16)
    assert w.language.layers[0].qkv_weight.dtype == torch.float16
    assert w.vision.patch_embed.dtype == torch.bfloat16 and w.vision_dtype == torch.bfloat16
    w = load_weights(path, load_config(path), torch.bfloat16)
    assert w.vision.patch_embed.dtype == torch.bfloat16 and w.language.lm_head.dtype == torch.bfloat16


def test_tied_embeddings(tmp_path: Path) -> None:
    path = make_tiny_checkpoint(tmp_path / "tied", "qwen2_vl", tie_word_embeddings=True)
    cfg = load_config(path)
    assert cfg.tie_word_embeddings
    w = load_weights(path, cfg, torch.float32)
    assert w.language.lm_head is w.language.embed_tokens
    # A tied checkpoint without lm_head.weight (as released 2B/3B checkpoints) loads too.
    tensors = load_file(str(path / "model.safetensors"))
    tensors.pop("lm_head.weight", None)
    save_file(tensors, str(path / "model.safetensors"))
    assert load_weights(path, cfg, torch.float32).language.lm_head is not None


def _copy_with(src: Path, dst: Path, edit) -> Path:
    shutil.copytree(src, dst)
    tensors = load_file(str(dst / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(dst / "model.safetensors"))
    return dst


def test_missing_and_unexpected_tensors_are_named(tiny_pair: dict[str, Path], tmp_path: Path) -> None:
    src = tiny_pair["transformers"]
    cfg = load_config(src)
    names = load_file(str(src / "model.safetensors")).keys()
    k_name = next(n for n in names if n.endswith("layers.1.self_attn.k_proj.bias"))
    missing = _copy_with(src, tmp_path / "missing", lambda t: t.pop(k_name))
    with pytest.raises(WeightsError, match=r"missing 1 tensor\(s\): model\.layers\.1\.self_attn\.k_proj\.b"):
        load_weights(missing, cfg, torch.float32)
    extra = _copy_with(src, tmp_path / "extra",
                       lambda t: t.update({"model.layers.9.foo.weight": torch.zeros(2)}))
    with pytest.raises(WeightsError, match=r"unexpected 1 tensor\(s\): model\.layers\.9\.foo\.weight"):
        load_weights(extra, cfg, torch.float32)
    untied = _copy_with(src, tmp_path / "untied", lambda t: t.pop("lm_head.weight"))
    with pytest.raises(WeightsError, match="lm_head.weight"):
        load_weights(untied, cfg, torch.float32)
    with pytest.raises(WeightsError, match="no \\*.safetensors"):
        CheckpointReader(tmp_path)


def test_reader_reads_slices_without_whole_tensors(tiny_pair: dict[str, Path]) -> None:
    reader = CheckpointReader(tiny_pair["nested_sharded"])
    name = "model.layers.0.mlp.down_proj.weight"
    full = reader.get(name)
    assert reader.shape(name) == list(full.shape)
    assert torch.equal(reader.get(name, (slice(None), slice(64, 128))), full[:, 64:128])
    assert torch.equal(reader.get(name, (slice(8, 16),)), full[8:16])
    assert name in reader and "model.layers.0.mlp.nope" not in reader
