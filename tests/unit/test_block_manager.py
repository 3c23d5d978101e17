"""BlockManager on its own: allocation, slot mapping, prefix sharing, LRU eviction. No torch."""
import pytest

from glm_ray.engine import block_manager as bm_module
from glm_ray.engine.block_manager import BlockManager, slot_mapping
from glm_ray.engine.sequence import Sequence

BS = 4


def computed_seq(bm: BlockManager, seq_id, token_ids, max_tokens=4) -> Sequence:
    """A sequence whose whole prompt has been allocated and computed, as after a prefill."""
    seq = Sequence(seq_id, token_ids, max_tokens)
    prefix = bm.match_prefix(seq)
    bm.take_prefix(seq, prefix)
    assert bm.allocate(seq, len(token_ids))
    before = seq.num_computed_tokens
    seq.num_computed_tokens = len(token_ids)
    bm.register(seq, before)
    return seq


def test_slot_mapping():
    assert slot_mapping([3, 7], BS, 2, 6) == [14, 15, 28, 29]
    assert slot_mapping([3, 7], BS, 0, 8) == [12, 13, 14, 15, 28, 29, 30, 31]
    assert slot_mapping([5], BS, 3, 3) == []
    with pytest.raises(ValueError, match="need 3 blocks"):
        slot_mapping([3, 7], BS, 0, 9)


def test_allocate_and_free_return_every_block():
    bm = BlockManager(num_blocks=5, block_size=BS, enable_prefix_caching=False)
    a, b = Sequence("a", [1] * 9, 1), Sequence("b", [2] * 3, 1)
    assert bm.allocate(a, 9) and len(a.block_table) == 3
    assert bm.allocate(a, 12) and len(a.block_table) == 3  # still fits in block 3
    assert bm.allocate(b, 3) and len(b.block_table) == 1
    assert bm.num_free_blocks == 1 and bm.num_used_blocks == 4
    assert not bm.allocate(b, 9)  # needs 2 more, 1 free: all or nothing
    assert len(b.block_table) == 1 and bm.num_free_blocks == 1
    assert not set(a.block_table) & set(b.block_table)
    bm.free(a)
    bm.free(b)
    assert a.block_table == [] and b.block_table == []
    assert bm.num_free_blocks == 5 and bm.num_used_blocks == 0
    assert all(blk.ref_count == 0 for blk in bm.blocks)


def test_prefix_sharing_ref_counts_and_cap():
    bm = BlockManager(num_blocks=10, block_size=BS)
    shared = list(range(100, 108))  # two full blocks
    a = computed_seq(bm, "a", shared + [1, 2, 3])
    assert bm.num_cached_blocks == 2  # the partial third block is not cached

    b = Sequence("b", shared + [9, 9], 4)
    prefix = bm.match_prefix(b)
    assert prefix == a.block_table[:2]
    bm.take_prefix(b, prefix)
    assert b.num_computed_tokens == b.num_cached_tokens == 8
    assert [bm.blocks[i].ref_count for i in prefix] == [2, 2]
    assert bm.allocate(b, len(b.token_ids))
    assert b.block_table[2] != a.block_table[2]

    # A prompt that is exactly the two cached blocks may reuse only one: one token must
    # be left to compute for its logits.
    c = Sequence("c", shared, 4)
    assert bm.match_prefix(c) == a.block_table[:1]

    bm.free(a)
    assert [bm.blocks[i].ref_count for i in prefix] == [1, 1]
    bm.free(b)
    assert bm.num_free_blocks == 10 and bm.num_cached_blocks == 2  # still cached
    assert bm.match_prefix(Sequence("d", shared + [0], 4)) == prefix


def test_hash_chain_depends_on_parent_block():
    bm = BlockManager(num_blocks=10, block_size=BS)
    computed_seq(bm, "a", [1, 2, 3, 4, 5, 6, 7, 8, 0])
    # Second block's tokens equal, first block's not: no match at all.
    assert bm.match_prefix(Sequence("b", [9, 9, 9, 9, 5, 6, 7, 8, 0], 1)) == []
    # First block equal, second differs: only the first matches.
    assert len(bm.match_prefix(Sequence("c", [1, 2, 3, 4, 5, 6, 7, 9, 0], 1))) == 1


def test_hash_collision_cannot_share_wrong_kv(monkeypatch):
    monkeypatch.setattr(bm_module, "hash_block", lambda parent, token_ids: 42)
    bm = BlockManager(num_blocks=10, block_size=BS)
    a = computed_seq(bm, "a", [1, 2, 3, 4, 0])
    assert bm.num_cached_blocks == 1
    assert bm.match_prefix(Sequence("b", [5, 6, 7, 8, 0], 1)) == []  # same hash, other tokens
    assert bm.match_prefix(Sequence("c", [1, 2, 3, 4, 0], 1)) == a.block_table[:1]


def test_unreferenced_cached_blocks_are_evicted_lru_tail_first():
    bm = BlockManager(num_blocks=4, block_size=BS)
    a = computed_seq(bm, "a", list(range(0, 8)))
    b = computed_seq(bm, "b", list(range(10, 18)))
    a_blocks, b_blocks = list(a.block_table), list(b.block_table)
    assert bm.num_free_blocks == 0 and bm.num_cached_blocks == 4
    bm.free(a)
    bm.free(b)
    assert list(bm.evictable) == [a_blocks[1], a_blocks[0], b_blocks[1], b_blocks[0]]

    # Reusing b's head makes it most recently used.
    c = Sequence("c", list(range(10, 14)) + [0], 1)
    bm.take_prefix(c, bm.match_prefix(c))
    assert c.block_table == [b_blocks[0]]
    bm.free(c)
    assert list(bm.evictable) == [a_blocks[1], a_blocks[0], b_blocks[1], b_blocks[0]]

    d = Sequence("d", [7] * 8, 1)
    assert bm.allocate(d, 4)
    assert d.block_table == [a_blocks[1]]  # least recently freed goes first
    assert bm.num_cached_blocks == 3
    # a's head is still cached, its tail is gone.
    assert bm.match_prefix(Sequence("e", list(range(0, 8)) + [0], 1)) == a_blocks[:1]
    assert bm.allocate(d, 8) and d.block_table[1] == a_blocks[0]
    assert bm.match_prefix(Sequence("f", list(range(0, 8)) + [0], 1)) == []


def test_free_uncached_blocks_come_before_eviction():
    bm = BlockManager(num_blocks=3, block_size=BS)
    a = computed_seq(bm, "a", list(range(4)) + [0])  # 1 cached block, 1 partial block
    bm.free(a)
    assert bm.num_free_blocks == 3 and len(bm.evictable) == 1
    b = Sequence("b", [9] * 8, 1)
    assert bm.allocate(b, 8)
    assert bm.num_cached_blocks == 1  # the cached block survived


def test_duplicate_content_is_registered_once():
    bm = BlockManager(num_blocks=6, block_size=BS)
    # Computed side by side, before either was cached: both hold the same content.
    a, b = Sequence("a", [1, 2, 3, 4, 5], 1), Sequence("b", [1, 2, 3, 4, 6], 1)
    for seq in (a, b):
        assert bm.allocate(seq, 5)
        seq.num_computed_tokens = 5
    bm.register(a, 0)
    bm.register(b, 0)
    assert bm.hash_to_block == {bm.blocks[a.block_table[0]].hash: a.block_table[0]}
    assert bm.blocks[b.block_table[0]].hash is None
    bm.free(b)
    assert len(bm.free_block_ids) == 4 and not bm.evictable  # b's copy went straight back


def test_prefix_caching_off_registers_nothing():
    bm = BlockManager(num_blocks=4, block_size=BS, enable_prefix_caching=False)
    a = computed_seq(bm, "a", list(range(9)))
    assert bm.num_cached_blocks == 0
    assert bm.match_prefix(Sequence("b", list(range(9)), 1)) == []
    bm.free(a)
    assert len(bm.free_block_ids) == 4 and not bm.evictable
