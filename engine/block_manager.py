"""Paged KV-cache bookkeeping: block tables, reference counts and a prefix cache.

The manager hands out block ids; it never touches tensors. Token i of a sequence lives in slot
i % block_size of block table[i // block_size].

Prefix cache. A full block whose KV has been written (`commit`) is registered under the key
(parent hash, tuple of its tokens' content keys), whose hash is the block's chain hash:

    hash(block j) = hash((hash(block j - 1), tuple(keys of block j))),   hash(block -1) = -1

(-1 is never a Python hash value). The dict lookup compares the whole key, so a hit needs the
block's own keys to match exactly and its parent's chain hash to match. Registered blocks are
immutable: nothing writes a full, committed block again.

Block states (every block is in exactly one):
  * free       refcount 0, no registered key, in `_free`;
  * evictable  refcount 0, registered key, in `_evictable` (LRU order, most recently freed last);
  * used       refcount >= 1, referenced by that many live block tables (registered or not).
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Sequence

_ROOT_HASH = -1  # parent hash of block 0; hash() never returns -1

BlockKey = tuple[int, tuple[int, ...]]  # (parent chain hash, content keys of the block)


class BlockManager:
    """Block tables for sequences, with shared prefix blocks (full, committed, never written again).

    Invariants (checked by tests/engine/test_block_manager.py after every operation):
      * refcount[b] == number of live tables containing b (a table holds a block at most once);
      * free, evictable and used partition range(num_blocks);
      * a table for a sequence of n tokens has exactly ceil(n / block_size) blocks;
      * registered keys and blocks map one to one; only used or evictable blocks are registered.
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
        self._cached: dict[BlockKey, int] = {}   # registered key -> block
        self._key_of: dict[int, BlockKey] = {}   # block -> its registered key
        self._tables: dict[int, list[int]] = {}
        self._num_tokens: dict[int, int] = {}    # tokens each table covers
        self._chain: dict[int, list[int]] = {}   # chain hashes of each seq's committed full blocks
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

    def _match_prefix(self, keys: Sequence[int], num_tokens: int) -> tuple[list[int], list[int]]:
        """(blocks, chain hashes) of the longest registered prefix of keys, covering at most
        num_tokens - 1 tokens."""
        blocks: list[int] = []
        hashes: list[int] = []
        if not self.enable_prefix_caching:
            return blocks, hashes
        parent, bs = _ROOT_HASH, self.block_size
        for j in range((num_tokens - 1) // bs):
            key = (parent, tuple(keys[j * bs:(j + 1) * bs]))
            block = self._cached.get(key)
            if block is None:
                break
            parent = hash(key)
            blocks.append(block)
            hashes.append(parent)
        return blocks, hashes

    def _check_tokens(self, keys: Sequence[int], num_tokens: int) -> None:
        if num_tokens < 1:
            raise ValueError(f"num_tokens must be >= 1, got {num_tokens}")
        if len(keys) < num_tokens:
            raise ValueError(f"len(keys) ({len(keys)}) < num_tokens ({num_tokens})")

    def can_allocate(self, keys: Sequence[int], num_tokens: int) -> bool:
        """Whether `allocate` of num_tokens tokens would succeed now. A hit on an evictable block
        still takes it from the free count; a hit on a used block costs nothing."""
        self._check_tokens(keys, num_tokens)
        hits, _ = self._match_prefix(keys, num_tokens)
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

    def allocate(self, seq_id: int, keys: Sequence[int], num_tokens: int) -> int:
        """Give seq_id a table covering num_tokens tokens, reusing the longest committed prefix.

        keys[i] is token i's content key (len(keys) >= num_tokens). Returns num_cached_tokens: a
        multiple of block_size, at most num_tokens - 1, whose KV is already in the cache.
        """
        if seq_id in self._tables:
            raise ValueError(f"seq_id {seq_id} already has a block table")
        self._check_tokens(keys, num_tokens)
        hits, hashes = self._match_prefix(keys, num_tokens)
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
        self._chain[seq_id] = hashes
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

    def commit(self, seq_id: int, keys: Sequence[int], num_computed_tokens: int) -> None:
        """Record that KV of seq_id's first num_computed_tokens tokens is written: register every
        full block up to there so later sequences can hit it. A key already registered to
        another block keeps that block (this one then stays unregistered and frees plainly)."""
        table, chain = self._table(seq_id), self._chain[seq_id]
        if num_computed_tokens > self._num_tokens[seq_id] or num_computed_tokens > len(keys):
            raise ValueError(f"num_computed_tokens ({num_computed_tokens}) exceeds the table "
                             f"({self._num_tokens[seq_id]} tokens) or len(keys) ({len(keys)})")
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        for j in range(len(chain), num_computed_tokens // bs):
            key = (chain[-1] if chain else _ROOT_HASH, tuple(keys[j * bs:(j + 1) * bs]))
            block = table[j]
            if block not in self._key_of and key not in self._cached:
                self._cached[key] = block
                self._key_of[block] = key
            chain.append(hash(key))

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
