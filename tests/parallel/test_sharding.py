"""Sharding at load time, in process (no process group needed): every rank's shards tile each
checkpoint tensor exactly, a rank reads only its slices, the loaded per-rank weights have the
fused layouts the forward passes expect, and world sizes that do not fit fail with the numbers."""

from __future__ import annotations

import dataclasses
import itertools
from pathlib import Path

import pytest
import torch

from qwen_vl_triton.modeling.config import load_config
from qwen_vl_triton.modeling.weight_table import IGNORED_SUFFIXES, check_tp_sizes, entry_for, shard_spec
from qwen_vl_triton.modeling.weights import CheckpointReader, load_weights
from qwen_vl_triton.parallel import SINGLE_PROCESS, TPGroup, TPSizeError
from qwen_vl_triton.parallel.comm import all_gather, all_gather_object, all_reduce, barrier, broadcast_object
from qwen_vl_triton.parallel.group import init_from_env
from qwen_vl_triton.parallel.sharding import ShardKind, balanced_range, kv_head_range, local_kv_heads, read_shard
from qwen_vl_triton.testing.tiny_checkpoint import make_tiny_checkpoint
from tests.parallel.test_tp_engine import TP_SIZES

WORLDS = (2, 4)


@pytest.fixture(scope="module", params=["qwen2_vl", "qwen2_5_vl"])
def checkpoint(request, tmp_path_factory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp(request.param), request.param, seed=1, **TP_SIZES)


class RecordingReader:
    """A CheckpointReader's get that records every (name, index) read."""

    def __init__(self, reader: CheckpointReader):
        self.reader = reader
        self.reads: list[tuple[str, tuple[slice, ...] | None]] = []

    def get(self, name: str, index: tuple[slice, ...] | None = None) -> torch.Tensor:
        self.reads.append((name, index))
        return self.reader.get(name, index)


def test_shards_tile_every_tensor_exactly(checkpoint: Path) -> None:
    config = load_config(checkpoint)
    reader = CheckpointReader(checkpoint)
    names = sorted(n for n in reader.names() if not n.endswith(IGNORED_SUFFIXES))
    assert {entry_for(n).shard for n in names} == set(ShardKind)  # every kind is exercised
    for world, name in itertools.product(WORLDS, names):
        full = reader.get(name)
        shape = list(full.shape)
        kind = entry_for(name).shard
        covered = torch.zeros(shape, dtype=torch.int32)
        total = torch.zeros_like(full)
        for rank in range(world):
            spec = shard_spec(name, shape, config, TPGroup(rank=rank, world_size=world))
            rec = RecordingReader(reader)
            piece = read_shard(lambda index, rec=rec, name=name: rec.get(name, index), shape, spec, full.dtype)
            if kind is ShardKind.REPLICATED:
                assert torch.equal(piece, full), name
                continue
            if kind is ShardKind.FIRST_RANK:  # row-parallel bias: once on rank 0, zeros (not read) elsewhere
                assert rec.reads == ([(name, None)] if rank == 0 else []), name
                total += piece
                continue
            assert rec.reads and all(index is not None for _, index in rec.reads), (name, "read whole")
            offset = 0
            for a, b in spec.ranges:
                n = max(b - a, 0)
                got, want = piece.narrow(spec.dim, offset, n), full.narrow(spec.dim, a, n)
                assert torch.equal(got, want), (name, world, rank)
                covered.narrow(spec.dim, a, n).add_(1)
                offset += n
            pad = piece.narrow(spec.dim, offset, piece.shape[spec.dim] - offset)
            assert not pad.any(), (name, "padding must be zeros")
            read = sum(full[index].numel() for _, index in rec.reads)
            assert read == piece.narrow(spec.dim, 0, offset).numel(), (name, "read more than its shard")
        if kind is ShardKind.FIRST_RANK:
            assert torch.equal(total, full), name
        elif kind is ShardKind.KV_HEADS:  # 2 kv heads: each held by world / 2 ranks (or split at world 2)
            assert (covered == max(world // config.text.num_kv_heads, 1)).all(), name
        elif kind is not ShardKind.REPLICATED:
            assert (covered == 1).all(), (name, world)  # every element on exactly one rank


@pytest.mark.parametrize("world", WORLDS)
def test_loaded_rank_weights_fuse_their_slices(checkpoint: Path, world: int) -> None:
    config = load_config(checkpoint)
    t, v = config.text, config.vision
    reader = CheckpointReader(checkpoint)
    ranks = [load_weights(checkpoint, config, torch.float32, tp=TPGroup(rank=r, world_size=world))
             for r in range(world)]
    hq, hk, d = t.num_heads // world, local_kv_heads(t.num_kv_heads, world), t.head_dim
    p = "model.layers.1."
    q_full = reader.get(p + "self_attn.q_proj.weight")
    k_full = reader.get(p + "self_attn.k_proj.weight")
    qs = []
    for r, w in enumerate(ranks):
        layer = w.language.layers[1]
        assert list(layer.qkv_weight.shape) == [(hq + 2 * hk) * d, t.hidden_size]
        q, k, _ = layer.qkv_weight.split([hq * d, hk * d, hk * d])
        qs.append(q)
        a, b = kv_head_range(r, t.num_heads, t.num_kv_heads, world)
        assert torch.equal(k, k_full[a * d:b * d])
        a, b = balanced_range(t.intermediate_size, r, world)  # 250 features: shares of 125 or 63 / 62
        assert list(layer.gate_up_weight.shape) == [2 * (b - a), t.hidden_size]
        assert list(layer.o_weight.shape) == [t.hidden_size, hq * d]
        blk = w.vision.blocks[0]
        assert list(blk.qkv_weight.shape) == [3 * v.num_heads // world * v.head_dim, v.hidden_size]
        assert blk.proj_bias.any() == (r == 0)
        assert w.language.embed_tokens.shape[0] == -(-t.vocab_size // world)
    assert torch.equal(torch.cat(qs), q_full)  # the ranks' query heads, in order, are all of them
    gate = torch.cat([w.language.layers[0].gate_up_weight.chunk(2)[0] for w in ranks])
    assert torch.equal(gate, reader.get("model.layers.0.mlp.gate_proj.weight"))
    down = torch.cat([w.language.layers[0].down_weight for w in ranks], dim=1)
    assert torch.equal(down, reader.get("model.layers.0.mlp.down_proj.weight"))
    head = torch.cat([w.language.lm_head for w in ranks])
    assert torch.equal(head[:t.vocab_size], reader.get("lm_head.weight")) and not head[t.vocab_size:].any()


def test_bad_world_sizes_name_the_numbers(tmp_path: Path) -> None:
    # The default tiny model: 4 heads, 2 kv heads, 2 vision heads, intermediate 256.
    path = make_tiny_checkpoint(tmp_path / "default", "qwen2_5_vl")
    config = load_config(path)
    with pytest.raises(TPSizeError, match=r"over 3 processes.*num_attention_heads 4.*vision num_heads 2.*"
                                          r"num_key_value_heads 2.*e\.g\. 1, 2\)"):
        check_tp_sizes(config, 3)
    with pytest.raises(TPSizeError, match=r"over 4 processes.*vision num_heads 2") as err:
        load_weights(path, config, torch.float32, tp=TPGroup(rank=1, world_size=4))
    assert "num_attention_heads" not in str(err.value)  # 4 heads split 4 ways is fine
    check_tp_sizes(config, 2)  # fits


def test_released_model_shapes_fit_their_world_sizes(tmp_path: Path) -> None:
    """Qwen2.5-VL-3B (16 heads, 2 kv heads, vision MLP 3420 = 8 * 427.5) runs 8-way thanks to the
    balanced MLP split; the 7B models' 28 heads stop at 4-way, and the error says why."""
    config = load_config(make_tiny_checkpoint(tmp_path / "c", "qwen2_5_vl"))
    vision = dataclasses.replace(config.vision, num_heads=16, head_dim=80, hidden_size=1280, intermediate_size=3420)
    three_b = dataclasses.replace(config, vision=vision, text=dataclasses.replace(
        config.text, num_heads=16, num_kv_heads=2, intermediate_size=11008))
    for world in (1, 2, 4, 8):
        check_tp_sizes(three_b, world)
    seven_b = dataclasses.replace(three_b, text=dataclasses.replace(three_b.text, num_heads=28, num_kv_heads=4))
    check_tp_sizes(seven_b, 4)
    with pytest.raises(TPSizeError, match=r"over 8 processes: the world size must divide text num_attention_heads 28\. "
                                          r"Use a world size that does \(e\.g\. 1, 2, 4\)"):
        check_tp_sizes(seven_b, 8)


@pytest.mark.parametrize("n", [1, 7, 8, 130, 3420])
def test_balanced_shares_tile_in_order(n: int) -> None:
    for world in (1, 2, 3, 4, 8):
        shares = [balanced_range(n, r, world) for r in range(world)]
        assert shares[0][0] == 0 and shares[-1][1] == n
        assert all(a[1] == b[0] for a, b in itertools.pairwise(shares))
        sizes = [b - a for a, b in shares]
        assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)


@pytest.mark.parametrize(("heads", "kv_heads"), [(4, 2), (8, 8), (16, 2), (28, 4), (32, 8), (12, 2), (64, 8)])
def test_each_ranks_query_heads_attend_to_the_kv_heads_it_holds(heads: int, kv_heads: int) -> None:
    group = heads // kv_heads  # GQA: query head j attends to kv head j // group
    for world in (1, 2, 4, 8):
        if heads % world or (kv_heads >= world and kv_heads % world) or (kv_heads < world and world % kv_heads):
            continue
        hq, hk = heads // world, local_kv_heads(kv_heads, world)
        for rank in range(world):
            a, b = kv_head_range(rank, heads, kv_heads, world)
            assert b - a == hk
            for i in range(hq):  # local query head i -> local kv head i // (hq / hk), as the kernels do
                assert (rank * hq + i) // group == a + i // (hq // hk), (heads, kv_heads, world, rank, i)


def test_one_process_needs_no_process_group(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    tp = init_from_env("cpu")
    assert (tp.rank, tp.world_size, tp.group) == (0, 1, None) and tp.device.type == "cpu"
    x = torch.randn(3, 4)
    assert all_reduce(x, SINGLE_PROCESS) is x and all_gather(x, SINGLE_PROCESS) is x
    assert broadcast_object({"a": 1}, SINGLE_PROCESS) == {"a": 1}
    assert all_gather_object(5, SINGLE_PROCESS) == [5]
    barrier(SINGLE_PROCESS)
    with pytest.raises(ValueError, match="rank 2 is not in a world of size 2"):
        TPGroup(rank=2, world_size=2)
