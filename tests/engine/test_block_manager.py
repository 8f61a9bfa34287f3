"""BlockManager: prefix-cache hits, cache salts, chain digests, LRU eviction, copy-on-write,
errors; and a stateful hypothesis model that simulates the KV contents to prove shared blocks are
never written and every prefix-cache hit returns exactly the tokens (and salt) it claims."""

from __future__ import annotations

import hashlib
import struct

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from qwen_vl_triton.engine.block_manager import BlockManager, Salt, block_digest, root_digest
from qwen_vl_triton.engine.sampling import SamplingParams
from qwen_vl_triton.engine.scheduler import Scheduler
from qwen_vl_triton.engine.sequence import Sequence

BS = 4


def _prefill(bm: BlockManager, seq_id: int, keys: list[int], n: int | None = None, salt: Salt = None) -> int:
    """Allocate and commit all n tokens, as the engine does after a prefill step."""
    n = len(keys) if n is None else n
    cached = bm.allocate(seq_id, keys, n, salt)
    bm.commit(seq_id, keys, n)
    return cached


def test_hit_on_committed_shared_prefix():
    bm = BlockManager(16, BS)
    a = list(range(10))
    assert _prefill(bm, 0, a) == 0
    b = a[:8] + [99, 98, 97]
    assert bm.can_allocate(b, len(b))
    assert bm.allocate(1, b, len(b)) == 8
    assert bm.block_table(1)[:2] == bm.block_table(0)[:2]
    assert bm.block_table(1)[2] != bm.block_table(0)[2]
    assert bm.num_used_blocks() == 3 + 1
    assert (bm.prefix_query_tokens, bm.prefix_hit_tokens) == (21, 8)
    # a different first block breaks the chain even if the second block's keys match
    c = [7, 7, 7, 7] + a[4:8] + [1]
    assert bm.allocate(2, c, len(c)) == 0


def test_hit_survives_free_and_is_taken_from_evictable():
    bm = BlockManager(4, BS)
    keys = list(range(9))
    _prefill(bm, 0, keys)
    bm.free(0)
    assert bm.num_free_blocks == 4 and bm.num_used_blocks() == 0
    # 2 evictable hits + 1 fresh block: all three come out of the free count
    assert bm.allocate(1, keys, 9) == 8
    assert bm.num_free_blocks == 1


def test_hit_on_used_block_costs_nothing():
    bm = BlockManager(3, BS)
    keys = list(range(9))
    _prefill(bm, 0, keys)  # 3 blocks, none free
    assert not bm.can_allocate(keys, 9)  # 2 shared hits are free, the third block is not
    bm2 = BlockManager(4, BS)
    _prefill(bm2, 0, keys)
    assert bm2.can_allocate(keys, 9)  # 2 shared hits cost 0, one fresh block
    assert bm2.allocate(1, keys, 9) == 8 and bm2.num_free_blocks == 0


def test_no_hit_on_uncommitted_blocks():
    bm = BlockManager(16, BS)
    keys = list(range(12))
    bm.allocate(0, keys, 12)
    assert bm.allocate(1, keys, 12) == 0
    bm.commit(0, keys, 5)  # only block 0 is full and written
    assert bm.allocate(2, keys, 12) == 4


def test_hit_capped_at_num_tokens_minus_one():
    bm = BlockManager(16, BS)
    keys = list(range(8))
    _prefill(bm, 0, keys)
    assert bm.allocate(1, keys, 8) == 4  # the last prompt token is always computed
    assert bm.allocate(2, keys, 4) == 0
    assert bm.allocate(3, keys + [50], 9) == 8


def test_commit_duplicate_keeps_first_block():
    bm = BlockManager(16, BS)
    keys = list(range(8))
    _prefill(bm, 0, keys)
    assert _prefill(bm, 1, keys) == 4  # block 1 recomputed into a fresh block, not registered
    bm.free(1)
    bm.free(0)
    assert _prefill(bm, 2, keys + [1]) == 8
    assert bm.block_table(2)[:2] == [0, 1]


def test_lru_eviction_order():
    bm = BlockManager(4, BS)
    _prefill(bm, 0, list(range(0, 8)))     # blocks 0, 1
    _prefill(bm, 1, list(range(100, 108)))  # blocks 2, 3
    bm.free(1)
    bm.free(0)  # evictable LRU: 3, 2 (seq 1, tail first), then 1, 0
    assert bm.num_free_blocks == 4
    bm.allocate(2, [5] * 4, 4)  # takes the least recently freed: block 3
    assert bm.block_table(2) == [3]
    assert bm.allocate(3, list(range(100, 108)) + [0], 9) == 4  # block 2 still cached, block 3 gone
    assert bm.block_table(3) == [2, 1, 0]  # two fresh blocks evict 1, then 0
    bm.free(2)
    bm.free(3)
    assert bm.allocate(4, list(range(0, 8)) + [0], 9) == 0  # the first prefix is gone


def test_free_blocks_taken_before_evicting():
    bm = BlockManager(4, BS)
    _prefill(bm, 0, list(range(8)))
    bm.free(0)
    bm.allocate(1, [9] * 8, 8)  # the two never-used blocks, no eviction
    assert bm.block_table(1) == [2, 3] and bm.num_free_blocks == 2
    assert bm.allocate(2, list(range(5)), 5) == 4  # hits block 0; its fresh block evicts block 1
    assert bm.block_table(2) == [0, 1]


def test_disabled_caching_never_hits():
    bm = BlockManager(8, BS, enable_prefix_caching=False)
    keys = list(range(9))
    _prefill(bm, 0, keys)
    assert bm.allocate(1, keys, 9) == 0
    bm.free(0)
    bm.free(1)
    assert bm.allocate(2, keys, 9) == 0
    assert bm.prefix_hit_tokens == 0 and bm.prefix_query_tokens == 27


def test_salt_separates_identical_prompts():
    bm = BlockManager(16, BS)
    keys = list(range(9))
    _prefill(bm, 0, keys, salt="alice")
    assert bm.allocate(1, keys, 9, salt="bob") == 0
    assert bm.allocate(2, keys, 9) == 0  # the unsalted pool does not see salted blocks either
    bm.commit(2, keys, 9)
    assert bm.allocate(3, keys, 9, salt="bob") == 0  # ... nor the salted ones the unsalted blocks
    assert set(bm.block_table(0)).isdisjoint(bm.block_table(1))
    assert bm.num_used_blocks() == 4 * 3


def test_same_salt_shares():
    bm = BlockManager(16, BS)
    keys = list(range(9))
    _prefill(bm, 0, keys, salt="alice")
    assert bm.can_allocate(keys, 9, "alice")
    assert bm.allocate(1, keys, 9, salt="alice") == 8
    assert bm.allocate(2, keys, 9, salt=b"alice") == 8  # a str salt is its UTF-8 bytes
    assert bm.block_table(1)[:2] == bm.block_table(2)[:2] == bm.block_table(0)[:2]
    bm.free(0)
    bm.free(1)
    bm.free(2)
    assert bm.allocate(3, keys, 9, salt="alice") == 8  # still cached once evictable


def test_no_salt_is_the_unsalted_pool():
    bm = BlockManager(16, BS)
    keys = list(range(9))
    _prefill(bm, 0, keys)
    assert bm.allocate(1, keys, 9, salt="") == 8
    assert bm.allocate(2, keys, 9, salt=b"") == 8
    assert bm.allocate(3, keys, 9) == 8
    assert root_digest(None) == root_digest("") == root_digest(b"") != root_digest("a") == root_digest(b"a")


def test_scheduler_admits_under_the_sequence_salt():
    """The scheduler matches and registers each sequence's blocks under its cache_salt."""
    sched = Scheduler(BlockManager(16, BS), max_batch_size=8, max_prefill_tokens=64)
    keys = list(range(9))

    def seq(seq_id: int, salt: str | None) -> Sequence:
        return Sequence(seq_id, f"r{seq_id}", list(keys), torch.arange(9).expand(3, -1), 0, [], list(keys),
                        SamplingParams(), cache_salt=salt)

    first = seq(0, "alice")
    sched.add(first)
    sched.schedule()
    sched.blocks.commit(0, keys, 9)
    for s in (seq(1, "bob"), seq(2, None), seq(3, "alice")):
        sched.add(s)
    sched.schedule()
    assert [s.num_cached_prompt_tokens for s in sched.running] == [0, 0, 0, 8]


def test_digests_separate_what_python_hash_merges():
    assert hash(-1) == hash(-2)  # CPython: -1 is reserved as an error value, so hash(-1) is -2
    root = root_digest()
    assert block_digest(root, [-1]) != block_digest(root, [-2])
    assert block_digest(root, [1, 2]) != block_digest(root, [2, 1])
    assert block_digest(block_digest(root, [1]), [2]) != block_digest(block_digest(root, [2]), [1])
    assert block_digest(root_digest("a"), [1]) != block_digest(root, [1])
    assert len(block_digest(root, [0])) == len(root) == 32
    bm = BlockManager(16, BS)
    _prefill(bm, 0, [-1] * 8 + [0])
    assert bm.allocate(1, [-2] * 8 + [0], 9) == 0
    assert bm.allocate(2, [-1] * 4 + [-2] * 4 + [0], 9) == 4


@settings(max_examples=200, deadline=None)
@given(a=st.lists(st.integers(-2**63, 2**63 - 1), min_size=1, max_size=6),
       b=st.lists(st.integers(-2**63, 2**63 - 1), min_size=1, max_size=6),
       salts=st.tuples(st.sampled_from([None, "x", "y"]), st.sampled_from([None, "x", "y"])))
def test_digests_of_different_keys_differ(a: list[int], b: list[int], salts: tuple[Salt, Salt]):
    """Chains over the same block size are equal exactly when the keys and salts are."""
    def chain(salt: Salt, keys: list[int]) -> bytes:
        d = root_digest(salt)
        for k in keys:
            d = block_digest(d, [k])
        return d

    assert (chain(salts[0], a) == chain(salts[1], b)) == (a == b and salts[0] == salts[1])


def test_errors():
    bm = BlockManager(2, BS)
    with pytest.raises(ValueError, match="num_tokens"):
        bm.allocate(0, [1], 0)
    with pytest.raises(ValueError, match="len\\(keys\\)"):
        bm.allocate(0, [1, 2], 3)
    assert not bm.can_allocate(list(range(9)), 9)
    with pytest.raises(RuntimeError, match="out of KV blocks"):
        bm.allocate(0, list(range(9)), 9)
    assert not bm.has_seq(0) and bm.num_free_blocks == 2  # a failed allocate changes nothing
    bm.allocate(0, [1], 1)
    with pytest.raises(ValueError, match="already has a block table"):
        bm.allocate(0, [1], 1)
    with pytest.raises(KeyError, match="seq_id 7"):
        bm.block_table(7)
    with pytest.raises(KeyError, match="seq_id 7"):
        bm.free(7)
    with pytest.raises(ValueError, match="shrink"):
        bm.append_slots(0, 0)
    with pytest.raises(ValueError, match="num_computed_tokens"):
        bm.commit(0, [1, 2], 2)
    with pytest.raises(ValueError, match="block_size"):
        BlockManager(4, 0)
    with pytest.raises(ValueError, match="signed 64-bit"):
        bm.allocate(1, [2**63] * 8 + [0], 9)
    assert not bm.has_seq(1)


# ------------------------------------------------------------------------------- stateful model
KEYS = st.sampled_from([0, -1, -2])  # hash(-1) == hash(-2): the digests must still tell them apart
SALTS = st.sampled_from([None, "", b"", "a", b"a", "b"])


def _salt_bytes(salt: Salt) -> bytes:
    """The salt as the chain hashes it (None, "" and b"" are all no salt)."""
    return salt.encode() if isinstance(salt, str) else salt or b""


def _chain_digest(salt: bytes, prefix: tuple[int, ...], bs: int) -> bytes:
    """The registered digest of the last block of `prefix` (whole blocks), by the documented chain,
    computed here from hashlib rather than through the module's helpers."""
    digest = hashlib.blake2b(salt, digest_size=32, person=b"qvl-prefix-root").digest()
    for j in range(len(prefix) // bs):
        packed = struct.pack(f"<{bs}q", *prefix[j * bs:(j + 1) * bs])
        digest = hashlib.blake2b(digest + packed, digest_size=32, person=b"qvl-prefix-block").digest()
    return digest


class BlockManagerMachine(RuleBasedStateMachine):
    """Random allocate / append / compute+commit / free over a tiny vocabulary.

    `content[b][s]` is what KV slot s of block b was computed from: the sequence's salt and the
    keys of the whole prefix up to and including that token, since attention makes a token's KV
    depend on all of them (None: never written since the block was handed out). The salt is not
    in the KV, but a hit across salts would leak one request's prompt to another, so the model
    counts it as content. The engine's writes are simulated in `compute`.
    """

    @initialize(num_blocks=st.integers(4, 24), block_size=st.sampled_from([1, 2, 3]),
                caching=st.booleans())
    def setup(self, num_blocks: int, block_size: int, caching: bool) -> None:
        self.bm = BlockManager(num_blocks, block_size, enable_prefix_caching=caching)
        self.bs = block_size
        self.content: list[list[tuple[bytes, tuple[int, ...]] | None]] = [
            [None] * block_size for _ in range(num_blocks)]
        self.seqs: dict[int, dict] = {}  # seq_id -> {"keys", "salt" (bytes), "n" (covered), "computed"}
        self.next_id = 0
        self.history: list[list[int]] = []

    def _fresh(self, blocks: list[int]) -> None:
        for b in blocks:
            self.content[b] = [None] * self.bs

    @rule(keys=st.lists(KEYS, min_size=1, max_size=10), salt=SALTS, data=st.data())
    def allocate(self, keys: list[int], salt: Salt, data) -> None:
        if self.history and data.draw(st.booleans()):  # often extend an earlier sequence's prefix
            old = data.draw(st.sampled_from(self.history))
            keys = old[:data.draw(st.integers(0, len(old)))] + keys
        self.history.append(list(keys))
        n = data.draw(st.integers(1, len(keys)))
        ok = self.bm.can_allocate(keys, n, salt)
        free_before = self.bm.num_free_blocks
        if not ok:
            with pytest.raises(RuntimeError):
                self.bm.allocate(self.next_id, keys, n, salt)
            assert self.bm.num_free_blocks == free_before
            return
        sid, self.next_id = self.next_id, self.next_id + 1
        cached = self.bm.allocate(sid, keys, n, salt)
        assert cached % self.bs == 0 and 0 <= cached <= n - 1
        if not self.bm.enable_prefix_caching:
            assert cached == 0
        table = self.bm.block_table(sid)
        for i in range(cached):  # every hit slot holds exactly this sequence's salt and keys
            assert self.content[table[i // self.bs]][i % self.bs] == (_salt_bytes(salt), tuple(keys[:i + 1]))
        self._fresh(table[cached // self.bs:])
        self.seqs[sid] = {"keys": list(keys), "salt": _salt_bytes(salt), "n": n, "computed": cached}
        if data.draw(st.booleans()):  # a whole prefill in one step, as most prompts go
            self._compute(sid, n)

    @precondition(lambda self: self.seqs)
    @rule(data=st.data(), extra=st.lists(KEYS, max_size=5))
    def append(self, data, extra: list[int]) -> None:
        sid = data.draw(st.sampled_from(sorted(self.seqs)))
        s = self.seqs[sid]
        s["keys"] += extra
        self._append(sid, data.draw(st.integers(s["n"], max(s["n"], len(s["keys"])))))

    def _append(self, sid: int, n: int) -> None:
        """append_slots(sid, n), checking that the table only grows."""
        s = self.seqs[sid]
        old = self.bm.block_table(sid)
        if not self.bm.can_append(sid, n):
            with pytest.raises(RuntimeError):
                self.bm.append_slots(sid, n)
            assert self.bm.block_table(sid) == old
            return
        self.bm.append_slots(sid, n)
        new = self.bm.block_table(sid)
        assert new[:len(old)] == old
        self._fresh(new[len(old):])
        s["n"] = n

    @precondition(lambda self: any(s["computed"] < s["n"] for s in self.seqs.values()))
    @rule(data=st.data())
    def compute(self, data) -> None:
        sid = data.draw(st.sampled_from(sorted(i for i, s in self.seqs.items() if s["computed"] < s["n"])))
        s = self.seqs[sid]
        self._compute(sid, data.draw(st.integers(s["computed"] + 1, s["n"])))

    def _compute(self, sid: int, upto: int) -> None:
        """Write KV slots computed..upto-1 of sid (each into a block only sid holds), commit."""
        s = self.seqs[sid]
        table = self.bm.block_table(sid)
        refs = self._refcounts()
        for i in range(s["computed"], upto):
            b = table[i // self.bs]
            assert refs[b] == 1, f"writing slot {i} of seq {sid} into shared block {b}"
            self.content[b][i % self.bs] = (s["salt"], tuple(s["keys"][:i + 1]))
        self.bm.commit(sid, s["keys"], upto)
        s["computed"] = upto

    @precondition(lambda self: any(s["computed"] == s["n"] for s in self.seqs.values()))
    @rule(data=st.data())
    def fork(self, data) -> None:
        """Another sample of a computed sequence: shares its blocks, copies a partly filled last one."""
        parent = data.draw(st.sampled_from(sorted(i for i, s in self.seqs.items() if s["computed"] == s["n"])))
        free_before, cost = self.bm.num_free_blocks, self.bm.fork_cost(parent)
        sid = self.next_id
        if cost > free_before:
            with pytest.raises(RuntimeError):
                self.bm.fork(parent, sid)
            assert self.bm.num_free_blocks == free_before and not self.bm.has_seq(sid)
            return
        self.next_id += 1
        copy = self.bm.fork(parent, sid)
        assert self.bm.num_free_blocks == free_before - cost and (copy is not None) == (cost == 1)
        table, child = self.bm.block_table(parent), self.bm.block_table(sid)
        if copy is not None:  # the engine copies the partly filled block's KV
            assert copy == (table[-1], child[-1]) and copy[1] not in table
            self.content[copy[1]] = list(self.content[copy[0]])
            child = child[:-1]
        assert child == table[:len(child)]
        self.seqs[sid] = {**self.seqs[parent], "keys": list(self.seqs[parent]["keys"])}

    @precondition(lambda self: self.seqs)
    @rule(data=st.data())
    def free(self, data) -> None:
        sid = data.draw(st.sampled_from(sorted(self.seqs)))
        self.bm.free(sid)
        del self.seqs[sid]

    def _refcounts(self) -> list[int]:
        refs = [0] * self.bm.num_blocks
        for sid in self.seqs:
            for b in self.bm.block_table(sid):
                refs[b] += 1
        return refs

    @invariant()
    def consistent(self) -> None:
        if not hasattr(self, "bm"):
            return
        bm = self.bm
        refs = self._refcounts()
        assert refs == bm._ref
        free, evictable = list(bm._free), list(bm._evictable)
        used = [b for b in range(bm.num_blocks) if refs[b] > 0]
        assert len(set(free)) == len(free) and not set(free) & set(evictable)
        assert not (set(free) | set(evictable)) & set(used)
        assert len(free) + len(evictable) + len(used) == bm.num_blocks
        assert bm.num_free_blocks == len(free) + len(evictable)
        assert bm.num_used_blocks() == len(used)
        for sid, s in self.seqs.items():
            table = bm.block_table(sid)
            assert len(table) == -(-s["n"] // self.bs) and len(set(table)) == len(table)
            assert bm.has_seq(sid)
        # registered blocks: one to one with digests, never free, hold exactly their salt and keys
        assert len(bm._cached) == len(bm._key_of)
        assert all(bm._key_of[b] == k for k, b in bm._cached.items())
        assert set(evictable) <= set(bm._key_of) and not set(free) & set(bm._key_of)
        for b, digest in bm._key_of.items():  # holds the KV of the prefix and salt it is registered under
            last = self.content[b][-1]
            assert last is not None
            salt, prefix = last
            assert len(prefix) % self.bs == 0
            assert self.content[b] == [(salt, prefix[:i]) for i in range(len(prefix) - self.bs + 1, len(prefix) + 1)]
            assert digest == _chain_digest(salt, prefix, self.bs)
        if not bm.enable_prefix_caching:
            assert not bm._cached
        if not self.seqs:
            assert bm.num_free_blocks == bm.num_blocks


TestBlockManagerMachine = BlockManagerMachine.TestCase
TestBlockManagerMachine.settings = settings(max_examples=250, stateful_step_count=40, deadline=None)


@settings(max_examples=50, deadline=None)
@given(keys=st.lists(st.integers(0, 2), min_size=1, max_size=30), n_seqs=st.integers(1, 5))
def test_all_freed_returns_every_block(keys: list[int], n_seqs: int):
    bm = BlockManager(64, 4)
    for sid in range(n_seqs):
        _prefill(bm, sid, keys[: len(keys) - sid] or keys)
    for sid in range(n_seqs):
        bm.free(sid)
    assert bm.num_free_blocks == 64 and bm.num_used_blocks() == 0
