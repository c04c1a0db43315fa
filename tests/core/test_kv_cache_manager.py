"""KVCacheManager: slot allocation, prefix caching by chained hashes, stats and swap."""
from __future__ import annotations

import pytest

import core_fakes as fk
from core.kv_cache_manager import KVCacheManager, hash_block_tokens
from core.request import Request

BS = 16
P = list(range(100, 300))  # a long shared token stream
Q = list(range(500, 700))  # another one, disjoint from P


def req(rid: str, tokens: list[int], **kw) -> Request:
    return fk.make_request(rid, list(tokens), max_tokens=kw.pop("max_tokens", 8), **kw)


def admit(kv: KVCacheManager, r: Request, **kw) -> int | None:
    """What the scheduler does for a waiting request: hit, allocate the rest, record the hit."""
    computed, hit = kv.get_computed_blocks(r)
    ids = kv.allocate_slots(r, r.num_tokens - hit, computed, **kw)
    if ids is None:
        return None
    r.num_computed_tokens = hit
    kv.record_prefix_hit(r, hit)
    return hit


def compute(r: Request) -> None:
    r.num_computed_tokens = r.num_tokens


def run_prompt(kv: KVCacheManager, r: Request) -> int:
    hit = admit(kv, r)
    assert hit is not None
    compute(r)
    return hit


def decode(kv: KVCacheManager, r: Request, token: int) -> None:
    r.append_output_token(token, 0.0)
    assert kv.allocate_slots(r, 1) is not None
    compute(r)


def free_ids(kv: KVCacheManager) -> list[int]:
    return kv.block_pool.free_block_queue.block_ids()


# --- allocation --------------------------------------------------------------------------
def test_allocation_grows_by_ceil():
    kv = KVCacheManager(BS, 8)
    r = req("a", P[:20])
    ids = kv.allocate_slots(r, 20)
    assert list(ids) == [0, 1] and kv.num_free_blocks == 6
    compute(r)
    sizes = []
    for t in range(20):  # decode 20 tokens: positions 20..39
        r.append_output_token(t, 0.0)
        kv.allocate_slots(r, 1)
        compute(r)
        sizes.append(len(kv.block_ids("a")))
    # Position 32 (the 13th decode) is the first that needs a third block.
    assert sizes == [2] * 12 + [3] * 8
    assert list(kv.block_ids("a")) == [0, 1, 2]
    assert kv.num_blocks_for(0) == 0 and kv.num_blocks_for(1) == 1 and kv.num_blocks_for(16) == 1
    assert kv.num_blocks_for(17) == 2


def test_allocation_returns_live_block_id_list():
    kv = KVCacheManager(BS, 4)
    r = req("a", P[:16])
    ids = kv.allocate_slots(r, 16)
    compute(r)
    r.append_output_token(1, 0.0)
    kv.allocate_slots(r, 1)
    assert list(ids) == [0, 1] and ids is kv.block_ids("a")


def test_short_allocation_returns_none_and_changes_nothing():
    kv = KVCacheManager(BS, 4)
    big = req("big", P[:80])  # needs 5 blocks
    assert kv.allocate_slots(big, 80) is None
    assert kv.num_free_blocks == 4 and free_ids(kv) == [0, 1, 2, 3]
    assert "big" not in kv.req_to_block_ids and list(kv.block_ids("big")) == []
    # A request that already holds blocks keeps them unchanged.
    a = req("a", P[:32])
    kv.allocate_slots(a, 32)
    compute(a)
    before = (list(kv.block_ids("a")), kv.num_free_blocks, free_ids(kv), kv.block_pool.cached_blocks())
    assert kv.allocate_slots(a, 48) is None  # 80 tokens in all: 5 blocks
    assert (list(kv.block_ids("a")), kv.num_free_blocks, free_ids(kv), kv.block_pool.cached_blocks()) == before


def test_short_allocation_counts_free_prefix_hits_as_used():
    """Free cached blocks that a request hits leave the free queue, so they are not spare room."""
    kv = KVCacheManager(BS, 4)
    a = req("a", P[:48])
    run_prompt(kv, a)
    kv.free(a)
    assert kv.num_free_blocks == 4
    queue = free_ids(kv)
    b = req("b", P[:48] + Q[:32])  # 80 tokens: 3 hit blocks (all free) + 2 new, but only 1 other free
    computed, hit = kv.get_computed_blocks(b)
    assert hit == 48 and not kv.block_pool.ref_cnt[computed].any()
    assert kv.allocate_slots(b, b.num_tokens - hit, computed) is None
    assert free_ids(kv) == queue and not kv.block_pool.ref_cnt[computed].any()
    assert "b" not in kv.req_to_block_ids
    assert kv.prefix_query_tokens == 48 and kv.prefix_hit_tokens == 0  # nothing recorded for b
    c = req("c", P[:48] + Q[:16])  # 64 tokens: 3 hits + 1 new block fits exactly
    assert admit(kv, c) == 48
    assert kv.num_free_blocks == 0
    assert list(kv.block_ids("c")[:3]) == computed


def test_watermark_blocks_admission():
    kv = KVCacheManager(BS, 10)
    r = req("a", P[:64])  # 4 blocks
    assert kv.allocate_slots(r, 64, watermark_blocks=7) is None
    assert kv.num_free_blocks == 10
    assert kv.allocate_slots(r, 64, watermark_blocks=6) is not None
    assert kv.num_free_blocks == 6


def test_lookahead_slots():
    kv = KVCacheManager(BS, 8)
    r = req("a", P[:16])
    assert len(kv.allocate_slots(r, 16, num_lookahead_tokens=4)) == 2
    r2 = req("b", P[:10])
    assert len(kv.allocate_slots(r2, 10, num_lookahead_tokens=6)) == 1
    # Lookahead slots are not registered in the cache: only the 16 known tokens fill a block.
    assert len(kv.block_pool.cached_blocks()) == 1


def test_reserve_tokens_allocates_up_front():
    kv = KVCacheManager(BS, 8)
    r = req("a", P[:10], max_tokens=90)
    assert len(kv.allocate_slots(r, 10, reserve_tokens=100)) == 7
    compute(r)
    for t in range(60):
        r.append_output_token(t, 0.0)
        assert len(kv.allocate_slots(r, 1)) == 7  # no growth inside the reservation
        compute(r)
    assert kv.num_free_blocks == 1
    r2 = req("b", P[:10])
    assert kv.allocate_slots(r2, 10, reserve_tokens=40) is None  # 3 blocks, 1 free
    assert kv.num_free_blocks == 1


def test_free_is_tail_first_so_tail_blocks_are_evicted_first():
    kv = KVCacheManager(BS, 3)
    a = req("a", P[:48])
    run_prompt(kv, a)
    blocks = kv.block_ids("a")
    kv.free(a)
    assert free_ids(kv) == list(blocks[::-1])
    assert "a" not in kv.req_to_block_ids
    kv.free(a)  # freeing an unknown request is a no-op
    # One new block evicts a's last block; its first two blocks remain cached.
    other = req("x", Q[:16])
    kv.allocate_slots(other, 16)
    assert list(kv.block_ids("x")) == [blocks[2]]
    b = req("b", P[:48] + [1])
    assert kv.get_computed_blocks(b)[1] == 32


# --- prefix caching ------------------------------------------------------------------------
def test_block_aligned_shared_prefix():
    kv = KVCacheManager(BS, 32)
    run_prompt(kv, req("a", P[:48]))
    b = req("b", P[:32] + Q[:20])
    assert run_prompt(kv, b) == 32
    assert kv.block_ids("b")[:2] == kv.block_ids("a")[:2]
    assert kv.block_ids("b")[2] != kv.block_ids("a")[2]
    assert kv.block_pool.ref_cnt[kv.block_ids("a")[0]] == 2


def test_unaligned_shared_prefix_hits_whole_blocks_only():
    kv = KVCacheManager(BS, 32)
    run_prompt(kv, req("a", P[:40]))  # 2 full blocks cached, 8 tokens in a partial block
    assert kv.cached_prefix_tokens(P[:40] + Q[:10]) == 32
    b = req("b", P[:40] + Q[:10])
    assert run_prompt(kv, b) == 32
    assert kv.cached_prefix_tokens(P[:40] + Q[:10]) == 48  # b's own third block is now cached


def test_hit_never_covers_last_prompt_token():
    kv = KVCacheManager(BS, 32)
    run_prompt(kv, req("a", P[:32]))
    b = req("b", P[:32])
    assert run_prompt(kv, b) == 16
    assert b.num_cached_tokens == 16
    assert kv.cached_prefix_tokens(P[:32]) == 16
    assert kv.cached_prefix_tokens(P[:33]) == 32
    c = req("c", P[:1])
    assert kv.get_computed_blocks(c) == ([], 0)


def test_hash_chain_stops_at_first_miss():
    kv = KVCacheManager(BS, 32)
    run_prompt(kv, req("a", P[:48]))
    # Same first and third block, different second block: only block 0 hits.
    b = req("b", P[:16] + Q[:16] + P[32:48] + [1])
    assert run_prompt(kv, b) == 16
    assert hash_block_tokens(None, tuple(P[:16])) == b.block_hashes[0]


def test_output_tokens_fill_cacheable_blocks():
    kv = KVCacheManager(BS, 32)
    a = req("a", P[:20])
    run_prompt(kv, a)
    for t in Q[:20]:
        decode(kv, a, t)
    # a's sequence is P[:20] + Q[:20] = 40 tokens: 2 full blocks.
    assert kv.cached_prefix_tokens(P[:20] + Q[:20] + [0]) == 32
    b = req("b", P[:20] + Q[:20] + [5])
    assert run_prompt(kv, b) == 32


def test_cache_salt_separates():
    kv = KVCacheManager(BS, 32)
    run_prompt(kv, req("a", P[:48], cache_salt="tenant-1"))
    assert run_prompt(kv, req("b", P[:48])) == 0
    assert run_prompt(kv, req("c", P[:48], cache_salt="tenant-2")) == 0
    assert run_prompt(kv, req("d", P[:48], cache_salt="tenant-1")) == 32
    assert kv.cached_prefix_tokens(P[:48], cache_salt="tenant-1") == 32
    assert kv.cached_prefix_tokens(P[:48], cache_salt="nobody") == 0


def test_prefix_caching_disabled():
    kv = KVCacheManager(BS, 32, enable_prefix_caching=False)
    a = req("a", P[:48])
    run_prompt(kv, a)
    assert kv.block_pool.cached_blocks() == {}
    assert run_prompt(kv, req("b", P[:48])) == 0
    assert kv.cached_prefix_tokens(P[:48]) == 0


def test_hit_on_free_blocks_reuses_them_and_counts_refs():
    kv = KVCacheManager(BS, 8)
    a = req("a", P[:48])
    run_prompt(kv, a)
    a_ids = list(kv.block_ids("a"))
    kv.free(a)
    b = req("b", P[:48] + [1])
    assert run_prompt(kv, b) == 48
    assert list(kv.block_ids("b")[:3]) == a_ids
    assert kv.block_pool.ref_cnt[a_ids].tolist() == [1, 1, 1]
    assert not set(a_ids) & set(free_ids(kv))


def test_hit_stats_count_true_reuse_and_recompute_separately():
    kv = KVCacheManager(BS, 32)
    run_prompt(kv, req("a", P[:40]))
    assert (kv.prefix_query_tokens, kv.prefix_hit_tokens) == (40, 0)
    b = req("b", P[:40])
    run_prompt(kv, b)
    assert (kv.prefix_query_tokens, kv.prefix_hit_tokens) == (80, 32)
    assert b.num_cached_tokens == 32
    # b is preempted (recompute): its blocks are freed but stay cached; re-admission hits them.
    kv.free(b)
    b.num_computed_tokens = 0
    b.num_preemptions = 1
    assert admit(kv, b) == 32
    assert (kv.prefix_query_tokens, kv.prefix_hit_tokens) == (80, 32)
    assert kv.recompute_hit_tokens == 32
    assert b.num_recomputed_cached_tokens == 32 and b.num_cached_tokens == 32


def test_usage_fraction():
    kv = KVCacheManager(BS, 8)
    assert kv.usage() == 0.0
    kv.allocate_slots(req("a", P[:40]), 40)
    assert kv.usage() == pytest.approx(3 / 8)
    kv.allocate_slots(req("b", P[:80]), 80)
    assert kv.usage() == 1.0


def test_reset_prefix_cache_keeps_live_blocks():
    kv = KVCacheManager(BS, 8)
    a = req("a", P[:33])
    run_prompt(kv, a)
    b = req("b", Q[:33])
    run_prompt(kv, b)
    kv.free(b)
    assert kv.reset_prefix_cache() == 2
    assert kv.cached_prefix_tokens(Q[:33]) == 0
    assert kv.cached_prefix_tokens(P[:33]) == 32


# --- swap ----------------------------------------------------------------------------------
def test_swap_round_trip():
    kv = KVCacheManager(BS, 6, num_cpu_blocks=4)
    a = req("a", P[:40])
    run_prompt(kv, a)
    gpu = list(kv.block_ids("a"))
    assert kv.can_swap_out(a)
    out_pairs = kv.swap_out(a)
    assert [g for g, _ in out_pairs] == gpu
    host = [h for _, h in out_pairs]
    assert len(set(host)) == 3 and a.swap_out_blocks == host
    assert kv.host_pool.num_free_blocks == 1
    assert kv.num_free_blocks == 6 and "a" not in kv.req_to_block_ids
    # Evict everything a left on the GPU, so swap-in must re-register a's hashes.
    filler = req("f", Q[:96])
    kv.allocate_slots(filler, 96)
    kv.free(filler)
    assert kv.cached_prefix_tokens(P[:41]) == 0
    in_pairs = kv.swap_in(a)
    assert [h for _, h in in_pairs] == host
    assert [g for g, _ in in_pairs] == list(kv.block_ids("a"))
    assert len(kv.block_ids("a")) == 3
    assert kv.host_pool.num_free_blocks == 4 and a.swap_out_blocks == []
    assert a.num_computed_tokens == 40
    assert kv.cached_prefix_tokens(P[:41]) == 32  # hashes re-registered for the 2 full blocks
    assert kv.num_free_blocks == 3
    # It keeps growing normally afterwards.
    decode(kv, a, 1)
    assert len(kv.block_ids("a")) == 3


def test_swap_capacity_checks():
    kv = KVCacheManager(BS, 8, num_cpu_blocks=2)
    a = req("a", P[:40])  # 3 blocks > 2 host blocks
    run_prompt(kv, a)
    assert not kv.can_swap_out(a)
    kv2 = KVCacheManager(BS, 4, num_cpu_blocks=8)
    b = req("b", P[:40])
    run_prompt(kv2, b)
    kv2.swap_out(b)
    c = req("c", Q[:32])
    kv2.allocate_slots(c, 32)  # 2 of 4 GPU blocks left, b needs 3
    assert kv2.swap_in(b) is None
    assert b.swap_out_blocks and kv2.host_pool.num_free_blocks == 5 and kv2.num_free_blocks == 2
    kv2.free(c)
    assert kv2.swap_in(b, watermark_blocks=2) is None
    assert kv2.swap_in(b, watermark_blocks=1) is not None
