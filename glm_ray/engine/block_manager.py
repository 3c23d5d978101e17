"""Paged KV-cache bookkeeping: fixed-size blocks, per-sequence block tables, prefix caching.

A block holds the KV of `block_size` consecutive positions of one sequence. With prefix caching
on, a FULL computed block is registered under a hash chain over token ids
(`hash((parent_hash, tuple(block_token_ids)))`); a new sequence whose prompt starts with the same
tokens shares those blocks (ref-counted) instead of computing them again. A block whose ref count
drops to zero stays cached and is evicted, least recently freed first, only when a free block is
needed. Block token ids are stored and compared on every match, so a hash collision can only
cost a cache miss, never wrong KV.
"""
from __future__ import annotations

from collections import OrderedDict, deque

from glm_ray.engine.sequence import Sequence

NO_PARENT_HASH = -1  # parent of a sequence's first block


def hash_block(parent_hash: int, token_ids: list[int] | tuple[int, ...]) -> int:
    """Hash of one full block, chained to the hash of the block before it."""
    return hash((parent_hash, tuple(token_ids)))


def slot_mapping(block_table: list[int], block_size: int, start: int, end: int) -> list[int]:
    """KV-cache slot of each position in [start, end): block_table[p // bs] * bs + p % bs."""
    if end > len(block_table) * block_size:
        raise ValueError(f"positions up to {end} need {-(-end // block_size)} blocks, "
                         f"the block table has {len(block_table)}")
    return [block_table[p // block_size] * block_size + p % block_size
            for p in range(start, end)]


class Block:
    __slots__ = ("block_id", "ref_count", "hash", "token_ids")

    def __init__(self, block_id: int):
        self.block_id = block_id
        self.ref_count = 0
        self.hash: int | None = None  # set while registered in the prefix cache
        self.token_ids: tuple[int, ...] | None = None  # the block's tokens, while registered


class BlockManager:
    """Hands out physical KV blocks; owns the free list and the prefix cache."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"num_blocks and block_size must be >= 1, "
                             f"got {num_blocks} and {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free_block_ids: deque[int] = deque(range(num_blocks))  # uncached, ref 0
        self.evictable: OrderedDict[int, None] = OrderedDict()  # cached, ref 0; LRU first
        self.hash_to_block: dict[int, int] = {}

    # --- counts -------------------------------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        """Blocks that can be handed out now, counting cached blocks nobody references."""
        return len(self.free_block_ids) + len(self.evictable)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks

    @property
    def num_cached_blocks(self) -> int:
        return len(self.hash_to_block)

    def num_blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def num_fitting_tokens(self, seq: Sequence, extra_blocks: int = 0) -> int:
        """How many positions past num_computed_tokens the table plus free blocks can hold."""
        num_blocks = len(seq.block_table) + self.num_free_blocks - extra_blocks
        return num_blocks * self.block_size - seq.num_computed_tokens

    # --- prefix cache -------------------------------------------------------------------------

    def _hashes(self, seq: Sequence, num_full_blocks: int) -> list[int]:
        """seq.block_hashes extended to at least `num_full_blocks` entries."""
        bs = self.block_size
        hashes = seq.block_hashes
        while len(hashes) < num_full_blocks:
            i = len(hashes)
            parent = hashes[-1] if hashes else NO_PARENT_HASH
            hashes.append(hash_block(parent, seq.token_ids[i * bs:(i + 1) * bs]))
        return hashes

    def match_prefix(self, seq: Sequence) -> list[int]:
        """Cached blocks equal to the start of seq.token_ids; changes nothing.

        Capped at (len - 1) // block_size blocks so at least one token is left to compute:
        the engine needs that token's logits to sample.
        """
        if not self.enable_prefix_caching:
            return []
        bs = self.block_size
        max_blocks = (len(seq.token_ids) - 1) // bs
        matched: list[int] = []
        for i, h in enumerate(self._hashes(seq, max_blocks)[:max_blocks]):
            block_id = self.hash_to_block.get(h)
            if block_id is None or self.blocks[block_id].token_ids != tuple(
                    seq.token_ids[i * bs:(i + 1) * bs]):
                break
            matched.append(block_id)
        return matched

    def num_evictable_in(self, block_ids: list[int]) -> int:
        """How many of these cached blocks are unreferenced, i.e. counted as free."""
        return sum(1 for b in block_ids if self.blocks[b].ref_count == 0)

    def take_prefix(self, seq: Sequence, block_ids: list[int]) -> None:
        """Start seq's block table with shared cached blocks; their KV counts as computed."""
        assert not seq.block_table and seq.num_computed_tokens == 0, seq
        for block_id in block_ids:
            block = self.blocks[block_id]
            if block.ref_count == 0:
                del self.evictable[block_id]
            block.ref_count += 1
            seq.block_table.append(block_id)
        seq.num_computed_tokens = seq.num_cached_tokens = len(block_ids) * self.block_size

    def register(self, seq: Sequence, num_computed_before: int) -> None:
        """Cache seq's blocks that became full and computed since `num_computed_before`."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        first, last = num_computed_before // bs, seq.num_computed_tokens // bs
        hashes = self._hashes(seq, last)
        for i in range(first, last):
            block = self.blocks[seq.block_table[i]]
            # Already registered (shared), or another block already holds this content.
            if block.hash is not None or hashes[i] in self.hash_to_block:
                continue
            block.hash = hashes[i]
            block.token_ids = tuple(seq.token_ids[i * bs:(i + 1) * bs])
            self.hash_to_block[block.hash] = block.block_id

    # --- allocation ---------------------------------------------------------------------------

    def _pop_free_block(self) -> Block:
        if self.free_block_ids:
            block = self.blocks[self.free_block_ids.popleft()]
        else:  # evict the least recently freed cached block
            block_id, _ = self.evictable.popitem(last=False)
            block = self.blocks[block_id]
            del self.hash_to_block[block.hash]
            block.hash = block.token_ids = None
        block.ref_count = 1
        return block

    def allocate(self, seq: Sequence, num_tokens: int) -> bool:
        """Grow seq's block table to hold positions [0, num_tokens).

        All or nothing: returns False, allocating nothing, if too few blocks are free.
        """
        num_new = self.num_blocks_for(num_tokens) - len(seq.block_table)
        if num_new > self.num_free_blocks:
            return False
        for _ in range(num_new):
            seq.block_table.append(self._pop_free_block().block_id)
        return True

    def free(self, seq: Sequence) -> None:
        """Release seq's blocks. Tail blocks are freed first so they are evicted first:
        the head of a sequence is the part other prompts are most likely to share."""
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            assert block.ref_count >= 0, f"block {block_id} freed twice"
            if block.ref_count == 0:
                if block.hash is not None:
                    self.evictable[block_id] = None
                else:
                    self.free_block_ids.append(block_id)
        seq.block_table = []
