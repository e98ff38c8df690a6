"""BlockManager: allocation, ref counts, the prefix cache and its LRU reuse, with exact block ids."""

from __future__ import annotations

import pytest

import engine.block_manager as block_manager_module
from engine.block_manager import BlockManager
from engine.sampling_params import SamplingParams
from engine.sequence import Sequence

BS = 4  # block size used throughout: small so block boundaries are easy to reason about


def make_seq(tokens, request_id="r") -> Sequence:
    return Sequence(request_id, list(tokens), SamplingParams(max_tokens=8))


def compute(bm: BlockManager, seq: Sequence, holders=None) -> Sequence:
    """Play the scheduler for a whole prompt: take the cached prefix, allocate, mark computed, cache full blocks."""
    prefix = bm.find_cached_prefix(seq)
    assert bm.can_allocate(seq, seq.num_tokens, prefix)
    bm.take_prefix(seq, prefix)
    bm.allocate(seq, seq.num_tokens - seq.num_computed_tokens)
    seq.num_computed_tokens = seq.num_tokens
    bm.cache_full_blocks(seq)
    if holders is not None:
        bm.check_integrity(holders)
    return seq


def cached_ids(bm: BlockManager) -> set[int]:
    return set(bm.cached.values())


# -- plain allocation -----------------------------------------------------------------------------------------


def test_fresh_pool_allocates_in_order():
    bm = BlockManager(8, BS, enable_prefix_caching=False)
    a, b = make_seq(range(10), "a"), make_seq(range(3), "b")
    bm.allocate(a, 10)
    assert a.block_table == [0, 1, 2]
    bm.allocate(b, 3)
    assert b.block_table == [3]
    assert bm.num_free_blocks == 4
    assert [bm.blocks[i].ref_count for i in range(8)] == [1, 1, 1, 1, 0, 0, 0, 0]
    bm.check_integrity([a, b])


@pytest.mark.parametrize(
    "num_tokens,blocks", [(1, 1), (3, 1), (4, 1), (5, 2), (7, 2), (8, 2), (9, 3), (16, 4), (17, 5)]
)
def test_block_count_across_boundaries(num_tokens, blocks):
    bm = BlockManager(10, BS)
    assert bm.blocks_for(num_tokens) == blocks
    seq = make_seq(range(num_tokens))
    bm.allocate(seq, num_tokens)
    assert len(seq.block_table) == blocks
    assert bm.num_free_blocks == 10 - blocks


def test_allocate_grows_incrementally():
    bm = BlockManager(10, BS)
    seq = make_seq(range(3))
    bm.allocate(seq, 3)
    assert seq.block_table == [0]
    seq.num_computed_tokens = 3
    bm.allocate(seq, 1)  # token 4 still fits block 0
    assert seq.block_table == [0]
    seq.num_computed_tokens = 4
    bm.allocate(seq, 1)  # token 5 needs a new block
    assert seq.block_table == [0, 1]
    seq.num_computed_tokens = 5
    bm.allocate(seq, 6)  # up to 11 tokens: 3 blocks
    assert seq.block_table == [0, 1, 2]
    bm.check_integrity([seq])


def test_can_allocate_counts_free_blocks():
    bm = BlockManager(3, BS)
    seq = make_seq(range(20))
    assert bm.can_allocate(seq, 12)
    assert not bm.can_allocate(seq, 13)
    bm.allocate(seq, 8)
    seq.num_computed_tokens = 8
    assert bm.can_allocate(seq, 4)
    assert not bm.can_allocate(seq, 5)


def test_free_returns_blocks():
    bm = BlockManager(6, BS, enable_prefix_caching=False)
    a, b = make_seq(range(9), "a"), make_seq(range(5), "b")
    bm.allocate(a, 9)
    bm.allocate(b, 5)
    assert bm.num_free_blocks == 1
    assert bm.usage() == pytest.approx(5 / 6)
    bm.free_sequence(a)
    assert a.block_table == [] and a.num_hashed_blocks == 0
    assert bm.num_free_blocks == 4
    assert all(bm.blocks[i].ref_count == 0 for i in (0, 1, 2))
    bm.check_integrity([b])
    bm.free_sequence(b)
    assert bm.num_free_blocks == 6
    assert bm.usage() == 0.0
    bm.check_integrity([])


# -- prefix cache -----------------------------------------------------------------------------------------------


def test_prefix_hit_shares_the_same_blocks():
    bm = BlockManager(10, BS)
    prompt = list(range(10))  # blocks [0..3] [4..7] and a partial [8, 9]
    a = compute(bm, make_seq(prompt, "a"), holders=None)
    assert a.block_table == [0, 1, 2]
    assert a.num_hashed_blocks == 2
    assert cached_ids(bm) == {0, 1}  # only full blocks are registered

    b = make_seq(prompt + [42, 43], "b")
    prefix = bm.find_cached_prefix(b)
    assert prefix == [0, 1]
    bm.take_prefix(b, prefix)
    assert b.block_table == [0, 1]
    assert b.num_computed_tokens == 8
    assert b.num_cached_tokens == 8
    assert bm.blocks[0].ref_count == 2 and bm.blocks[1].ref_count == 2
    assert bm.blocks[2].ref_count == 1
    bm.allocate(b, b.num_tokens - 8)
    assert b.block_table == [0, 1, 3]  # the partial block 2 is a's own; b gets a new one
    bm.check_integrity([a, b])
    assert bm.num_hits == 8 and bm.num_queries == 10 + 12


def test_only_full_blocks_shared_partial_prefix():
    bm = BlockManager(10, BS)
    compute(bm, make_seq(range(10), "a"))
    # Same first block, differs inside the second: only block 0 is shared.
    b = make_seq([0, 1, 2, 3, 4, 5, 99, 7, 8, 9], "b")
    assert bm.find_cached_prefix(b) == [0]
    # Shorter than one block + 1 token: nothing to share.
    assert bm.find_cached_prefix(make_seq([0, 1, 2], "c")) == []
    assert bm.find_cached_prefix(make_seq([0, 1, 2, 3], "d")) == []  # one full block but no token left
    assert bm.find_cached_prefix(make_seq([0, 1, 2, 3, 4], "e")) == [0]


def test_exact_full_blocks_leave_one_token_to_compute():
    bm = BlockManager(10, BS)
    prompt = list(range(12))  # exactly 3 full blocks
    a = compute(bm, make_seq(prompt, "a"))
    assert cached_ids(bm) == {0, 1, 2}
    b = make_seq(prompt, "b")
    prefix = bm.find_cached_prefix(b)
    assert prefix == [0, 1]  # N-1 blocks: the last token's logits must be computed
    bm.take_prefix(b, prefix)
    assert b.num_computed_tokens == 8
    assert bm.can_allocate(b, 4)
    bm.allocate(b, 4)
    assert b.block_table == [0, 1, 3]
    bm.check_integrity([a, b])


def test_hash_is_confirmed_by_tokens(monkeypatch):
    monkeypatch.setattr(block_manager_module, "block_hash", lambda parent, tokens: 1234)
    bm = BlockManager(12, BS)
    a = compute(bm, make_seq([1, 1, 1, 1, 1, 1, 1, 1, 2], "a"))
    # Every block collides; a different prefix must not be served.
    assert bm.find_cached_prefix(make_seq([5, 5, 5, 5, 1, 1, 1, 1, 2], "b")) == []
    # Same first block: served. The second block has the same tokens as the first and the same (colliding) hash,
    # but it is another position: serving block 0 again would be wrong KV.
    c = make_seq([1, 1, 1, 1, 1, 1, 1, 1, 2], "c")
    prefix = bm.find_cached_prefix(c)
    assert prefix == [a.block_table[0]]
    bm.take_prefix(c, prefix)
    bm.allocate(c, c.num_tokens - c.num_computed_tokens)
    bm.check_integrity([a, c])


def test_hash_collision_after_another_prefix_not_served(monkeypatch):
    # Hashes ignore the parent: block (9,9,9,9) after prefix X collides with (9,9,9,9) after prefix Y.
    monkeypatch.setattr(block_manager_module, "block_hash", lambda parent, tokens: hash(tokens))
    bm = BlockManager(12, BS)
    compute(bm, make_seq([1, 2, 3, 4, 9, 9, 9, 9, 0], "a"))
    y = compute(bm, make_seq([5, 6, 7, 8, 0], "y"))  # registers block (5,6,7,8) at block 4
    assert y.block_table[0] in cached_ids(bm)
    b = make_seq([5, 6, 7, 8, 9, 9, 9, 9, 0], "b")
    assert bm.find_cached_prefix(b) == [y.block_table[0]]  # not a's (9,9,9,9) block, computed after 1,2,3,4


def test_freed_cached_blocks_stay_findable():
    bm = BlockManager(6, BS)
    prompt = list(range(9))
    a = compute(bm, make_seq(prompt, "a"))
    assert a.block_table == [0, 1, 2]
    bm.free_sequence(a)
    assert bm.num_free_blocks == 6
    assert cached_ids(bm) == {0, 1}
    b = make_seq(prompt, "b")
    prefix = bm.find_cached_prefix(b)
    assert prefix == [0, 1]
    assert bm.can_allocate(b, 9, prefix)
    bm.take_prefix(b, prefix)
    assert bm.blocks[0].ref_count == 1 and bm.num_free_blocks == 4
    bm.allocate(b, 1)
    assert b.block_table == [0, 1, 2]  # block 2 (unhashed) is reused first
    bm.check_integrity([b])


def test_can_allocate_counts_prefix_blocks_taken_from_free():
    bm = BlockManager(3, BS)
    prompt = list(range(9))
    a = compute(bm, make_seq(prompt, "a"))
    bm.free_sequence(a)  # blocks 0 and 1 stay cached, on the free list
    assert bm.num_free_blocks == 3
    b = make_seq(prompt + list(range(100, 104)), "b")  # 13 tokens: 4 blocks, 2 of them from the cache
    prefix = bm.find_cached_prefix(b)
    assert prefix == [0, 1]
    assert bm.can_allocate(b, 8 + 4, prefix)  # 3 blocks: two cached + one free
    assert not bm.can_allocate(b, 8 + 5, prefix)  # 4 blocks: only 3 exist


def test_lru_eviction_of_freed_cached_blocks():
    bm = BlockManager(8, BS)
    a = compute(bm, make_seq([1] * 4 + [2] * 4 + [3], "a"))  # blocks 0, 1 full (cached), 2 partial
    b = compute(bm, make_seq([7] * 4 + [8] * 4 + [9], "b"))  # blocks 3, 4 cached, 5 partial
    assert a.block_table == [0, 1, 2] and b.block_table == [3, 4, 5]
    bm.free_sequence(a)  # freed first: a's cached blocks are the least recently used
    bm.free_sequence(b)
    assert cached_ids(bm) == {0, 1, 3, 4}
    # Free order: unhashed partial blocks first (5, 2), then never-used 6, 7, then cached LRU: 1, 0, 4, 3.
    c = make_seq(list(range(100, 125)), "c")  # 25 tokens: 7 blocks
    bm.allocate(c, 20)  # 5 blocks: the two unhashed, the two never used, then one cached (a's tail block 1)
    assert c.block_table == [5, 2, 6, 7, 1]
    assert cached_ids(bm) == {0, 3, 4}
    # a's first block survives (tail freed first); a prefix query now finds only block 0.
    assert bm.find_cached_prefix(make_seq([1] * 4 + [2] * 4 + [3], "a2")) == [0]
    assert bm.find_cached_prefix(make_seq([7] * 4 + [8] * 4 + [9], "b2")) == [3, 4]
    c.num_computed_tokens = 20
    bm.allocate(c, 5)  # 2 more: a's block 0, then b's tail block 4
    assert c.block_table[-2:] == [0, 4]
    assert cached_ids(bm) == {3}
    assert bm.find_cached_prefix(make_seq([7] * 4 + [8] * 4 + [9], "b3")) == [3]
    bm.check_integrity([c])


def test_reused_cached_block_moves_to_most_recent():
    bm = BlockManager(4, BS)
    a = compute(bm, make_seq([1] * 4 + [0], "a"))  # block 0 cached, 1 partial
    b = compute(bm, make_seq([2] * 4 + [0], "b"))  # block 2 cached, 3 partial
    bm.free_sequence(a)
    bm.free_sequence(b)
    # a's block is older; touching it again (a hit, then free) makes b's the least recently used.
    c = compute(bm, make_seq([1] * 4 + [5], "c"))
    assert c.block_table[0] == 0
    bm.free_sequence(c)
    d = make_seq(list(range(100, 113)), "d")  # 13 tokens: 4 blocks, all of them
    bm.allocate(d, 12)  # 3 blocks: the unhashed ones, then the LRU cached one (b's block 2)
    assert 2 in d.block_table and 0 not in d.block_table
    assert cached_ids(bm) == {0}


def test_unhashed_blocks_reused_before_cached_ones():
    bm = BlockManager(4, BS)
    a = compute(bm, make_seq([1] * 4 + [2] * 2, "a"))  # block 0 cached, block 1 partial (unhashed)
    other = make_seq(range(8), "o")
    bm.allocate(other, 8)  # blocks 2, 3, never hashed (prefix caching not run for it)
    assert other.block_table == [2, 3]
    bm.free_sequence(a)  # block 1 (unhashed) goes to the front, block 0 (cached) to the back
    bm.free_sequence(other)
    c = make_seq(range(50, 62), "c")
    bm.allocate(c, 12)  # 3 blocks: every unhashed one before the cached block 0
    assert sorted(c.block_table) == [1, 2, 3]
    assert cached_ids(bm) == {0}
    bm.check_integrity([c])


def test_prefix_caching_disabled_gives_no_hits():
    bm = BlockManager(10, BS, enable_prefix_caching=False)
    prompt = list(range(13))
    a = compute(bm, make_seq(prompt, "a"))
    assert bm.cached == {} and a.num_hashed_blocks == 0
    assert all(b.hash is None for b in bm.blocks)
    b = make_seq(prompt, "b")
    assert bm.find_cached_prefix(b) == []
    bm.free_sequence(a)
    assert bm.find_cached_prefix(b) == []


def test_duplicate_content_is_shared_with_the_first_registration():
    bm = BlockManager(10, BS)
    prompt = list(range(9))
    a, b = make_seq(prompt, "a"), make_seq(prompt, "b")
    for s in (a, b):  # computed concurrently: neither found the other in the cache
        bm.allocate(s, 9)
    assert a.block_table == [0, 1, 2] and b.block_table == [3, 4, 5]
    for s in (a, b):
        s.num_computed_tokens = 9
        bm.cache_full_blocks(s)
    # b's full blocks are swapped for a's registered copies; its duplicates go back to the pool, reused first
    assert b.block_table == [0, 1, 5]
    assert [bm.blocks[i].ref_count for i in (0, 1, 3, 4)] == [2, 2, 0, 0]
    assert cached_ids(bm) == {0, 1}
    assert list(bm.free)[:2] == [3, 4] or list(bm.free)[:2] == [4, 3]
    bm.check_integrity([a, b])
    # b's later blocks chain onto the shared copies, so a longer prompt finds all of them
    b.token_ids.extend(range(9, 17))
    bm.allocate(b, 8)
    b.num_computed_tokens = 17
    bm.cache_full_blocks(b)
    assert bm.find_cached_prefix(make_seq(list(range(18)), "d")) == b.block_table[:4] == [0, 1, 5, 4]
    bm.free_sequence(b)
    bm.free_sequence(a)
    bm.check_integrity([])


def test_check_integrity_detects_corrupted_ref_count():
    bm = BlockManager(6, BS)
    a = compute(bm, make_seq(range(9), "a"))
    b = make_seq(range(9), "b")
    bm.take_prefix(b, bm.find_cached_prefix(b))
    bm.allocate(b, 1)
    bm.check_integrity([a, b])
    bm.blocks[0].ref_count = 1  # should be 2
    with pytest.raises(AssertionError, match="block 0"):
        bm.check_integrity([a, b])
    bm.blocks[0].ref_count = 2
    bm.check_integrity([a, b])
    with pytest.raises(AssertionError):
        bm.check_integrity([a])  # b's blocks unaccounted for


def test_check_integrity_detects_free_list_and_duplicates():
    bm = BlockManager(4, BS)
    a = compute(bm, make_seq(range(5), "a"))
    bm.free[a.block_table[0]] = None  # a held block on the free list
    with pytest.raises(AssertionError, match="free list"):
        bm.check_integrity([a])
    del bm.free[a.block_table[0]]
    a.block_table.append(a.block_table[0])
    with pytest.raises(AssertionError, match="duplicate"):
        bm.check_integrity([a])
