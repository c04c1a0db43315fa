"""BlockPool, its doubly linked free queue and the host pool used by swap."""
from __future__ import annotations

import pytest

from core.block_pool import BlockPool, FreeBlockQueue, HostBlockPool, KVCacheBlock


def ids(pool: BlockPool) -> list[int]:
    return pool.free_block_queue.block_ids()


# --- FreeBlockQueue ----------------------------------------------------------------------
def test_queue_starts_in_block_order():
    blocks = [KVCacheBlock(i) for i in range(5)]
    q = FreeBlockQueue(blocks)
    assert q.num_free_blocks == 5
    assert q.block_ids() == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("victim", [0, 2, 4])
def test_queue_remove_from_head_middle_tail(victim):
    blocks = [KVCacheBlock(i) for i in range(5)]
    q = FreeBlockQueue(blocks)
    q.remove(blocks[victim])
    assert q.block_ids() == [i for i in range(5) if i != victim]
    assert q.num_free_blocks == 4
    assert blocks[victim].prev is None and blocks[victim].next is None
    # Neighbours are relinked both ways.
    order = q.block_ids()
    for a, b in zip(order, order[1:]):
        assert blocks[a].next is blocks[b] and blocks[b].prev is blocks[a]


class _Tripwire(KVCacheBlock):
    """A block whose links may not be read: any walk along the list through it fails."""
    __slots__ = ()

    def __getattribute__(self, name):
        if name in ("prev", "next"):
            raise AssertionError("remove() walked the list")
        return object.__getattribute__(self, name)


def test_queue_remove_is_constant_time():
    """Removing from the middle reads only the block's own links (no scan from the head)."""
    blocks = [KVCacheBlock(i) for i in range(7)]
    q = FreeBlockQueue(blocks)
    for i in (0, 1, 5, 6):  # everything but the victim and its neighbours
        blocks[i].__class__ = _Tripwire
    q.remove(blocks[3])
    assert q.num_free_blocks == 6
    for i in (0, 1, 5, 6):
        blocks[i].__class__ = KVCacheBlock
    assert q.block_ids() == [0, 1, 2, 4, 5, 6]
    assert blocks[2].next is blocks[4] and blocks[4].prev is blocks[2]


def test_queue_popleft_append_lru_order():
    blocks = [KVCacheBlock(i) for i in range(3)]
    q = FreeBlockQueue(blocks)
    assert q.popleft() is blocks[0]
    q.append(blocks[0])
    assert q.block_ids() == [1, 2, 0]
    assert q.popleft().block_id == 1


def test_queue_guards():
    blocks = [KVCacheBlock(i) for i in range(2)]
    q = FreeBlockQueue(blocks)
    with pytest.raises(RuntimeError):
        q.append(blocks[0])  # already queued
    q.remove(blocks[0])
    with pytest.raises(RuntimeError):
        q.remove(blocks[0])  # not queued any more
    q.popleft()
    with pytest.raises(RuntimeError):
        q.popleft()
    assert q.num_free_blocks == 0 and q.block_ids() == []


# --- BlockPool -----------------------------------------------------------------------------
def test_pool_rejects_empty():
    with pytest.raises(ValueError, match="num_blocks"):
        BlockPool(0)


def test_allocation_pops_head_and_free_goes_to_tail():
    pool = BlockPool(6)
    a = pool.get_new_blocks(2)
    assert [b.block_id for b in a] == [0, 1]
    assert all(b.ref_cnt == 1 for b in a)
    assert ids(pool) == [2, 3, 4, 5]
    pool.free_blocks([a[1], a[0]])  # a request frees tail first
    assert ids(pool) == [2, 3, 4, 5, 1, 0]
    b = pool.get_new_blocks(5)
    assert [x.block_id for x in b] == [2, 3, 4, 5, 1]  # least recently freed first
    assert ids(pool) == [0]
    assert pool.num_free_blocks == 1
    assert pool.usage() == pytest.approx(5 / 6)


def test_get_more_than_free_raises_and_changes_nothing():
    pool = BlockPool(4)
    pool.get_new_blocks(3)
    with pytest.raises(RuntimeError, match="only 1 free"):
        pool.get_new_blocks(2)
    assert pool.num_free_blocks == 1 and ids(pool) == [3]


def test_shared_block_is_freed_only_at_ref_zero():
    pool = BlockPool(3)
    (b,) = pool.get_new_blocks(1)
    pool.touch([b])
    assert b.ref_cnt == 2
    pool.free_blocks([b])
    assert b.ref_cnt == 1 and b.block_id not in ids(pool)
    pool.free_blocks([b])
    assert b.ref_cnt == 0 and ids(pool)[-1] == b.block_id


def test_double_free_raises():
    pool = BlockPool(2)
    (b,) = pool.get_new_blocks(1)
    pool.free_blocks([b])
    with pytest.raises(RuntimeError, match="double free"):
        pool.free_blocks([b])
    assert pool.num_free_blocks == 2 and b.ref_cnt == 0


def test_touch_pulls_free_cached_block_out_of_the_middle():
    pool = BlockPool(5)
    blocks = pool.get_new_blocks(5)
    for i, b in enumerate(blocks):
        pool.cache_block(b, 100 + i)
    pool.free_blocks(blocks)
    assert ids(pool) == [0, 1, 2, 3, 4]
    hit = pool.get_cached_block(102)
    assert hit is blocks[2]
    pool.touch([hit])
    assert hit.ref_cnt == 1
    assert ids(pool) == [0, 1, 3, 4]
    assert pool.get_cached_block(102) is hit  # still cached while in use


def test_eviction_drops_hash_from_index():
    pool = BlockPool(2)
    a, b = pool.get_new_blocks(2)
    pool.cache_block(a, 11)
    pool.cache_block(b, 22)
    pool.free_blocks([b, a])  # tail first: b then a
    assert pool.get_cached_block(11) is a and pool.get_cached_block(22) is b
    (x,) = pool.get_new_blocks(1)
    assert x is b  # LRU head
    assert pool.get_cached_block(22) is None and x.block_hash is None
    assert pool.get_cached_block(11) is a
    assert pool.num_evictions == 1
    (y,) = pool.get_new_blocks(1)
    assert y is a and pool.get_cached_block(11) is None
    assert pool.cached_block_hash_to_block == {}
    assert pool.num_evictions == 2


def test_cache_block_first_writer_wins_and_eviction_of_duplicate_keeps_owner():
    pool = BlockPool(3)
    a, b, c = pool.get_new_blocks(3)
    pool.cache_block(a, 5)
    pool.cache_block(b, 5)  # same content computed twice
    assert pool.get_cached_block(5) is a
    pool.cache_block(a, 6)  # a block keeps its first hash
    assert a.block_hash == 5
    pool.free_blocks([b])
    pool.get_new_blocks(1)  # evicts b, whose hash is a's index entry
    assert pool.get_cached_block(5) is a


def test_reset_prefix_cache_drops_only_free_blocks():
    pool = BlockPool(4)
    blocks = pool.get_new_blocks(4)
    for i, b in enumerate(blocks):
        pool.cache_block(b, i + 1)
    pool.free_blocks([blocks[0], blocks[2]])
    assert pool.reset_prefix_cache() == 2
    assert blocks[0].block_hash is None and blocks[2].block_hash is None
    assert pool.get_cached_block(1) is None and pool.get_cached_block(3) is None
    assert pool.get_cached_block(2) is blocks[1] and pool.get_cached_block(4) is blocks[3]
    assert pool.num_free_blocks == 2 and ids(pool) == [0, 2]
    assert pool.reset_prefix_cache() == 0


# --- HostBlockPool -------------------------------------------------------------------------
def test_host_pool_allocate_free_and_guards():
    host = HostBlockPool(3)
    assert host.num_free_blocks == 3
    a = host.allocate(2)
    assert sorted(a) == [0, 1] and host.num_free_blocks == 1
    with pytest.raises(RuntimeError, match="only 1 free"):
        host.allocate(2)
    assert host.num_free_blocks == 1
    host.free(a)
    assert host.num_free_blocks == 3
    with pytest.raises(RuntimeError, match="double free"):
        host.free([a[0]])
    with pytest.raises(RuntimeError, match="double free"):
        host.free([7])  # never belonged to the pool
    b = host.allocate(1)
    with pytest.raises(RuntimeError, match="double free"):
        host.free([b[0], b[0]])  # twice in one call
    with pytest.raises(ValueError):
        HostBlockPool(-1)
    assert HostBlockPool(0).num_free_blocks == 0
