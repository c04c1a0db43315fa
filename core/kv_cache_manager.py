"""Allocates KV slots for requests, with prefix caching and swap to host memory.

The scheduler asks ``allocate_slots`` for the slots of a request's next tokens; a ``None``
answer means "not enough free blocks", and the scheduler decides whom to preempt. Full
blocks are registered in the prefix cache under a chained hash (parent hash, the block's
tokens, an optional salt), so two prompts share a block only if everything before it is
equal too. Hashes are computed when needed (``request.block_hashes`` grows lazily): a
chain nobody else shares needs only its first block's (see ``core.block_pool``).
"""
from __future__ import annotations

from array import array
from collections.abc import Callable
from functools import partial

import numpy as np

from core.block_pool import BlockPool, ChainRun, HostBlockPool
from core.request import Request


def hash_block_tokens(parent_hash: int | None, tokens: tuple[int, ...], extra_key: object = None) -> int:
    """Chained block hash. Python's tuple hash of ints is stable within and across runs."""
    return hash((parent_hash, tokens, extra_key))


class KVCacheManager:
    def __init__(self, block_size: int, num_gpu_blocks: int, num_cpu_blocks: int = 0,
                 enable_prefix_caching: bool = True) -> None:
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.block_pool = BlockPool(num_gpu_blocks, enable_prefix_caching)
        self.host_pool = HostBlockPool(num_cpu_blocks)
        # Each request's block ids in position order (the block table the backend reads), as an
        # ``array('q')``: a list would hold one int object per block, made at allocation and
        # read back (scattered, long out of cache) at free; in a simulation those were ~8% of
        # the run. It supports what a list of ints does here (len, append, slices, iteration).
        self.req_to_block_ids: dict[str, array] = {}
        self.num_cached_blocks: dict[str, int] = {}
        self.req_to_run: dict[str, ChainRun] = {}  # each request's registered chain (prefix caching)
        self._register_at_free: dict[str, int] = {}  # see register_at_free
        # Set by a scheduler whose requests' token lists can lag their progress (the lazy decode
        # scheduler's parked requests): makes ``all_token_ids`` hold at least n tokens.
        self.fill_tokens: Callable[[Request, int], None] | None = None
        # Prefix-cache statistics in tokens. Hits of a request re-admitted after a
        # recompute preemption are kept apart: they are recovered work, not reuse.
        self.prefix_query_tokens = 0
        self.prefix_hit_tokens = 0
        self.recompute_hit_tokens = 0

    # --- queries ---------------------------------------------------------------------
    @property
    def num_gpu_blocks(self) -> int:
        return self.block_pool.num_blocks

    @property
    def num_free_blocks(self) -> int:
        return self.block_pool.free_block_queue.num_free_blocks

    def usage(self, num_free: int | None = None) -> float:
        return self.block_pool.usage(num_free)

    def block_ids(self, request_id: str) -> array:
        """A request's block table (the live ``array('q')``; empty if it holds no blocks)."""
        blocks = self.req_to_block_ids.get(request_id)
        return array("q") if blocks is None else blocks

    def num_blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _request_block_hashes(self, request: Request, num_blocks: int) -> list[int]:
        """Extend ``request.block_hashes`` to cover ``num_blocks`` full blocks and return it."""
        hashes = request.block_hashes
        if len(hashes) >= num_blocks:
            return hashes
        bs = self.block_size
        if len(request.all_token_ids) < num_blocks * bs and self.fill_tokens is not None:
            self.fill_tokens(request, num_blocks * bs)
        salt = request.cache_salt
        tokens = request.all_token_ids
        if num_blocks == 1 and len(tokens) >= bs:  # the root alone (each admission asks): no chaining set-up
            hashes.append(hash((None, tuple(tokens[:bs]), salt)))
            return hashes
        parent = hashes[-1] if hashes else None
        # A comprehension chaining through ``parent``, over the blocks' token tuples as
        # ``zip`` of one iterator ``bs`` times cuts them (in C): admission hashes ~85 blocks a prompt.
        it = iter(tokens[len(hashes) * bs:num_blocks * bs])
        hashes.extend([parent := hash((parent, block, salt)) for block in zip(*[it] * bs)])
        return hashes

    def get_computed_blocks(self, request: Request) -> tuple[list[int], int]:
        """Longest cached prefix of the request, in whole blocks, never covering its last token.

        The last token must be computed so that the step produces logits to sample from.
        """
        if not self.enable_prefix_caching:
            return [], 0
        max_blocks = (request.num_tokens - 1) // self.block_size
        if not max_blocks or not self.block_pool.root_cached(self._request_block_hashes(request, 1)[0]):
            return [], 0  # nothing cached under its first block: its other hashes can wait
        hit = self.block_pool.find_cached_prefix(self._request_block_hashes(request, max_blocks), max_blocks)
        return hit, len(hit) * self.block_size

    def block_hashes(self, request: Request, num_blocks: int) -> list[int]:
        """The request's chained block hashes, computed for at least ``num_blocks`` full blocks."""
        return self._request_block_hashes(request, num_blocks)

    def cached_prefix_tokens(self, token_ids: list[int], cache_salt: object = None) -> int:
        """How many leading tokens of ``token_ids`` are cached now (for routers and lpm)."""
        if not self.enable_prefix_caching:
            return 0
        bs = self.block_size
        pool = self.block_pool
        get = pool.cached_block_hash_to_block.get
        parent = None
        n = 0
        for i in range((len(token_ids) - 1) // bs):
            parent = hash((parent, tuple(token_ids[i * bs:(i + 1) * bs]), cache_salt))
            if (not pool.root_cached(parent)) if i == 0 else get(parent) is None:
                break
            n += bs
        return n

    def record_prefix_hit(self, request: Request, num_hit_tokens: int) -> None:
        """Count an admitted request's hit: true reuse on first admission, else recompute."""
        if request.num_preemptions == 0:
            request.num_cached_tokens = num_hit_tokens
            self.prefix_query_tokens += request.num_tokens
            self.prefix_hit_tokens += num_hit_tokens
        else:
            request.num_recomputed_cached_tokens += num_hit_tokens
            self.recompute_hit_tokens += num_hit_tokens

    # --- allocation ------------------------------------------------------------------
    def allocate_slots(self, request: Request, num_new_tokens: int,
                       new_computed_blocks: list[int] | None = None,
                       num_lookahead_tokens: int = 0, reserve_tokens: int = 0,
                       watermark_blocks: int = 0) -> array | None:
        """Make room for ``num_new_tokens`` more tokens of ``request``.

        ``new_computed_blocks`` are prefix hits (from ``get_computed_blocks``) to attach
        first; ``num_lookahead_tokens`` extra slots serve speculative tokens;
        ``reserve_tokens`` asks for slots up to that total length at once (Orca / static
        batching reserve the maximum length). Returns the request's block table (a live
        reference) or ``None`` if the free blocks, minus ``watermark_blocks``, do not suffice;
        on ``None`` nothing changed.
        """
        rid = request.request_id
        blocks = self.req_to_block_ids.get(rid)
        if blocks is None:
            blocks = self.req_to_block_ids[rid] = array("q")
            self.num_cached_blocks[rid] = 0
        computed = new_computed_blocks or ()
        num_computed = request.num_computed_tokens + len(computed) * self.block_size
        need_tokens = num_computed + num_new_tokens + num_lookahead_tokens
        if reserve_tokens > need_tokens:
            need_tokens = reserve_tokens
        num_new_blocks = -(-need_tokens // self.block_size) - len(blocks) - len(computed)
        pool = self.block_pool
        free = pool.free_block_queue.num_free_blocks
        if computed:
            ref = pool.ref_cnt
            free -= sum(1 for b in computed if not ref.item(b))
        if num_new_blocks > free - watermark_blocks:
            if not blocks:
                self._drop(rid)
            return None
        if computed:
            pool.touch(computed)
            blocks.extend(computed)
        new_ids = None
        if num_new_blocks > 0:
            new_ids = (len(blocks), pool.get_new_block_ids(num_new_blocks))
            blocks.frombytes(new_ids[1].tobytes())
        if self.enable_prefix_caching:
            self._cache_full_blocks(request, blocks, num_computed + num_new_tokens, new_ids=new_ids)
        return blocks

    def append_decode_slot(self, request: Request) -> bool:
        """Fast path of ``allocate_slots(request, 1)`` for a decoding request; False if no block is free.

        Decode dominates steps, and its KV need is simple: a new block when position
        ``num_computed`` starts one, a cache registration when it fills one.
        """
        rid = request.request_id
        c = request.num_computed_tokens
        blocks = self.req_to_block_ids[rid]
        if c >= len(blocks) * self.block_size:
            if not self.block_pool.free_block_queue.num_free_blocks:
                return False
            blocks.append(self.block_pool.get_new_block())
        if self.enable_prefix_caching and (c + 1) % self.block_size == 0:
            self._cache_full_blocks(request, blocks, c + 1)
        return True

    def _cache_full_blocks(self, request: Request, blocks: array, num_tokens: int,
                           tokens_known: bool = False, new_ids: tuple[int, np.ndarray] | None = None) -> None:
        """Register the full blocks not registered yet; ``new_ids``: see ``BlockPool.cache_blocks``."""
        rid = request.request_id
        if not tokens_known:
            num_tokens = min(num_tokens, request.num_tokens - request.num_pending_tokens)
        num_full = num_tokens // self.block_size
        start = self.num_cached_blocks[rid]
        if num_full <= start:
            return
        pool = self.block_pool
        run = self.req_to_run.get(rid)
        if run is None:  # registration always starts at position 0
            run = self.req_to_run[rid] = pool.begin_run(blocks, self._request_block_hashes(request, 1)[0],
                                                        partial(self._request_block_hashes, request))
        if num_full - start == 1:
            pool.cache_block(run, start)
        else:
            pool.cache_blocks(run, start, num_full, new_ids)
        self.num_cached_blocks[rid] = num_full

    def cache_blocks(self, request: Request, num_tokens: int, tokens_known: bool = False) -> None:
        """Register the request's blocks that ``num_tokens`` known tokens fill (bulk decode).

        Only tokens in ``all_token_ids`` (and not pending) count, unless ``tokens_known``: the
        caller vouches for the rest (``fill_tokens`` provides them if a hash needs them).
        """
        if self.enable_prefix_caching:
            self._cache_full_blocks(request, self.req_to_block_ids[request.request_id], num_tokens, tokens_known)

    def register_at_free(self, request: Request, num_tokens: int) -> None:
        """``cache_blocks(request, num_tokens, tokens_known=True)``, applied when the request's
        blocks are freed, just before (a finished request's last registrations: the free reads
        its block ids anyway, so they cost no conversion of their own)."""
        self._register_at_free[request.request_id] = num_tokens

    def _drop(self, rid: str) -> None:
        del self.req_to_block_ids[rid]
        del self.num_cached_blocks[rid]
        self.req_to_run.pop(rid, None)

    def free(self, request: Request) -> None:
        """Release a request's blocks, tail first (its tail is least likely to be shared)."""
        rid = request.request_id
        blocks = self.req_to_block_ids.get(rid)
        if blocks is None:
            return
        by_position = np.frombuffer(blocks, np.int64)  # a view: the table is not appended to again
        register = self._register_at_free.pop(rid, 0)
        if register and self.enable_prefix_caching:
            self._cache_full_blocks(request, blocks, register, tokens_known=True, new_ids=(0, by_position))
        self.block_pool.free_blocks(by_position[::-1].copy())  # contiguous: it indexes three arrays
        self._drop(rid)

    def reset_prefix_cache(self) -> int:
        return self.block_pool.reset_prefix_cache()

    # --- swap ------------------------------------------------------------------------
    def can_swap_out(self, request: Request) -> bool:
        return len(self.req_to_block_ids.get(request.request_id, ())) <= self.host_pool.num_free_blocks

    def swap_out(self, request: Request) -> list[tuple[int, int]]:
        """Move a request's KV to host blocks; returns (gpu_block, host_block) copies to make."""
        blocks = self.req_to_block_ids[request.request_id]
        host_ids = self.host_pool.allocate(len(blocks))
        pairs = list(zip(blocks, host_ids))
        request.swap_out_blocks = host_ids
        self.free(request)
        return pairs

    def swap_in(self, request: Request, watermark_blocks: int = 0) -> list[tuple[int, int]] | None:
        """Bring a swapped request back; ``None`` if the GPU lacks free blocks."""
        host_ids = request.swap_out_blocks
        if len(host_ids) > self.num_free_blocks - watermark_blocks:
            return None
        rid = request.request_id
        new = array("q", self.block_pool.get_new_blocks(len(host_ids)))
        self.req_to_block_ids[rid] = new
        self.num_cached_blocks[rid] = 0
        if self.enable_prefix_caching:
            self._cache_full_blocks(request, new, request.num_computed_tokens)
        pairs = list(zip(new, host_ids))
        self.host_pool.free(host_ids)
        request.swap_out_blocks = []
        return pairs
