"""Paged KV-cache bookkeeping: block tables, reference counts and a prefix cache.

The manager hands out block ids; it never touches tensors. Token i of a sequence lives in slot
i % block_size of block table[i // block_size].

Prefix cache. A full block whose KV has been written (`commit`) is registered under its chain
digest, a 32-byte BLAKE2b digest of its parent's digest and its tokens' content keys:

    digest(block j) = blake2b(digest(block j - 1) || keys of block j, each as signed 8-byte LE)
    digest(block -1) = blake2b(cache salt)                        (the root; no salt = b"")

with the personalisations "qvl-prefix-block" and "qvl-prefix-root" keeping the two kinds apart.
Every part has a fixed width, so the input determines the parent and the keys; a hit therefore
needs the block's own keys, every earlier block's keys and the salt to match, short of a BLAKE2b
collision, which no prompt can be crafted to cause (Python's hash() could: hash(-1) == hash(-2)).
Requests with different salts never share a block; no salt and the empty salt are the same.
Registered blocks are immutable: nothing writes a full, committed block again.

Block states (every block is in exactly one):
  * free       refcount 0, no registered digest, in `_free`;
  * evictable  refcount 0, registered digest, in `_evictable` (LRU order, most recently freed last);
  * used       refcount >= 1, referenced by that many live block tables (registered or not).
"""

from __future__ import annotations

import hashlib
import struct
from collections import OrderedDict, deque
from collections.abc import Sequence

DIGEST_SIZE = 32
_ROOT_PERSON = b"qvl-prefix-root"
_BLOCK_PERSON = b"qvl-prefix-block"

Salt = str | bytes | None  # a request's cache salt: str is taken as its UTF-8 bytes


def root_digest(salt: Salt = None) -> bytes:
    """The chain digest before block 0 of a request with this cache salt."""
    data = salt.encode() if isinstance(salt, str) else salt or b""
    return hashlib.blake2b(data, digest_size=DIGEST_SIZE, person=_ROOT_PERSON).digest()


def block_digest(parent: bytes, keys: Sequence[int]) -> bytes:
    """The chain digest of a block with these content keys whose parent's digest is `parent`."""
    try:
        packed = struct.pack(f"<{len(keys)}q", *keys)
    except struct.error as e:  # a wider key would need a wider encoding to stay unambiguous
        raise ValueError(f"prefix-cache content keys must fit in a signed 64-bit integer: {e}") from None
    h = hashlib.blake2b(parent, digest_size=DIGEST_SIZE, person=_BLOCK_PERSON)
    h.update(packed)
    return h.digest()


class BlockManager:
    """Block tables for sequences, with shared prefix blocks (full, committed, never written again).

    Invariants (checked by tests/engine/test_block_manager.py after every operation):
      * refcount[b] == number of live tables containing b (a table holds a block at most once);
      * free, evictable and used partition range(num_blocks);
      * a table for a sequence of n tokens has exactly ceil(n / block_size) blocks;
      * registered digests and blocks map one to one; only used or evictable blocks are registered;
      * a registered block holds the KV of the prefix (and salt) whose chain digest it is under.
    """

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"num_blocks ({num_blocks}) and block_size ({block_size}) must be >= 1")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._ref = [0] * num_blocks
        self._free: deque[int] = deque(range(num_blocks))
        self._evictable: OrderedDict[int, None] = OrderedDict()
        self._cached: dict[bytes, int] = {}      # registered digest -> block
        self._key_of: dict[int, bytes] = {}      # block -> its registered digest
        self._tables: dict[int, list[int]] = {}
        self._num_tokens: dict[int, int] = {}    # tokens each table covers
        # each seq's root digest, then the chain digests of its committed full blocks
        self._chain: dict[int, list[bytes]] = {}
        self.prefix_query_tokens = 0
        self.prefix_hit_tokens = 0

    # ----------------------------------------------------------------------------- queries
    @property
    def num_free_blocks(self) -> int:
        """Blocks an allocation could take now: free ones plus evictable cached ones."""
        return len(self._free) + len(self._evictable)

    def num_used_blocks(self) -> int:
        """Blocks referenced by at least one sequence."""
        return self.num_blocks - self.num_free_blocks

    def has_seq(self, seq_id: int) -> bool:
        """Whether `seq_id` holds a block table."""
        return seq_id in self._tables

    def block_table(self, seq_id: int) -> list[int]:
        """A copy of seq_id's block table (block ids, in token order)."""
        return list(self._table(seq_id))

    def num_tokens(self, seq_id: int) -> int:
        """How many tokens seq_id's table covers."""
        self._table(seq_id)
        return self._num_tokens[seq_id]

    def _table(self, seq_id: int) -> list[int]:
        table = self._tables.get(seq_id)
        if table is None:
            raise KeyError(f"seq_id {seq_id} has no block table")
        return table

    def _blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _match_prefix(self, keys: Sequence[int], num_tokens: int, salt: Salt) -> tuple[list[int], list[bytes]]:
        """(blocks, chain) of the longest registered prefix of keys under this salt, covering at
        most num_tokens - 1 tokens; chain is the root digest then the digests of those blocks."""
        blocks: list[int] = []
        chain = [root_digest(salt)]
        if not self.enable_prefix_caching:
            return blocks, chain
        bs = self.block_size
        for j in range((num_tokens - 1) // bs):
            digest = block_digest(chain[-1], keys[j * bs:(j + 1) * bs])
            block = self._cached.get(digest)
            if block is None:
                break
            blocks.append(block)
            chain.append(digest)
        return blocks, chain

    def _check_tokens(self, keys: Sequence[int], num_tokens: int) -> None:
        if num_tokens < 1:
            raise ValueError(f"num_tokens must be >= 1, got {num_tokens}")
        if len(keys) < num_tokens:
            raise ValueError(f"len(keys) ({len(keys)}) < num_tokens ({num_tokens})")

    def can_allocate(self, keys: Sequence[int], num_tokens: int, salt: Salt = None) -> bool:
        """Whether `allocate` of num_tokens tokens with this salt would succeed now. A hit on an
        evictable block still takes it from the free count; a hit on a used block costs nothing."""
        self._check_tokens(keys, num_tokens)
        hits, _ = self._match_prefix(keys, num_tokens, salt)
        needed = self._blocks_for(num_tokens) - len(hits) + sum(self._ref[b] == 0 for b in hits)
        return needed <= self.num_free_blocks

    def _append_cost(self, seq_id: int, num_tokens: int) -> int:
        table, old = self._table(seq_id), self._num_tokens[seq_id]
        if num_tokens < old:
            raise ValueError(f"seq_id {seq_id} already covers {old} tokens; cannot shrink to {num_tokens}")
        return self._blocks_for(num_tokens) - len(table)

    def can_append(self, seq_id: int, num_tokens: int) -> bool:
        """Whether `append_slots(seq_id, num_tokens)` would succeed now."""
        return self._append_cost(seq_id, num_tokens) <= self.num_free_blocks

    # ----------------------------------------------------------------------------- mutations
    def _take_block(self) -> int:
        """A block with refcount 1: a free one first, else evict the least recently used."""
        if self._free:
            block = self._free.popleft()
        elif self._evictable:
            block, _ = self._evictable.popitem(last=False)
            del self._cached[self._key_of.pop(block)]
        else:
            raise RuntimeError("out of KV blocks")
        self._ref[block] = 1
        return block

    def allocate(self, seq_id: int, keys: Sequence[int], num_tokens: int, salt: Salt = None) -> int:
        """Give seq_id a table covering num_tokens tokens, reusing the longest committed prefix.

        keys[i] is token i's content key (len(keys) >= num_tokens), an int in the signed 64-bit
        range. salt: the request's cache salt; only blocks committed under an equal salt are hit,
        and the blocks this sequence commits are registered under it. Returns num_cached_tokens: a
        multiple of block_size, at most num_tokens - 1, whose KV is already in the cache.
        """
        if seq_id in self._tables:
            raise ValueError(f"seq_id {seq_id} already has a block table")
        self._check_tokens(keys, num_tokens)
        hits, chain = self._match_prefix(keys, num_tokens, salt)
        needed = self._blocks_for(num_tokens) - len(hits) + sum(self._ref[b] == 0 for b in hits)
        if needed > self.num_free_blocks:
            raise RuntimeError(f"out of KV blocks: seq_id {seq_id} needs {needed}, "
                               f"{self.num_free_blocks} free")
        for block in hits:  # claim the hits first so fresh allocations cannot evict them
            if self._ref[block] == 0:
                del self._evictable[block]
            self._ref[block] += 1
        fresh = [self._take_block() for _ in range(self._blocks_for(num_tokens) - len(hits))]
        self._tables[seq_id] = hits + fresh
        self._num_tokens[seq_id] = num_tokens
        self._chain[seq_id] = chain
        num_cached = len(hits) * self.block_size
        self.prefix_query_tokens += num_tokens
        self.prefix_hit_tokens += num_cached
        return num_cached

    def append_slots(self, seq_id: int, num_tokens: int) -> None:
        """Grow seq_id's table to cover num_tokens tokens in total. Its last block is never shared
        while partly filled (prefix hits are whole blocks), so new slots are written in place."""
        cost = self._append_cost(seq_id, num_tokens)
        if cost > self.num_free_blocks:
            raise RuntimeError(f"out of KV blocks: seq_id {seq_id} needs {cost}, "
                               f"{self.num_free_blocks} free")
        table = self._tables[seq_id]
        table.extend(self._take_block() for _ in range(self._blocks_for(num_tokens) - len(table)))
        self._num_tokens[seq_id] = num_tokens

    def fork_cost(self, parent_id: int) -> int:
        """Blocks `fork(parent_id, ...)` takes: 1 when the parent's last block is partly filled, else 0."""
        self._table(parent_id)
        return int(self._num_tokens[parent_id] % self.block_size != 0)

    def fork(self, parent_id: int, child_id: int) -> tuple[int, int] | None:
        """Give child_id a table over the same tokens as parent_id's, sharing its blocks (the n
        samples of one prompt). Full blocks are shared (refcount + 1): nothing writes them again. A
        partly filled last block is copied on write, the write being certain: both sequences put
        their next token in it, so the child gets a fresh block now. Returns (parent's block, child's
        block) whose KV the caller copies, or None when every block is full. The child inherits the
        parent's committed chain (its blocks are registered under the same salt)."""
        if child_id in self._tables:
            raise ValueError(f"seq_id {child_id} already has a block table")
        table = self._table(parent_id)
        if self.fork_cost(parent_id) > self.num_free_blocks:
            raise RuntimeError(f"out of KV blocks: forking seq_id {parent_id} needs 1, {self.num_free_blocks} free")
        shared = table if self.fork_cost(parent_id) == 0 else table[:-1]
        for block in shared:
            self._ref[block] += 1
        copy = None
        child = list(shared)
        if len(shared) < len(table):
            copy = (table[-1], self._take_block())
            child.append(copy[1])
        self._tables[child_id] = child
        self._num_tokens[child_id] = self._num_tokens[parent_id]
        self._chain[child_id] = list(self._chain[parent_id])
        return copy

    def commit(self, seq_id: int, keys: Sequence[int], num_computed_tokens: int) -> None:
        """Record that KV of seq_id's first num_computed_tokens tokens is written: register every
        full block up to there, under the salt given to `allocate`, so later sequences can hit it.
        A digest already registered to another block keeps that block (this one then stays
        unregistered and frees plainly)."""
        table, chain = self._table(seq_id), self._chain[seq_id]
        if num_computed_tokens > self._num_tokens[seq_id] or num_computed_tokens > len(keys):
            raise ValueError(f"num_computed_tokens ({num_computed_tokens}) exceeds the table "
                             f"({self._num_tokens[seq_id]} tokens) or len(keys) ({len(keys)})")
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        for j in range(len(chain) - 1, num_computed_tokens // bs):
            digest = block_digest(chain[-1], keys[j * bs:(j + 1) * bs])
            block = table[j]
            if block not in self._key_of and digest not in self._cached:
                self._cached[digest] = block
                self._key_of[block] = digest
            chain.append(digest)

    def free(self, seq_id: int) -> None:
        """Drop seq_id's references. Blocks reaching refcount 0 become evictable if registered,
        else free. The tail is released first, so a prefix's first blocks are evicted last."""
        table = self._table(seq_id)
        for block in reversed(table):
            self._ref[block] -= 1
            if self._ref[block] == 0:
                if block in self._key_of:
                    self._evictable[block] = None
                else:
                    self._free.append(block)
        del self._tables[seq_id], self._num_tokens[seq_id], self._chain[seq_id]
