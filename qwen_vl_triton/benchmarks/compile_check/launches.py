"""Every kernel launch the released checkpoints make, as the public ops make it.

A `Launch` calls one public op of `kernels` on meta tensors (shapes and dtypes, no memory) under
`use_target(target)`, so the launcher picks grid, tiles and launch options exactly as it would on
that chip. The compile check runs them with a compile-only Triton driver; nothing executes.

Covered, per released checkpoint (LLM 2B/3B/7B/32B/72B, Qwen2-VL's LayerNorm ViT and Qwen2.5-VL's
RMSNorm ViT, head dims 128 and 80), per tensor-parallel world size the checkpoint allows (1/2/4/8:
each rank's own heads and MLP share), fp16 and bf16:
  LLM   rms_norm / add_rms_norm, silu_and_mul, apply_mrope, write_kv_cache, paged decode, paged
        prefill (fresh prompts, prefix hits, chunked prefill), varlen attention (causal);
  ViT   layer_norm / rms_norm, silu_and_mul (Qwen2.5-VL), apply_rope, varlen attention (windows
        of 64 patches and whole images);
  W8A8 / W8A16 (the LLM's linear layers: qkv with its bias, o, gate_up, down) quantize_per_token
        and quantize_per_tensor (msModelSlim's static scale and offset) of each layer's input,
        int8_matmul (dynamic per-token scales; msModelSlim's static scale with its int32 bias) and
        w8a16_matmul (symmetric, and with msModelSlim's per-channel w_offset), at decode
        M = 1/16/64 and prefill M = 2048;
over token counts from 1 to the engine's largest chunks, batch sizes 1 to 256, and cache block
sizes 16/32/64/128. Sizes are spread over powers of two and odd values between them, since the
launchers' constexpr choices change at powers of two and Triton specialises integers that are 1
or divisible by 16.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from qwen_vl_triton import kernels
from qwen_vl_triton.kernels.attention_paged import MIN_SPLIT_TOKENS
from qwen_vl_triton.kernels.plans import PlanEntry, PlanTable

SHAPES_FILE = Path(__file__).parents[1] / "model_shapes.json"
DTYPES = (torch.float16, torch.bfloat16)
BLOCK_SIZES = (16, 32, 64, 128)
WORLD_SIZES = (1, 2, 4, 8)
# Token counts of one step: decode batches, prompt chunks (max_prefill_tokens defaults to 8192;
# MindIE's maxPrefillTokens goes to 32768) and ViT chunks (vision_chunk_patches 16384).
TOKENS = (1, 3, 16, 45, 128, 257, 1024, 4099, 8192, 32768)
BATCHES = (1, 2, 7, 16, 64, 256)
META = torch.device("meta")


@dataclasses.dataclass(frozen=True)
class Launch:
    """One call of a public op: `op` names it, `shape` says what was launched (for the tables),
    `call` makes the call."""

    model: str
    op: str
    shape: str
    dtype: torch.dtype
    call: Callable[[], object]


@dataclasses.dataclass(frozen=True)
class TextShape:
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int = 128


@dataclasses.dataclass(frozen=True)
class VisionShape:
    hidden: int
    heads: int
    norm: str  # "layernorm" (Qwen2-VL) or "rmsnorm" (Qwen2.5-VL)
    intermediate: int | None  # the gated MLP's width (Qwen2.5-VL); None: QuickGELU MLP (no kernel)
    head_dim: int = 80


def released_models() -> dict[str, tuple[TextShape, VisionShape]]:
    """The released checkpoints' shapes (benchmarks/model_shapes.json, from their config.json)."""
    out = {}
    for name, m in json.loads(SHAPES_FILE.read_text()).items():
        if name.startswith("_"):
            continue
        v = m["vision"]
        width = v.get("embed_dim", v.get("hidden"))
        out[name] = (TextShape(m["hidden"], m["intermediate"], m["heads"], m["kv_heads"]),
                     VisionShape(width, v.get("num_heads", 16), v["norm"], v.get("intermediate")))
    return out


def rank_heads(heads: int, kv_heads: int, world: int) -> tuple[int, int] | None:
    """(query heads, kv heads) of one rank, or None when `world` cannot split them: kv heads are
    split, or (fewer than ranks) replicated, as parallel/sharding.py does."""
    if heads % world or (kv_heads >= world and kv_heads % world) or (kv_heads < world and world % kv_heads):
        return None
    return heads // world, max(kv_heads // world, 1)


def _t(*shape: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device=META)


def _cu(lengths: list[int]) -> torch.Tensor:
    """cu_seqlens of `lengths` ([B+1] int32) on the meta device: values do not matter there."""
    return _t(len(lengths) + 1, dtype=torch.int32)


def _prefill_batches(tokens: int) -> Iterator[tuple[str, list[int], list[int]]]:
    """(kind, query lengths, context lengths) of prefill steps with `tokens` new tokens."""
    yield "fresh", [tokens], [tokens]
    yield "prefix hit", [tokens], [tokens + 4096]
    if tokens >= 4:
        half = tokens // 2
        yield "chunks", [half, tokens - half], [half + 8192, tokens - half]


def text_launches(model: str, shape: TextShape, world: int, dtype: torch.dtype) -> Iterator[Launch]:
    """The LLM's launches on one rank of `world`."""
    heads = rank_heads(shape.heads, shape.kv_heads, world)
    if heads is None:
        return
    hq, hk = heads
    d = shape.head_dim
    inter = -(-shape.intermediate // world)  # the largest balanced share
    tag = f"{model} tp{world}"
    for t in TOKENS:
        x = _t(t, shape.hidden, dtype=dtype)
        yield Launch(tag, "rms_norm", f"[{t}, {shape.hidden}]", dtype,
                     lambda x=x: kernels.rms_norm(x, _t(shape.hidden, dtype=dtype), 1e-6))
        yield Launch(tag, "add_rms_norm", f"[{t}, {shape.hidden}]", dtype,
                     lambda x=x: kernels.add_rms_norm(x, torch.empty_like(x), _t(shape.hidden, dtype=dtype), 1e-6))
        yield Launch(tag, "silu_and_mul", f"[{t}, 2x{inter}]", dtype,
                     lambda t=t: kernels.silu_and_mul(_t(t, 2 * inter, dtype=dtype)))
        yield Launch(tag, "apply_mrope", f"T={t} {hq}/{hk} heads", dtype,
                     lambda t=t: kernels.apply_mrope(_t(t, hq, d, dtype=dtype), _t(t, hk, d, dtype=dtype),
                                                     _t(3, t, dtype=torch.int64), (16, 24, 24), 1e6))
        yield Launch(tag, "varlen_attention", f"causal T={t} {hq}/{hk} heads", dtype,
                     lambda t=t: kernels.varlen_attention(_t(t, hq, d, dtype=dtype), _t(t, hk, d, dtype=dtype),
                                                          _t(t, hk, d, dtype=dtype), _cu([t]), t, causal=True))
    for bs in BLOCK_SIZES:
        def cache(bs: int = bs) -> torch.Tensor:
            return _t(256, bs, hk, d, dtype=dtype)

        for t in TOKENS:
            yield Launch(tag, "write_kv_cache", f"T={t} {hk}x{d} BS={bs}", dtype,
                         lambda t=t, cache=cache: kernels.write_kv_cache(
                             _t(t, hk, d, dtype=dtype), _t(t, hk, d, dtype=dtype), cache(), cache(),
                             _t(t, dtype=torch.int64)))
            for kind, q_lens, ctx in _prefill_batches(t):
                width = -(-max(ctx) // bs)
                yield Launch(tag, "paged_prefill_attention", f"{kind} T={t} {hq}/{hk} heads BS={bs}", dtype,
                             lambda q_lens=q_lens, width=width, cache=cache: kernels.paged_prefill_attention(
                                 _t(sum(q_lens), hq, d, dtype=dtype), cache(), cache(),
                                 _t(len(q_lens), width, dtype=torch.int32), _cu(q_lens),
                                 _t(len(q_lens), dtype=torch.int32)))
        for b in BATCHES:
            # A short table (no split), and one as wide as a 32k context (flash-decoding splits).
            for context in (MIN_SPLIT_TOKENS // 2, 32768):
                width = -(-context // bs)
                yield Launch(tag, "paged_attention", f"B={b} ctx={context} {hq}/{hk} heads BS={bs}", dtype,
                             lambda b=b, width=width, cache=cache: kernels.paged_attention(
                                 _t(b, hq, d, dtype=dtype), cache(), cache(), _t(b, width, dtype=torch.int32),
                                 _t(b, dtype=torch.int32)))


QUANT_ROWS = (1, 16, 64, 2048)  # decode batches and a prefill chunk


def quant_launches(model: str, shape: TextShape, world: int, dtype: torch.dtype) -> Iterator[Launch]:
    """The quantized LLM's launches on one rank of `world`: each linear layer's shard (column-
    parallel qkv and gate_up, row-parallel o and down), its activations quantized per token
    (dynamic) or per tensor (static), its weights int8 x int8 or dequantized (with or without
    an offset)."""
    heads = rank_heads(shape.heads, shape.kv_heads, world)
    if heads is None:
        return
    hq, hk = heads
    d = shape.head_dim
    inter = -(-shape.intermediate // world)
    tag = f"{model} tp{world}"
    layers = (("qkv", (hq + 2 * hk) * d, shape.hidden, True), ("o", shape.hidden, hq * d, False),
              ("gate_up", 2 * inter, shape.hidden, False), ("down", shape.hidden, inter, False))
    for m in QUANT_ROWS:
        for k in sorted({shape.hidden, hq * d, inter}):  # the inputs of qkv / gate_up, o, down
            yield Launch(tag, "quantize_per_token", f"[{m}, {k}]", dtype,
                         lambda m=m, k=k: kernels.quantize_per_token(_t(m, k, dtype=dtype)))
            yield Launch(tag, "quantize_per_tensor", f"[{m}, {k}]", dtype,
                         lambda m=m, k=k: kernels.quantize_per_tensor(_t(m, k, dtype=dtype), _t(1, dtype=torch.float32),
                                                                      _t(1, dtype=torch.float32)))
        for name, n, k, bias in layers:
            w, scale = _t(n, k, dtype=torch.int8), _t(n, dtype=torch.float32)
            float_bias = _t(n, dtype=dtype) if bias else None
            yield Launch(tag, "int8_matmul", f"{name} per-token [{m}, {k}] x [{n}, {k}]", dtype,
                         lambda m=m, k=k, w=w, scale=scale, float_bias=float_bias: kernels.int8_matmul(
                             _t(m, k, dtype=torch.int8), w, _t(m, dtype=torch.float32), scale, None, float_bias,
                             out_dtype=dtype))
            yield Launch(tag, "int8_matmul", f"{name} static [{m}, {k}] x [{n}, {k}]", dtype,
                         lambda m=m, k=k, n=n, w=w, scale=scale: kernels.int8_matmul(
                             _t(m, k, dtype=torch.int8), w, _t(1, dtype=torch.float32), scale,
                             _t(n, dtype=torch.int32), None, out_dtype=dtype))
            yield Launch(tag, "w8a16_matmul", f"{name} [{m}, {k}] x [{n}, {k}]", dtype,
                         lambda m=m, k=k, w=w, scale=scale, float_bias=float_bias: kernels.w8a16_matmul(
                             _t(m, k, dtype=dtype), w, scale, float_bias))
            yield Launch(tag, "w8a16_matmul", f"{name} w_offset [{m}, {k}] x [{n}, {k}]", dtype,
                         lambda m=m, k=k, n=n, w=w, scale=scale, float_bias=float_bias: kernels.w8a16_matmul(
                             _t(m, k, dtype=dtype), w, scale, float_bias, w_offset=_t(n, dtype=torch.float32)))


def vision_launches(model: str, shape: VisionShape, world: int, dtype: torch.dtype) -> Iterator[Launch]:
    """The ViT's launches on one rank of `world` (patches of one encoder call)."""
    if shape.heads % world:
        return
    heads, d, e = shape.heads // world, shape.head_dim, shape.hidden
    tag = f"{model} ViT tp{world}"
    for n in TOKENS:
        x = _t(n, e, dtype=dtype)
        if shape.norm == "layernorm":
            yield Launch(tag, "layer_norm", f"[{n}, {e}]", dtype,
                         lambda x=x: kernels.layer_norm(x, _t(e, dtype=dtype), _t(e, dtype=dtype), 1e-6))
        else:
            yield Launch(tag, "rms_norm", f"[{n}, {e}]", dtype,
                         lambda x=x: kernels.rms_norm(x, _t(e, dtype=dtype), 1e-6))
        if shape.intermediate is not None:
            inter = -(-shape.intermediate // world)
            yield Launch(tag, "silu_and_mul", f"[{n}, 2x{inter}]", dtype,
                         lambda n=n, inter=inter: kernels.silu_and_mul(_t(n, 2 * inter, dtype=dtype)))
        yield Launch(tag, "apply_rope", f"N={n} {2 * heads} heads", dtype,
                     lambda n=n: kernels.apply_rope(_t(n, 2 * heads, d, dtype=dtype),
                                                    _t(n, d // 2, dtype=torch.float32),
                                                    _t(n, d // 2, dtype=torch.float32)))
        # Qwen2.5-VL's window blocks attend within 64-patch windows; full blocks (and Qwen2-VL)
        # within a whole image or video frame.
        for longest in sorted({min(n, 64), n}):
            yield Launch(tag, "varlen_attention", f"N={n} longest={longest} {heads} heads", dtype,
                         lambda n=n, longest=longest: kernels.varlen_attention(
                             _t(n, heads, d, dtype=dtype), _t(n, heads, d, dtype=dtype),
                             _t(n, heads, d, dtype=dtype), _cu([longest] * -(-n // longest)), longest))


# The public op each kind of attention plan (kernels/plans.py) sizes; row plans are named by their op.
PLAN_OPS = {"varlen": "varlen_attention", "paged_prefill": "paged_prefill_attention", "paged_decode": "paged_attention"}


def released_heads(model: str | None = None) -> tuple[dict[int, tuple[int, int]], dict[int, tuple[int, int]]]:
    """(LLM, ViT): head dim -> (query heads, kv heads) at tp1, `model`'s first (if given), then
    those of the first released checkpoint with a head dim it lacks."""
    models = released_models()
    if model is not None and model not in models:
        raise ValueError(f"unknown model {model!r}; known: {', '.join(models)}")
    text_heads: dict[int, tuple[int, int]] = {}
    vision_heads: dict[int, tuple[int, int]] = {}
    for text, vision in [*([models[model]] if model else []), *models.values()]:
        text_heads.setdefault(text.head_dim, (text.heads, text.kv_heads))
        vision_heads.setdefault(vision.head_dim, (vision.heads, vision.heads))
    return text_heads, vision_heads


def plan_launches(plans: PlanTable, ops: list[str] | None = None) -> list[Launch]:
    """A device's committed plans, each compiled where its bucket ends (its max_tokens tokens),
    fp16 and bf16: an attention plan at the released heads of its head dim, every cache block
    size; a row plan at its row width. Every plan in a device's file compiles, whether or not the
    released shapes reach it."""
    text_heads, vision_heads = released_heads()
    heads_of = {**vision_heads, **text_heads}
    out = []
    for e in plans.entries:
        for dtype in DTYPES:
            attention = e.op in PLAN_OPS
            out += _attention_plan_launches(e, dtype, heads_of, plans.source) if attention else \
                _row_plan_launches(e, dtype)
    return [launch for launch in out if not ops or launch.op in ops]


def _row_plan_launches(e: PlanEntry, dtype: torch.dtype) -> list[Launch]:
    """A row plan's launch: its op over max_tokens rows of its width."""
    rows, n, tag = e.max_tokens, e.size, f"plan {e.op} width={e.size} up to {e.max_tokens}"
    calls = {
        "rms_norm": lambda: kernels.rms_norm(_t(rows, n, dtype=dtype), _t(n, dtype=dtype), 1e-6),
        "add_rms_norm": lambda: kernels.add_rms_norm(_t(rows, n, dtype=dtype), _t(rows, n, dtype=dtype),
                                                     _t(n, dtype=dtype), 1e-6),
        "layer_norm": lambda: kernels.layer_norm(_t(rows, n, dtype=dtype), _t(n, dtype=dtype), _t(n, dtype=dtype),
                                                 1e-6),
        "silu_and_mul": lambda: kernels.silu_and_mul(_t(rows, 2 * n, dtype=dtype)),
    }
    return [Launch(tag, e.op, f"[{rows}, {n}]", dtype, calls[e.op])]


def _attention_plan_launches(e: PlanEntry, dtype: torch.dtype, heads_of: dict[int, tuple[int, int]],
                             source: str) -> list[Launch]:
    """An attention plan's launches at the released heads of its head dim (heads_of: head dim ->
    (query heads, kv heads); every cache block size for the paged ops); a head dim no released
    checkpoint has is an error naming the file."""
    if e.size not in heads_of:
        raise ValueError(f"{source}: a {e.op} plan for head dim {e.size}, which no released "
                         f"checkpoint has (they have {sorted(heads_of)})")
    (hq, hk), d, n = heads_of[e.size], e.size, e.max_tokens
    tag = f"plan {e.op} d={d} up to {n}"
    if e.op == "varlen":
        return [Launch(tag, PLAN_OPS[e.op], f"T={n} {hq}/{hk} heads", dtype,
                       lambda: kernels.varlen_attention(_t(n, hq, d, dtype=dtype), _t(n, hk, d, dtype=dtype),
                                                        _t(n, hk, d, dtype=dtype), _cu([n]), n, causal=d == 128))]
    out = []
    for bs in BLOCK_SIZES:
        cache = _t(256, bs, hk, d, dtype=dtype)
        if e.op == "paged_prefill":
            out.append(Launch(tag, PLAN_OPS[e.op], f"T={n} {hq}/{hk} heads BS={bs}", dtype,
                              lambda bs=bs, cache=cache: kernels.paged_prefill_attention(
                                  _t(n, hq, d, dtype=dtype), cache, cache, _t(1, -(-n // bs), dtype=torch.int32),
                                  _cu([n]), _t(1, dtype=torch.int32))))
        else:
            out.append(Launch(tag, PLAN_OPS[e.op], f"B={n} ctx=32768 {hq}/{hk} heads BS={bs}", dtype,
                              lambda bs=bs, cache=cache: kernels.paged_attention(
                                  _t(n, hq, d, dtype=dtype), cache, cache, _t(n, 32768 // bs, dtype=torch.int32),
                                  _t(n, dtype=torch.int32))))
    return out


def all_launches(models: list[str] | None = None, ops: list[str] | None = None) -> list[Launch]:
    """Every launch of the released checkpoints (or of the named ones, or of the named ops)."""
    known = released_models()
    unknown = sorted(set(models or ()) - set(known))
    if unknown:
        raise ValueError(f"unknown model(s) {', '.join(unknown)}; known: {', '.join(known)}")
    out = []
    for name, (text, vision) in known.items():
        if models and name not in models:
            continue
        for world in WORLD_SIZES:
            for dtype in DTYPES:
                out += text_launches(name, text, world, dtype)
                out += quant_launches(name, text, world, dtype)
                out += vision_launches(name, vision, world, dtype)
    return [launch for launch in out if not ops or launch.op in ops]
