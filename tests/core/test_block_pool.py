"""BlockPool, its free queue, the lazy prefix index and the host pool used by swap.

The free queue and the lazy prefix index are checked against plain reference models
(a Python list in LRU order; an eagerly maintained hash -> block dict) under random
operation sequences (hypothesis), since both trade simplicity for bulk speed.
"""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from core.block_pool import IN_INDEX, NO_HASH, NOT_CACHED, BlockPool, FreeBlockQueue, HostBlockPool


def ids(pool: BlockPool) -> list[int]:
    return pool.free_block_queue.block_ids()


def begin(pool: BlockPool, blocks: list[int], hashes: list[int]):
    """A chain run whose hashes are known up front (the KV cache manager computes them lazily)."""
    return pool.begin_run(blocks, hashes[0], lambda n: hashes)


def register(pool: BlockPool, blocks: list[int], hashes: list[int]):
    run = begin(pool, blocks, hashes)
    pool.cache_blocks(run, 0, len(blocks))
    return run


# --- FreeBlockQueue ----------------------------------------------------------------------
def test_queue_starts_in_block_order():
    q = FreeBlockQueue(5)
    assert q.num_free_blocks == 5
    assert q.block_ids() == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("victim", [0, 2, 4])
def test_queue_remove_from_head_middle_tail(victim):
    q = FreeBlockQueue(5)
    q.remove(victim)
    assert q.block_ids() == [i for i in range(5) if i != victim]
    assert q.num_free_blocks == 4
    assert q.popleft_n(4).tolist() == [i for i in range(5) if i != victim]  # the head skips the hole


def test_queue_popleft_append_lru_order():
    q = FreeBlockQueue(3)
    assert q.popleft() == 0
    q.append_n(np.array([0]))
    assert q.block_ids() == [1, 2, 0]
    assert q.popleft() == 1


def test_queue_guards():
    q = FreeBlockQueue(2)
    q.remove(0)
    with pytest.raises(RuntimeError):
        q.remove(0)  # not queued any more
    q.popleft()
    with pytest.raises(RuntimeError):
        q.popleft()
    assert q.num_free_blocks == 0 and q.block_ids() == []


_queue_ops = st.lists(st.tuples(st.sampled_from(["pop", "pop_n", "append", "remove"]), st.integers(0, 40)),
                      max_size=120)


@settings(max_examples=200, deadline=None)
@given(num_blocks=st.integers(1, 12), ops=_queue_ops)
def test_queue_matches_a_list(num_blocks, ops):
    """Random takes, appends (of taken blocks, in any order) and removals from the middle:
    the same order as a plain list, through dead entries and compactions."""
    q = FreeBlockQueue(num_blocks)
    ref = list(range(num_blocks))
    taken: list[int] = []
    for op, x in ops:
        if op == "pop" and ref:
            b = ref.pop(0)
            assert q.popleft() == b
            taken.append(b)
        elif op == "pop_n" and ref:
            n = x % len(ref) + 1
            got = q.popleft_n(n).tolist()
            assert got == ref[:n]
            del ref[:n]
            taken.extend(got)
        elif op == "append" and taken:
            k = x % len(taken) + 1
            run, taken = taken[-k:][::-1], taken[:-k]
            q.append_n(np.array(run, dtype=np.int64))
            ref.extend(run)
        elif op == "remove" and ref:
            b = ref.pop(x % len(ref))
            q.remove(b)
            taken.append(b)
        assert q.block_ids() == ref and q.num_free_blocks == len(ref)
        assert sorted(ref + taken) == list(range(num_blocks))


# --- BlockPool -----------------------------------------------------------------------------
def test_pool_rejects_empty():
    with pytest.raises(ValueError, match="num_blocks"):
        BlockPool(0)


def test_allocation_pops_head_and_free_goes_to_tail():
    pool = BlockPool(6)
    a = pool.get_new_blocks(2)
    assert a == [0, 1]
    assert pool.ref_cnt[a].tolist() == [1, 1]
    assert ids(pool) == [2, 3, 4, 5]
    pool.free_blocks([a[1], a[0]])  # a request frees tail first
    assert ids(pool) == [2, 3, 4, 5, 1, 0]
    b = pool.get_new_blocks(5)
    assert b == [2, 3, 4, 5, 1]  # least recently freed first
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
    assert pool.ref_cnt[b] == 2
    pool.free_blocks([b])
    assert pool.ref_cnt[b] == 1 and b not in ids(pool)
    pool.free_blocks([b])
    assert pool.ref_cnt[b] == 0 and ids(pool)[-1] == b


def test_double_free_raises():
    pool = BlockPool(2)
    (b,) = pool.get_new_blocks(1)
    pool.free_blocks([b])
    with pytest.raises(RuntimeError, match="double free"):
        pool.free_blocks([b])
    assert pool.num_free_blocks == 2 and pool.ref_cnt[b] == 0


def test_touch_pulls_free_cached_block_out_of_the_middle():
    pool = BlockPool(5)
    blocks = pool.get_new_blocks(5)
    register(pool, blocks, [100, 101, 102, 103, 104])
    pool.free_blocks(blocks)
    assert ids(pool) == [0, 1, 2, 3, 4]
    hit = pool.find_cached_prefix([100, 101, 102, 999], 4)
    assert hit == [0, 1, 2]
    pool.touch(hit)
    assert pool.ref_cnt[hit].tolist() == [1, 1, 1]
    assert ids(pool) == [3, 4]
    assert pool.find_cached_prefix([100, 101, 102], 3) == hit  # still cached while in use


def test_a_lone_chain_stays_out_of_the_dict_until_looked_up():
    """A chain only one request registered costs no per-block dict entries (its root is
    lazy); the first lookup of its root moves its cached blocks into the index."""
    pool = BlockPool(4)
    blocks = pool.get_new_blocks(3)
    register(pool, blocks, [7, 8, 9])
    assert pool.cached_block_hash_to_block == {} and pool.run_of.tolist() == [1, 1, 1, NOT_CACHED]
    assert pool.cached_blocks() == {7: 0, 8: 1, 9: 2}
    assert pool.find_cached_prefix([70], 1) == []  # another root: still lazy
    assert pool.cached_block_hash_to_block == {}
    assert pool.find_cached_prefix([7, 8, 9], 2) == [0, 1]
    assert pool.cached_block_hash_to_block == {7: 0, 8: 1, 9: 2} and pool.run_of.tolist() == [IN_INDEX] * 3 + [NOT_CACHED]
    assert pool.block_hash.tolist() == [7, 8, 9, NO_HASH]


def test_lazy_run_computes_no_hash_until_materialized():
    pool = BlockPool(4)
    blocks = pool.get_new_blocks(3)
    asked = []

    def hashes_upto(n):
        asked.append(n)
        return [7, 8, 9][:max(n, 1)]

    run = pool.begin_run(blocks, 7, hashes_upto)
    pool.cache_blocks(run, 0, 2)
    pool.cache_block(run, 2)
    assert asked == []
    assert pool.root_cached(7) and asked == [3]
    assert pool.cached_block_hash_to_block == {7: 0, 8: 1, 9: 2}


def test_eviction_drops_hash_from_index():
    pool = BlockPool(2)
    a, b = pool.get_new_blocks(2)
    register(pool, [a, b], [11, 22])
    pool.free_blocks([b, a])  # tail first: b then a
    assert pool.find_cached_prefix([11, 22], 2) == [a, b]  # eager from here on
    (x,) = pool.get_new_blocks(1)
    assert x == b  # LRU head
    assert pool.cached_blocks() == {11: a} and pool.block_hash[x] == NO_HASH
    assert pool.num_evictions == 1
    (y,) = pool.get_new_blocks(1)
    assert y == a and pool.cached_blocks() == {} and pool.cached_block_hash_to_block == {}
    assert pool.num_evictions == 2


def test_first_writer_wins_and_eviction_of_duplicate_keeps_owner():
    pool = BlockPool(3)
    a, b, c = pool.get_new_blocks(3)
    register(pool, [a], [5])
    register(pool, [b], [5])  # same content computed twice: b is not indexed
    assert pool.cached_blocks() == {5: a}
    pool.free_blocks([b])
    pool.get_new_blocks(1)  # evicts b, whose hash is a's index entry
    assert pool.cached_blocks() == {5: a}


def test_evicted_owner_leaves_no_entry_even_if_a_duplicate_survives():
    pool = BlockPool(3)
    a, b, _ = pool.get_new_blocks(3)
    register(pool, [a], [5])
    register(pool, [b], [5])
    pool.free_blocks([a])
    pool.get_new_blocks(1)  # evicts the owner
    assert pool.cached_blocks() == {} and pool.block_hash[b] == 5  # b keeps its hash, unindexed
    assert pool.is_cached().tolist() == [False, True, False]


def test_reset_prefix_cache_drops_only_free_blocks():
    pool = BlockPool(4)
    blocks = pool.get_new_blocks(4)
    register(pool, blocks[:2], [1, 2])
    register(pool, blocks[2:], [3, 4])
    pool.free_blocks([blocks[0], blocks[2]])
    assert pool.reset_prefix_cache() == 2
    assert pool.is_cached().tolist() == [False, True, False, True]
    assert pool.cached_blocks() == {2: blocks[1], 4: blocks[3]}
    assert pool.num_free_blocks == 2 and ids(pool) == [0, 2]
    assert pool.reset_prefix_cache() == 0


class _EagerPool:
    """Reference model: the eager index of vLLM v1 (and of this pool before it went lazy)."""

    def __init__(self, n: int) -> None:
        self.ref = [0] * n
        self.hash: list[int | None] = [None] * n
        self.free = list(range(n))
        self.index: dict[int, int] = {}
        self.evictions = 0

    def take(self, n: int) -> list[int]:
        out, self.free = self.free[:n], self.free[n:]
        for b in out:
            h = self.hash[b]
            if h is not None:
                if self.index.get(h) == b:
                    del self.index[h]
                self.hash[b] = None
                self.evictions += 1
            self.ref[b] = 1
        return out

    def register(self, blocks: list[int], hashes: list[int]) -> None:
        for b, h in zip(blocks, hashes):
            if self.hash[b] is None:
                self.hash[b] = h
                self.index.setdefault(h, b)

    def lookup(self, hashes: list[int]) -> list[int]:
        hit = []
        for h in hashes:
            if h not in self.index:
                break
            hit.append(self.index[h])
        return hit

    def touch(self, blocks: list[int]) -> None:
        for b in blocks:
            if self.ref[b] == 0:
                self.free.remove(b)
            self.ref[b] += 1

    def release(self, blocks: list[int]) -> None:
        for b in blocks:
            self.ref[b] -= 1
            if self.ref[b] == 0:
                self.free.append(b)


def _chain(tokens: list[int]) -> list[int]:
    out, parent = [], None
    for t in tokens:
        parent = hash((parent, t))
        out.append(parent)
    return out


_pool_ops = st.lists(st.tuples(st.sampled_from(["admit", "grow", "finish", "reset"]),
                               st.lists(st.integers(0, 2), min_size=1, max_size=5), st.integers(0, 10)),
                     max_size=60)


@settings(max_examples=300, deadline=None)
@given(num_blocks=st.integers(2, 16), ops=_pool_ops)
def test_pool_matches_the_eager_reference(num_blocks, ops):
    """Requests whose chains share roots (a 3-token alphabet) are admitted with a prefix
    lookup, grow one block at a time and finish in random order: every lookup, the free
    order, ref counts, hashes, evictions and the index equal the eager reference."""
    pool, ref = BlockPool(num_blocks), _EagerPool(num_blocks)
    live: list[tuple[list[int], list[int], list[int], object]] = []  # tokens, hashes, blocks, run
    for op, tokens, x in ops:
        if op == "admit":
            hashes = _chain(tokens)
            hit = pool.find_cached_prefix(hashes, len(hashes) - 1)
            assert hit == ref.lookup(hashes[:-1])
            need = len(hashes) - len(hit)
            if need > len([b for b in ref.free if b not in hit]):
                continue
            pool.touch(hit)
            ref.touch(hit)
            blocks = hit + pool.get_new_blocks(need)
            assert blocks == hit + ref.take(need)
            run = begin(pool, blocks, hashes)
            pool.cache_blocks(run, 0, len(blocks))
            ref.register(blocks, hashes)
            live.append((tokens, hashes, blocks, run))
        elif op == "grow" and live:
            tokens, hashes, blocks, run = live[x % len(live)]
            if not ref.free:
                continue
            tokens.append(x % 3)
            hashes.append(hash((hashes[-1], x % 3)))
            blocks.append(pool.get_new_block())
            assert blocks[-1] == ref.take(1)[0]
            pool.cache_block(run, len(blocks) - 1)
            ref.register(blocks[-1:], hashes[-1:])
        elif op == "finish" and live:
            _, _, blocks, _ = live.pop(x % len(live))
            pool.free_blocks(blocks[::-1])
            ref.release(blocks[::-1])
        elif op == "reset":
            dropped = [b for b in range(num_blocks) if ref.ref[b] == 0 and ref.hash[b] is not None]
            assert pool.reset_prefix_cache() == len(dropped)
            for b in dropped:
                if ref.index.get(ref.hash[b]) == b:
                    del ref.index[ref.hash[b]]
                ref.hash[b] = None
        assert ids(pool) == ref.free
        assert pool.ref_cnt.tolist() == ref.ref
        assert pool.is_cached().tolist() == [h is not None for h in ref.hash]
        assert pool.cached_blocks() == ref.index
        assert pool.num_evictions == ref.evictions


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
