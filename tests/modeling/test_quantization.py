"""Quantized checkpoints: what tools/quantize.py writes follows each format's spec; what the loader
makes of a file computes the format's own formula (float64, from the raw tensors, not through the
loader), on the Triton kernels and under tensor parallelism; the int8 model matches its
dequantized float reference; unsupported checkpoints fail with an error naming the problem."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from qwen_vl_triton.cli.quantize import quantize_checkpoint
from qwen_vl_triton.kernels import _backend
from qwen_vl_triton.modeling import quantization
from qwen_vl_triton.modeling import weight_table as table
from qwen_vl_triton.modeling.config import load_config
from qwen_vl_triton.modeling.linear import Activations, Int8Linear, dequantized, weight_bytes
from qwen_vl_triton.modeling.model import load_model
from qwen_vl_triton.modeling.quant_formats import FORMATS, OUTPUT_FORMATS
from qwen_vl_triton.modeling.quantization import DESCRIPTION_FILE, QuantizationError
from qwen_vl_triton.modeling.weight_table import canonical_name
from qwen_vl_triton.modeling.weights import CheckpointReader
from qwen_vl_triton.parallel import TPGroup
from qwen_vl_triton.testing.tiny_checkpoint import make_tiny_checkpoint
from tests.modeling.greedy import greedy_generate
from tests.parallel.test_tp_engine import TP_SIZES

STATIC = {"ascend-w8a8", "compressed-tensors-w8a8-static"}


@pytest.fixture(scope="module")
def float_checkpoints(tmp_path_factory) -> dict[tuple[str, str], Path]:
    """Float checkpoints by (arch, dtype); TP_SIZES so that 2 ranks split every layer."""
    root = tmp_path_factory.mktemp("float")
    return {(arch, dtype): make_tiny_checkpoint(root / f"{arch}-{dtype}", arch, seed=3, dtype=dtype, **TP_SIZES)
            for arch, dtype in (("qwen2_vl", "float32"), ("qwen2_5_vl", "float32"), ("qwen2_5_vl", "float16"),
                                ("qwen2_vl", "bfloat16"))}


@pytest.fixture(scope="module")
def quantized(float_checkpoints, tmp_path_factory):
    """quantized(fmt, arch, dtype) -> a cached quantized copy."""
    root = tmp_path_factory.mktemp("quantized")
    made: dict[tuple[str, str, str], Path] = {}

    def get(fmt: str, arch: str = "qwen2_5_vl", dtype: str = "float32") -> Path:
        key = (fmt, arch, dtype)
        if key not in made:
            made[key] = quantize_checkpoint(float_checkpoints[arch, dtype], root / "-".join(key), fmt, calib_prompts=2)
        return made[key]

    return get


def copy_of(path: Path, tmp_path: Path) -> Path:
    out = tmp_path / path.name
    shutil.copytree(path, out)
    return out


def load_files(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint folder, by its canonical name (the file's name as `raw_name`)."""
    return {canonical_name(k): v for f in folder.glob("*.safetensors") for k, v in load_file(f).items()}


def file_names(folder: Path) -> set[str]:
    return {k for f in folder.glob("*.safetensors") for k in load_file(f)}


def edit_tensors(folder: Path, change) -> None:
    """Rewrite every safetensors file of `folder` with change(tensors: dict) applied in place."""
    for f in folder.glob("*.safetensors"):
        tensors = load_file(f)
        change(tensors)
        save_file(tensors, f)


def edit_json(path: Path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


# ----------------------------------------------------------------------------- the writer


@pytest.mark.parametrize("fmt", FORMATS)
def test_quantize_tool_writes_the_format(fmt: str, quantized, float_checkpoints) -> None:
    dtype = "float16" if fmt == "ascend-w8a8" else "float32"
    ckpt = quantized(fmt, "qwen2_5_vl", dtype)
    model_dtype = getattr(torch, dtype)
    files = load_files(ckpt)
    q = "model.layers.0.self_attn.q_proj."
    down = "model.layers.1.mlp.down_proj."
    n_q = files[q + "weight"].shape[0]
    for p in (q, down):
        assert files[p + "weight"].dtype == torch.int8
    for name in ("visual.blocks.0.attn.qkv.weight", "lm_head.weight", "model.embed_tokens.weight"):
        assert files[name].dtype == model_dtype, name  # the ViT, the LM head and the embedding stay float
    config = json.loads((ckpt / "config.json").read_text())
    if fmt.startswith("ascend"):
        kind = {"ascend-w8a8": "W8A8", "ascend-w8a8-dynamic": "W8A8_DYNAMIC", "ascend-w8a16": "W8A16"}[fmt]
        assert [f.name for f in ckpt.glob("*.safetensors")] == ["quant_model_weights.safetensors"]  # --layout's default
        description = json.loads((ckpt / DESCRIPTION_FILE).read_text())
        assert description["model_quant_type"] == kind and config["quantize"] == kind.lower()
        assert set(description) - {"model_quant_type"} == file_names(ckpt)
        assert {canonical_name(k): v for k, v in description.items()}[q + "weight"] == kind
        assert files[q + "weight_scale"].dtype == torch.float32 and files[q + "weight_scale"].shape == (n_q, 1)
        assert not files[q + "weight_offset"].any()
        if kind == "W8A8":
            assert files[q + "input_scale"].dtype == model_dtype and files[q + "input_scale"].shape == (1,)
            assert files[q + "input_offset"].dtype == model_dtype and files[q + "input_offset"].shape == (1,)
            assert files[q + "quant_bias"].dtype == torch.int32 and files[q + "quant_bias"].shape == (n_q,)
            assert files[q + "deq_scale"].dtype == torch.int64  # an fp16 model: float32 bits, for Ascend
            deq = files[q + "deq_scale"].to(torch.int32).view(torch.float32)
            expected = files[q + "input_scale"].float() * files[q + "weight_scale"].float()[:, 0]
            torch.testing.assert_close(deq, expected, rtol=0, atol=0)
    else:
        qc = config["quantization_config"]
        assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "int-quantized"
        assert "lm_head" in qc["ignore"]
        acts = qc["config_groups"]["group_0"]["input_activations"]
        assert (acts["strategy"], acts["dynamic"]) == (("tensor", False) if fmt in STATIC else ("token", True))
        assert files[q + "weight_scale"].dtype == model_dtype and files[q + "weight_scale"].shape == (n_q, 1)
        assert (q + "input_scale" in files) == (fmt in STATIC)
    # what dequantizes back is the float weight, within half a step per channel
    w = load_files(float_checkpoints["qwen2_5_vl", dtype])[q + "weight"].float()
    scale = files[q + "weight_scale"].float().reshape(-1, 1)
    assert ((files[q + "weight"].float() * scale - w).abs() <= scale / 2 + 1e-6).all()


@pytest.mark.parametrize(("fmt", "arch", "dtype"), [*((f, "qwen2_5_vl", "float32") for f in FORMATS),
                                                    ("ascend-w8a8", "qwen2_5_vl", "float16"),
                                                    ("compressed-tensors-w8a8", "qwen2_vl", "bfloat16")])
def test_quantize_tool_writes_the_table_the_loader_reads(fmt: str, arch: str, dtype: str, quantized) -> None:
    """Every decoder linear layer of the tool's output has the tensors of the table the loader maps
    it to (the required ones, others only from the table), each in the table's dtype and shape, which
    the loader's checks take. (Checkpoints the other tests make: fp16 gives deq_scale's int64 bits.)"""
    ckpt, layer = quantized(fmt, arch, dtype), OUTPUT_FORMATS[fmt].layer
    files, reader, quant = load_files(ckpt), CheckpointReader(ckpt), quantization.detect(ckpt)
    for name in (e.name(i) for e in quantization.QUANTIZABLE for i in range(load_config(ckpt).text.num_layers)):
        scheme = quant.scheme(name, reader.original_name(name))
        assert quant.layout(name, scheme) is layer
        prefix, (n, k) = name[: -len("weight")], files[name].shape
        written = {f for f in files if f.startswith(prefix)}
        required, optional = quant.tensor_names(name, scheme)
        assert {name, *required} <= written <= {name, *required, *optional}
        for f in written:
            spec = layer.spec(f[len(prefix):])
            assert files[f].dtype == spec.dtype.dtype_for(getattr(torch, dtype)), f
            assert tuple(files[f].shape) == spec.size(n, k), f
            assert reader.dtype_name(f) in spec.dtype.accepted and spec.fits(reader.shape(f), n, k), f


# ----------------------------------------------------------------------------- each format's formula


def round_half_away(y: torch.Tensor) -> torch.Tensor:
    return torch.where(y >= 0, torch.floor(y + 0.5), -torch.floor(0.5 - y))


def spec_output(folder: Path, prefix: str, x: torch.Tensor, inputs: slice = slice(None)) -> torch.Tensor:
    """Layer `prefix` ('model.layers.0.mlp.down_proj.') of x [T, K] in float64, by the format's own
    definition from the raw tensors (activation quantization done in fp32, as the formats define the
    scale's reciprocal). inputs: only these input features (a row-parallel rank's share, per-token
    formats: each rank quantizes its own share of every token)."""
    f = load_files(folder)
    w = f[prefix + "weight"].double()[:, inputs]
    x = x[:, inputs]
    bias = f[prefix + "bias"].double() if prefix + "bias" in f else 0.0
    if (folder / DESCRIPTION_FILE).is_file():
        kind = {canonical_name(k): v for k, v in json.loads((folder / DESCRIPTION_FILE).read_text()).items()}[
            prefix + "weight"]
    else:
        acts = json.loads((folder / "config.json").read_text())["quantization_config"]["config_groups"]["group_0"][
            "input_activations"]
        kind = "CT_STATIC" if not acts["dynamic"] else "W8A8_DYNAMIC"
    scale = f[prefix + "weight_scale"].double().reshape(-1)
    if kind == "W8A16":
        offset = f[prefix + "weight_offset"].double().reshape(-1, 1)
        return x.double() @ ((w - offset) * scale[:, None]).T + bias
    if kind == "W8A8_DYNAMIC":
        s = x.float().abs().amax(-1, keepdim=True) / 127
        xq = round_half_away(x.float() * (1 / s)).clamp(-127, 127)
        return (xq.double() @ w.T) * s.double() * scale + bias
    s = f[prefix + "input_scale"].float()
    if kind == "CT_STATIC":  # x_q = round(x / s) + zp; x ~ (x_q - zp) * s
        zp = f[prefix + "input_zero_point"].double() if prefix + "input_zero_point" in f else 0.0
        xq = (round_half_away(x.float() * (1 / s)) + zp).clamp(-128, 127)
        return ((xq.double() - zp) @ w.T) * s.double() * scale + bias
    # msModelSlim W8A8: x_q = x / input_scale + input_offset; out = (x_q W + quant_bias) * deq_scale
    xq = round_half_away(x.float() * (1 / s) + f[prefix + "input_offset"].float()).clamp(-128, 127)
    deq = f[prefix + "deq_scale"]
    deq = deq.to(torch.int32).view(torch.float32) if deq.dtype == torch.int64 else deq
    return (xq.double() @ w.T + f[prefix + "quant_bias"].double()) * deq.double()


def asymmetric_variant(fmt: str, folder: Path) -> None:
    """Edit a tool-made checkpoint into what other writers may produce: whole-number W8A16 weight
    offsets (msModelSlim's asymmetric weights), a k_proj calibrated apart from q and v (its own input
    scale: the fused qkv quantizes its input twice), compressed-tensors input zero points."""
    g = torch.Generator().manual_seed(1)

    def change(tensors: dict[str, torch.Tensor]) -> None:
        for name in list(tensors):
            if fmt == "ascend-w8a16" and name.endswith(".weight_offset"):
                tensors[name] = torch.randint(-9, 10, tensors[name].shape, generator=g).to(tensors[name].dtype)
            if fmt == "ascend-w8a8" and name.endswith("k_proj.input_scale"):
                base = name[: -len("input_scale")]
                tensors[name] = tensors[name] * 1.25
                tensors[base + "deq_scale"] = tensors[base + "deq_scale"] * 1.25
            if fmt == "compressed-tensors-w8a8-static" and name.endswith(".input_scale"):
                tensors[name[: -len("input_scale")] + "input_zero_point"] = torch.tensor([7], dtype=torch.int8)

    edit_tensors(folder, change)
    if fmt == "compressed-tensors-w8a8-static":
        edit_json(folder / "config.json", lambda c: c["quantization_config"]["config_groups"]["group_0"][
            "input_activations"].update(symmetric=False))


LAYER0 = {"qkv_weight": (table.Q_PROJ, table.K_PROJ, table.V_PROJ), "gate_up_weight": (table.GATE_PROJ, table.UP_PROJ),
          "down_weight": (table.DOWN_PROJ,)}


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("world", [1, 2])
def test_loaded_layers_compute_the_formats_formula(fmt: str, world: int, quantized, tmp_path: Path) -> None:
    """On the Triton kernels: layer 0's fused qkv, gate_up and down as loaded equal the format's
    formula on the file's tensors; under 2 ranks each rank's column-parallel output is its slice of
    it, and the row-parallel partial sums add up to it (msModelSlim's quant_bias on rank 0 only)."""
    folder = copy_of(quantized(fmt, "qwen2_vl" if world == 1 else "qwen2_5_vl"), tmp_path)
    asymmetric_variant(fmt, folder)
    reader = CheckpointReader(folder)
    config = load_config(folder)
    ranks = [TPGroup(rank=r, world_size=world) for r in range(world)]
    models = [load_model(folder, "float32", tp=tp) for tp in ranks]
    before = _backend.launch_counts["int8_matmul"] + _backend.launch_counts["w8a16_matmul"]
    g = torch.Generator().manual_seed(world)
    for attr, entries in LAYER0.items():
        shapes = [reader.shape(e.name(0)) for e in entries]
        x = torch.randn(5, shapes[0][1], generator=g) * 3
        expected = [spec_output(folder, e.name(0)[: -len("weight")], x) for e in entries]
        partial_sums = []
        for tp, model in zip(ranks, models, strict=True):
            layer = model.weights.language.layers[0]
            op = getattr(layer, attr)
            assert isinstance(op, Int8Linear)
            bias = layer.qkv_bias if attr == "qkv_weight" else None
            if attr == "down_weight":  # row-parallel: this rank's share of the inputs
                spec = entries[0].shard_spec(shapes[0], config, tp)
                rank_x = x if spec.dim is None else torch.cat([x[:, a:b] for a, b in spec.ranges], -1)
                partial_sums.append(op(rank_x, bias).double())
                continue
            want = torch.cat([e_out if (spec := e.shard_spec(shape, config, tp)).dim is None else
                              torch.cat([e_out[:, a:b] for a, b in spec.ranges], -1)
                              for e, shape, e_out in zip(entries, shapes, expected, strict=True)], -1)
            assert_close_to(op(x, bias).double(), want, (fmt, attr, tp.rank))
        if partial_sums:
            if models[0].weights.language.layers[0].down_weight.activations is Activations.PER_TOKEN and world > 1:
                expected[0] = sum(spec_output(  # each rank's per-token scales are its own
                    folder, entries[0].name(0)[: -len("weight")], x, slice(a, b))
                                  for tp in ranks for a, b in entries[0].shard_spec(shapes[0], config, tp).ranges)
            assert_close_to(torch.stack(partial_sums).sum(0), expected[0], (fmt, attr, "sum"))
    assert _backend.launch_counts["int8_matmul"] + _backend.launch_counts["w8a16_matmul"] > before


def assert_close_to(got: torch.Tensor, want: torch.Tensor, what) -> None:
    """Within fp32 rounding of the output's scale."""
    err = float((got - want).abs().max() / want.abs().max())
    assert err < 2e-5, (what, err)


# ----------------------------------------------------------------------------- the whole model


@pytest.mark.parametrize("fmt", FORMATS)
def test_int8_model_matches_its_dequantized_reference(fmt: str, quantized) -> None:
    """The exactness test: greedy tokens and logits of the model on the Triton int8 kernels equal
    those of the same checkpoint as float math (dequantized weights, activations quantized and
    dequantized: modeling.linear.DequantizedLinear), within fp32 rounding."""
    arch = "qwen2_vl" if FORMATS.index(fmt) % 2 else "qwen2_5_vl"
    model = load_model(quantized(fmt, arch), "float32")
    assert model.quantization != "none"
    ids = torch.randint(0, 500, (13,), generator=torch.Generator().manual_seed(7))
    before = _backend.launch_counts["int8_matmul"] + _backend.launch_counts["w8a16_matmul"]
    logits, tokens = greedy_generate(model, ids, 4)
    assert _backend.launch_counts["int8_matmul"] + _backend.launch_counts["w8a16_matmul"] > before
    model.weights = dequantized(model.weights)
    ref_logits, ref_tokens = greedy_generate(model, ids, 4)
    assert tokens == ref_tokens
    for got, want in zip(logits, ref_logits, strict=True):
        assert_close_to(got.double(), want.double(), fmt)


def test_weights_take_half_the_memory_of_bf16(quantized, float_checkpoints) -> None:
    """The quantized decoder linears hold 1 byte a weight plus fp32 scales: about half of bf16."""
    float_model = load_model(float_checkpoints["qwen2_vl", "bfloat16"], "bfloat16")
    quant_model = load_model(quantized("compressed-tensors-w8a8", "qwen2_vl", "bfloat16"), "bfloat16")

    def linear_bytes(model) -> int:
        return sum(weight_bytes(getattr(layer, attr)) for layer in model.weights.language.layers for attr in LAYER0)

    ratio = linear_bytes(quant_model) / linear_bytes(float_model)
    assert 0.5 <= ratio < 0.52, ratio
    assert quant_model.weight_bytes < float_model.weight_bytes


# ----------------------------------------------------------------------------- errors


def _describe(change):
    return lambda folder: edit_json(folder / DESCRIPTION_FILE, change)


def _mark(name: str, kind: str):
    return _describe(lambda d: d.update({name: kind}))


def _ct(change):
    def apply(c: dict) -> None:
        change(c["quantization_config"])
    return lambda folder: edit_json(folder / "config.json", apply)


ERRORS = [
    ("ascend-w8a8", _mark("visual.blocks.0.attn.qkv.weight", "W8A8"), "only the decoder's linear layers"),
    ("ascend-w8a8", _describe(lambda d: d.update(kv_cache_type="C8")), "KV-cache quantization"),
    ("ascend-w8a8", _mark("model.layers.0.self_attn.q_proj.weight", "FLOAT"), "is int8, but"),
    ("ascend-w8a8", _mark("model.layers.0.self_attn.k_proj.weight", "W8A16"), "must share a quantization scheme"),
    ("ascend-w8a8", _mark("model.layers.0.mlp.down_proj.weight", "W4A16"), "W4A16"),
    ("ascend-w8a8", lambda f: edit_tensors(f, lambda t: t.pop("model.layers.1.mlp.down_proj.deq_scale")),
     "missing 1 tensor(s): model.layers.1.mlp.down_proj.deq_scale"),
    ("ascend-w8a16", lambda f: edit_tensors(f, lambda t: t.update(
        {"model.layers.0.mlp.up_proj.weight_scale": t["model.layers.0.mlp.up_proj.weight_scale"][:3]})),
     "expected [250] or [250, 1]"),
    ("compressed-tensors-w8a8", _ct(lambda q: q.update(format="pack-quantized")), "'pack-quantized' is not supported"),
    ("compressed-tensors-w8a8", _ct(lambda q: q["config_groups"]["group_0"]["weights"].update(symmetric=False)),
     "asymmetric weights"),
    ("compressed-tensors-w8a8", _ct(lambda q: q["config_groups"]["group_0"]["weights"].update(strategy="group")),
     "weight strategy 'group'"),
    ("compressed-tensors-w8a8", _ct(lambda q: q.update(ignore=[])), "lm_head.weight is"),
    ("compressed-tensors-w8a8", _ct(lambda q: q.update(quant_method="awq")), "'awq' is not supported"),
]


@pytest.mark.parametrize(("fmt", "change", "message"), ERRORS, ids=[e[2][:30] for e in ERRORS])
def test_unsupported_checkpoints_fail_clearly(fmt, change, message, quantized, tmp_path: Path) -> None:
    folder = copy_of(quantized(fmt, "qwen2_5_vl"), tmp_path)
    change(folder)
    with pytest.raises(ValueError, match=re.escape(message)):
        load_model(folder, "float32")


def test_quantization_flag_must_match_the_checkpoint(quantized, float_checkpoints) -> None:
    ascend = quantized("ascend-w8a8-dynamic", "qwen2_5_vl")
    assert load_model(ascend, "float32", quantization="msmodelslim").quantization == "ascend (msModelSlim) W8A8_DYNAMIC"
    with pytest.raises(QuantizationError, match="does not match the checkpoint, which is ascend"):
        load_model(ascend, "float32", quantization="compressed-tensors")
    with pytest.raises(QuantizationError, match="is a float checkpoint"):
        load_model(float_checkpoints["qwen2_5_vl", "float32"], "float32", quantization="ascend")
    with pytest.raises(QuantizationError, match="'gptq' is not one of"):
        load_model(ascend, "float32", quantization="gptq")
    float_copy = float_checkpoints["qwen2_5_vl", "float32"]
    assert load_model(float_copy, "float32").quantization == "none"


# ----------------------------------------------------------------------------- msModelSlim variants


def anti_outlier_variant(folder: Path, legacy: bool, shift: int = 3) -> None:
    """Rewrite a W8A8 checkpoint as msModelSlim's anti-outlier output of the same model: each decoder
    norm's output doubled and shifted by `shift` activation steps (weight * 2, bias = shift * the new
    scale), its linears' input scales doubled and offsets lowered by `shift`: every int8 activation,
    and so every output, is unchanged exactly when the loader applies both the norm weight and bias.
    legacy: the pair as norm.module.weight / norm.module.bias beside the unchanged norm.weight."""
    followers = {"input_layernorm": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                 "post_attention_layernorm": ("mlp.gate_proj", "mlp.up_proj")}

    def change(t: dict[str, torch.Tensor]) -> None:
        for name in [n for n in t if n.endswith(tuple(f"{norm}.weight" for norm in followers))]:
            stem, norm = name[: -len("weight")], name.split(".")[-2]
            layer = stem[: -len(norm) - 2]
            scale = None
            for linear in followers[norm]:
                p = f"{layer}.{linear}."
                t[p + "input_scale"] = t[p + "input_scale"] * 2
                assert -128 + shift <= float(t[p + "input_offset"]) <= 127
                t[p + "input_offset"] = t[p + "input_offset"] - shift
                scale = t[p + "input_scale"].float()
            bias = (shift * scale).expand_as(t[name]).to(torch.float32).clone()
            if legacy:
                t[stem + "module.weight"], t[stem + "module.bias"] = t[name] * 2, bias
            else:
                t[name], t[stem + "bias"] = t[name] * 2, bias

    edit_tensors(folder, change)
    names = file_names(folder)
    edit_json(folder / DESCRIPTION_FILE, lambda d: d.update({n: "FLOAT" for n in names if n not in d}))


@pytest.mark.parametrize("legacy", [False, True], ids=["norm.bias", "norm.module"])
def test_anti_outlier_norms_are_applied(legacy: bool, quantized, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("QVL_KERNELS", "torch")  # the arithmetic under test is the loader's, not a kernel's
    original = quantized("ascend-w8a8", "qwen2_vl")
    variant = copy_of(original, tmp_path)
    anti_outlier_variant(variant, legacy)
    ids = torch.randint(0, 500, (11,), generator=torch.Generator().manual_seed(3))
    want_logits, want = greedy_generate(load_model(original, "float32"), ids, 5)
    model = load_model(variant, "float32")
    assert model.weights.language.layers[1].post_norm_bias is not None
    logits, got = greedy_generate(model, ids, 5)
    assert got == want
    for a, b in zip(logits, want_logits, strict=True):
        assert_close_to(a.double(), b.double(), "anti-outlier")


def test_w8a8_mix_runs_per_token(quantized, tmp_path: Path, monkeypatch) -> None:
    """msModelSlim's W8A8_MIX (both static and per-token tensors) runs its per-token path: the same
    outputs as the W8A8_DYNAMIC checkpoint of the same weights (the tool rounds both alike)."""
    monkeypatch.setenv("QVL_KERNELS", "torch")
    mix = copy_of(quantized("ascend-w8a8", "qwen2_5_vl"), tmp_path)
    edit_json(mix / DESCRIPTION_FILE, lambda d: d.update({k: "W8A8_MIX" for k, v in d.items() if v == "W8A8"}))
    model = load_model(mix, "float32")
    assert model.weights.language.layers[0].qkv_weight.activations is Activations.PER_TOKEN
    dynamic = load_model(quantized("ascend-w8a8-dynamic", "qwen2_5_vl"), "float32")
    ids = torch.randint(0, 500, (9,), generator=torch.Generator().manual_seed(4))
    (logits, tokens), (want_logits, want) = greedy_generate(model, ids, 3), greedy_generate(dynamic, ids, 3)
    assert tokens == want
    for a, b in zip(logits, want_logits, strict=True):
        assert_close_to(a.double(), b.double(), "W8A8_MIX")


def test_quantize_tool_shards_large_outputs_and_refuses_bad_inputs(float_checkpoints, quantized, tmp_path,
                                                                   monkeypatch, capsys) -> None:
    from qwen_vl_triton.cli import quantize

    monkeypatch.setattr(quantize, "SHARD_BYTES", 64 << 10)
    src = float_checkpoints["qwen2_vl", "float32"]
    out = quantize.main(["--model_path", str(src), "--output_path", str(tmp_path / "q"), "--format", "ascend-w8a16"])
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) > 2 and shards[0] == f"quant_model_weights-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((out / "quant_model_weights.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == file_names(out) and set(index["weight_map"].values()) == set(shards)
    assert isinstance(load_model(out, "float32").weights.language.layers[0].down_weight, Int8Linear)
    for argv, message in (
            (["--model_path", str(quantized("ascend-w8a8-dynamic")), "--output_path", str(tmp_path / "x")],
             "is already quantized (ascend (msModelSlim) W8A8_DYNAMIC)"),
            (["--model_path", str(src), "--output_path", str(src)], "must differ"),
            (["--model_path", str(tmp_path / "nothing"), "--output_path", str(tmp_path / "y")], "config.json")):
        with pytest.raises(SystemExit, match=re.escape(message)):
            quantize.main([*argv, "--format", "compressed-tensors-w8a8"])


def test_quantize_tool_refuses_a_folder_holding_another_checkpoint_unless_overwrite(float_checkpoints,
                                                                                   tmp_path) -> None:
    """The issue's run: --output_path held another checkpoint (its model.safetensors, config,
    tokenizer). Written into as it was, the loader found lm_head.weight in both weight files.
    Refused without --overwrite (nothing touched); with it, the folder holds the new checkpoint
    alone, which loads; the float input is never what --overwrite deletes."""
    from qwen_vl_triton.cli import quantize

    src = float_checkpoints["qwen2_vl", "float32"]
    out = copy_of(float_checkpoints["qwen2_5_vl", "float32"], tmp_path)  # the other checkpoint
    (out / "notes").mkdir()
    before = {f.name: f.read_bytes() for f in out.iterdir() if f.is_file()}
    argv = ["--model_path", str(src), "--output_path", str(out), "--format", "ascend-w8a16"]
    with pytest.raises(SystemExit, match=rf"{re.escape(str(out))} is not empty .*pass --overwrite"):
        quantize.main(argv)
    assert {f.name: f.read_bytes() for f in out.iterdir() if f.is_file()} == before

    assert quantize.main([*argv, "--overwrite"]) == out
    fresh = quantize.main([*argv[:3], str(tmp_path / "fresh"), *argv[4:]])
    assert sorted(f.name for f in out.iterdir()) == sorted(f.name for f in fresh.iterdir())  # nothing stale
    assert load_config(out).model_type == "qwen2_vl"  # the new checkpoint's config, not the other's
    assert isinstance(load_model(out, "float32").weights.language.layers[0].down_weight, Int8Linear)

    nested = tmp_path / "holder"  # the float checkpoint inside the output folder: never deleted
    shutil.copytree(src, nested / "float")
    with pytest.raises(SystemExit, match=r"--overwrite would delete the float checkpoint"):
        quantize.main(["--model_path", str(nested / "float"), "--output_path", str(nested), "--format",
                       "ascend-w8a16", "--overwrite"])
    assert load_config(nested / "float").text.num_layers == load_config(src).text.num_layers
