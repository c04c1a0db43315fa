"""KV cache blocks, their free queue and the prefix-cache index.

Design (vLLM v1's, re-derived): every block lives in one pool. A block with ref count 0
sits in the free queue but keeps its content hash, so a later request can still hit it
(lazy eviction); it is evicted only when ``get_new_blocks`` takes it for reuse. The free
queue's order is the LRU order: freed blocks join the tail, allocation takes from the head,
and a prefix hit can pull a free block out of the middle.

Blocks are ids (``0..num_blocks-1``), and their state lives in numpy arrays
(``ref_cnt``, ``block_hash``) rather than one Python object per block. The reason is
speed: a simulation takes, registers and frees ~1M blocks, dozens at a time (a prompt's
blocks at admission, a finished request's at release). With arrays each of those is a
handful of C-level bulk operations per request instead of a Python loop per block. The
prefix index is lazy per chain for the same reason (see ``BlockPool``).
"""
from __future__ import annotations

import heapq
from array import array
from collections import deque
from collections.abc import Callable, Sequence
from itertools import compress, repeat

import numpy as np

try:  # the C function behind np.count_nonzero, without its Python wrapper (~0.3 us a call, several per request)
    from numpy._core.multiarray import count_nonzero as _count_nonzero
except ImportError:  # pragma: no cover - another numpy layout
    _count_nonzero = np.count_nonzero

#: ``block_hash`` of a block that holds no registered content. Python's ``hash`` never
#: returns -1 (CPython reserves it for errors), so no real hash collides with it.
NO_HASH = -1


class FreeBlockQueue:
    """The LRU queue of free block ids: O(1) amortized take-from-head, append and remove.

    An append-only array of entries with a head index (C-level slices take and append runs
    of blocks); ``_pos[b]`` is the index of block ``b``'s live entry, -1 while it is in use.
    Removing a block from the middle (a prefix hit on a free block) leaves a dead entry
    that the head skips later; the array is compacted when it fills up.
    """

    def __init__(self, num_blocks: int) -> None:
        self._cap = 2 * num_blocks + 16
        self._q = np.empty(self._cap, dtype=np.int64)
        self._q[:num_blocks] = np.arange(num_blocks)
        self._pos = np.arange(num_blocks, dtype=np.int64)
        self._positions = np.arange(self._cap, dtype=np.int64)  # sliced, not rebuilt, at each append
        self._head = 0
        self._len = num_blocks
        self._dead: list[int] = []  # heap of dead entry positions at or after the head
        self.num_free_blocks = num_blocks

    def popleft_n(self, n: int) -> np.ndarray:
        """Take the ``n`` least recently freed blocks (the caller checked ``n`` <= free)."""
        head = self._head
        end = head + n
        dead = self._dead
        if dead and dead[0] < end:
            while dead and dead[0] < end:  # each dead entry in the run lengthens it by one
                heapq.heappop(dead)
                end += 1
            chunk = self._q[head:end]
            ids = chunk[self._pos[chunk] == np.arange(head, end)]
        else:
            ids = self._q[head:end].copy()
        self._pos[ids] = -1
        self._head = end
        self.num_free_blocks -= n
        return ids

    def popleft(self) -> int:
        if not self.num_free_blocks:
            raise RuntimeError("cannot get a block: none free")
        q, pos, dead = self._q, self._pos, self._dead
        head = self._head
        while dead and dead[0] == head:
            heapq.heappop(dead)
            head += 1
        block = q.item(head)
        pos[block] = -1
        self._head = head + 1
        self.num_free_blocks -= 1
        return block

    def append_n(self, ids: np.ndarray) -> None:
        """Append blocks (an int64 array, in order) to the tail; they must not be queued."""
        n = len(ids)
        if self._len + n > self._cap:
            self._compact(n)
        start = self._len
        self._q[start:start + n] = ids
        self._pos[ids] = self._positions[start:start + n]
        self._len = start + n
        self.num_free_blocks += n

    def remove(self, block: int) -> None:
        p = self._pos.item(block)
        if p < 0:
            raise RuntimeError(f"block {block} is not in the free queue")
        self._pos[block] = -1
        heapq.heappush(self._dead, p)
        self.num_free_blocks -= 1

    def contains(self, block: int) -> bool:
        return self._pos.item(block) >= 0

    def _compact(self, extra: int) -> None:
        """Move the live entries to the front (dropping dead ones); grow if still too small."""
        live = self._live()
        m = len(live)
        if m + extra > self._cap:
            self._cap = 2 * (m + extra)
            self._q = np.empty(self._cap, dtype=np.int64)
            self._positions = np.arange(self._cap, dtype=np.int64)
        self._q[:m] = live
        self._pos[live] = np.arange(m)
        self._head, self._len = 0, m
        self._dead = []

    def _live(self) -> np.ndarray:
        chunk = self._q[self._head:self._len]
        return chunk[self._pos[chunk] == np.arange(self._head, self._len)]

    def block_ids(self) -> list[int]:
        """Free block ids from head (next to be reused) to tail; for tests and debugging."""
        return self._live().tolist()


def as_int64(blocks: Sequence[int]) -> np.ndarray:
    """Block ids as an int64 array: a view of an ``array('q')`` (the KV cache manager's block
    tables; the caller must not grow it while the view lives), else converted."""
    if isinstance(blocks, array):
        return np.frombuffer(blocks, np.int64)
    return np.fromiter(blocks, np.int64, len(blocks))  # with the count: ~30% faster than as an index


#: ``BlockPool._roots`` value of a root whose entries are in the eager index.
EAGER = -1
#: ``BlockPool.run_of`` of a block with no registered content, and of one in the eager index
#: (its hash in ``block_hash``); a lazy run's blocks hold its id (>= 1). NOT_CACHED is 0 so
#: that counting the cached blocks among some is one ``count_nonzero``, with no comparison.
NOT_CACHED = 0
IN_INDEX = -1


class ChainRun:
    """One request's registered chain (one allocation of its blocks: admission to free).

    ``blocks`` is the request's block table (by position, only ever appended to: the KV cache
    manager's ``array('q')``, or any sequence of ints); positions ``[0, num_blocks)`` are
    registered. ``hashes_upto(n)`` returns the chain's hashes, computed (and cached on the
    request) for at least ``n`` blocks. While ``eager`` is False the run is lazy: its blocks
    are marked in ``BlockPool.run_of`` and their hashes are not even computed (see ``BlockPool``).
    """

    __slots__ = ("run_id", "root", "blocks", "hashes_upto", "num_blocks", "eager", "catch_up")

    def __init__(self, run_id: int, root: int, blocks: Sequence[int], hashes_upto: Callable[[int], list[int]],
                 eager: bool) -> None:
        self.run_id = run_id
        self.root = root
        self.blocks = blocks
        self.hashes_upto = hashes_upto
        self.num_blocks = 0
        self.eager = eager
        # Set by a scheduler that defers a lazy run's registrations: catch_up(end) applies them
        # (and with end=True stops deferring); called before anything reads num_blocks.
        self.catch_up: Callable[[bool], None] | None = None


class BlockPool:
    """All GPU KV blocks: ref counts, content hashes, the free queue and the prefix index.

    The prefix index is exact (vLLM's semantics: hash -> the first block registered with it
    that is still cached; a later duplicate is never indexed; evicting the owner drops the
    entry) but built lazily. Chained hashes mean every block of a chain shares its first
    block's hash, the *root*, and every lookup walks a chain from its root. A root that only
    one request allocation has registered (a *lazy* ``ChainRun``: the common case of a prompt
    nobody shares) costs one ``_roots`` entry and one hash: its blocks are only marked in
    ``run_of`` (a bulk numpy write); no per-block hash, dict insert or delete. The first time
    anyone else looks the root up or registers under it, the run is *materialized*: its
    hashes are computed and its still-cached blocks go into ``cached_block_hash_to_block``
    (the eager index, with ``block_hash``); the root is eager from then on. That is exact
    because within one run each hash was registered once, so "still cached" is all the
    eager index would have recorded.
    """

    def __init__(self, num_blocks: int, enable_caching: bool = True) -> None:
        if num_blocks < 1:
            raise ValueError(f"BlockPool.num_blocks must be >= 1, got {num_blocks!r}")
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.ref_cnt = np.zeros(num_blocks, dtype=np.int64)
        self.block_hash = np.full(num_blocks, NO_HASH, dtype=np.int64)  # of blocks in the eager index's chains
        self.run_of = np.full(num_blocks, NOT_CACHED, dtype=np.int64)  # lazy run id, NOT_CACHED or IN_INDEX
        self.free_block_queue = FreeBlockQueue(num_blocks)
        self.cached_block_hash_to_block: dict[int, int] = {}  # the eager index: hash -> block id
        self._roots: dict[int, int] = {}  # root hash -> lazy run id, or EAGER
        self._runs: dict[int, ChainRun] = {}  # lazy runs by id
        self._next_run_id = 1  # run ids start above NOT_CACHED
        self._prune_at = 4096
        self.num_evictions = 0
        # Whether any block ever entered the eager index: until then an eviction only unmarks
        # lazy runs (no hashes to drop), which skips two array passes per allocation.
        self._any_in_index = False

    @property
    def num_free_blocks(self) -> int:
        return self.free_block_queue.num_free_blocks

    # --- allocation --------------------------------------------------------------------
    def get_new_blocks(self, n: int) -> list[int]:
        """Take ``n`` blocks from the LRU head, evicting their cached content."""
        if n <= 4:  # one at a time is cheaper than the array operations' fixed costs
            if n > self.free_block_queue.num_free_blocks:
                raise RuntimeError(f"cannot get {n} blocks: only {self.free_block_queue.num_free_blocks} free")
            return [self.get_new_block() for _ in range(n)]
        return self.get_new_block_ids(n).tolist()

    def get_new_block_ids(self, n: int) -> np.ndarray:
        """``get_new_blocks`` as an int64 array (a caller that registers them next passes it to
        ``cache_blocks`` rather than converting the list back)."""
        queue = self.free_block_queue
        if n > queue.num_free_blocks:
            raise RuntimeError(f"cannot get {n} blocks: only {queue.num_free_blocks} free")
        ids = queue.popleft_n(n)
        state = self.run_of[ids]
        num_cached = _count_nonzero(state)  # NOT_CACHED is 0
        if num_cached:
            if not self._any_in_index:
                self.run_of[ids] = NOT_CACHED  # the uncached ones already are
            elif num_cached == n:
                self._evict(ids, state)
            else:
                cached = state != NOT_CACHED
                self._evict(ids[cached], state[cached])
            self.num_evictions += num_cached
        self.ref_cnt[ids] = 1
        return ids

    def _evict(self, blocks: np.ndarray, state: np.ndarray) -> None:
        """Forget the content of cached ``blocks`` (``state``: their ``run_of``): lazy runs lose
        them, eager owners drop their index entries."""
        self.run_of[blocks] = NOT_CACHED
        eager = state == IN_INDEX
        if not _count_nonzero(eager):
            return
        bh = self.block_hash
        eager_blocks = blocks[eager]
        eager_hashes = bh[eager_blocks].tolist()
        bh[eager_blocks] = NO_HASH
        eager_blocks = eager_blocks.tolist()
        index = self.cached_block_hash_to_block
        owners = list(map(index.pop, eager_hashes, repeat(None)))  # C-level: blocks almost always own theirs
        if owners != eager_blocks:
            for owner, h in zip(owners, eager_hashes):
                if owner is not None and bh.item(owner) == h:
                    index[h] = owner  # a duplicate was evicted: the entry stays its (surviving) owner's

    def get_new_block(self) -> int:
        """``get_new_blocks(1)[0]`` in one call: a decoding request takes one block at a time."""
        block = self.free_block_queue.popleft()
        state = self.run_of.item(block)
        if state != NOT_CACHED:
            self.run_of[block] = NOT_CACHED
            self.num_evictions += 1
            if state == IN_INDEX:
                h = self.block_hash.item(block)
                index = self.cached_block_hash_to_block
                if index.get(h) == block:
                    del index[h]
                self.block_hash[block] = NO_HASH
        self.ref_cnt[block] = 1
        return block

    # --- prefix cache ------------------------------------------------------------------
    def begin_run(self, blocks: Sequence[int], root: int, hashes_upto: Callable[[int], list[int]]) -> ChainRun:
        """Start registering a request's chain (``blocks[0]``, whose hash is ``root``, comes first).

        Lazy if the root is new to the index; eager if anyone else's blocks are cached under it.
        """
        known = self._roots.get(root)
        if known is not None and known != EAGER and not self._materialize(known):
            known = None  # the other run is fully evicted: the root is new again
        run = ChainRun(self._next_run_id, root, blocks, hashes_upto, eager=known is not None)
        self._next_run_id += 1
        if not run.eager:
            if len(self._runs) >= self._prune_at:  # before adding the run: it has no cached block yet
                self._prune_runs()
            self._roots[root] = run.run_id
            self._runs[run.run_id] = run
        return run

    def cache_blocks(self, run: ChainRun, start: int, stop: int,
                     new_ids: tuple[int, np.ndarray] | None = None) -> None:
        """Register positions ``[start, stop)`` of ``run`` (first writer wins on duplicates).

        A block keeps the hash it was first registered with until it is evicted. ``new_ids``:
        ``(position, ids)`` when the blocks from that position on are ``ids`` (an array just
        taken by ``get_new_block_ids``), which a lazy run then marks without a conversion.
        """
        run.num_blocks = stop
        if not run.eager:
            if new_ids is not None and start >= new_ids[0]:
                idx = new_ids[1][start - new_ids[0]:stop - new_ids[0]]
            else:
                idx = as_int64(run.blocks[start:stop])
            self.run_of[idx] = run.run_id
            return
        blocks = run.blocks[start:stop]
        hashes = run.hashes_upto(stop)[start:stop]
        bh = self.block_hash
        idx = np.array(blocks, dtype=np.int64)
        fresh = bh[idx] == NO_HASH
        if _count_nonzero(fresh) != len(fresh):  # prefix hits, already registered: they keep their hash
            keep = fresh.tolist()
            idx = idx[fresh]
            blocks = list(compress(blocks, keep))
            hashes = list(compress(hashes, keep))
        bh[idx] = hashes
        self.run_of[idx] = IN_INDEX
        self._any_in_index = True
        deque(map(self.cached_block_hash_to_block.setdefault, hashes, blocks), 0)  # setdefault per pair, in C

    def cache_block(self, run: ChainRun, i: int) -> None:
        """``cache_blocks(run, i, i + 1)`` for one block (a decoding request fills one at a time)."""
        block = run.blocks[i]
        run.num_blocks = i + 1
        if not run.eager:
            self.run_of[block] = run.run_id
            return
        bh = self.block_hash
        if bh.item(block) == NO_HASH:
            h = run.hashes_upto(i + 1)[i]
            bh[block] = h
            self.run_of[block] = IN_INDEX
            self._any_in_index = True
            self.cached_block_hash_to_block.setdefault(h, block)

    def root_cached(self, root: int) -> bool:
        """Whether any block of a chain with this root may be cached; makes the root eager, so
        ``cached_block_hash_to_block`` answers exactly for the chain's hashes afterwards."""
        known = self._roots.get(root)
        if known is None:
            return False
        return known == EAGER or self._materialize(known)

    def find_cached_prefix(self, hashes: Sequence[int], max_blocks: int) -> list[int]:
        """Blocks cached under ``hashes[:max_blocks]``, up to the first miss (a chain from its root)."""
        if max_blocks <= 0 or not self.root_cached(hashes[0]):
            return []
        get = self.cached_block_hash_to_block.get
        hit: list[int] = []
        for h in hashes[:max_blocks]:
            block = get(h)
            if block is None:
                break
            hit.append(block)
        return hit

    def _materialize(self, run_id: int) -> bool:
        """Move a lazy run's cached blocks into the eager index; False if none is cached."""
        run = self._runs[run_id]
        if run.catch_up is not None:
            run.catch_up(True)
        del self._runs[run_id]
        run.eager = True
        n = run.num_blocks
        idx = np.array(run.blocks[:n], dtype=np.int64)
        live = self.run_of[idx] == run_id
        if not _count_nonzero(live):
            del self._roots[run.root]
            return False
        self._roots[run.root] = EAGER
        live_idx = idx[live]
        self.run_of[live_idx] = IN_INDEX
        self._any_in_index = True
        keep = live.tolist()
        hashes = list(compress(run.hashes_upto(n)[:n], keep))
        self.block_hash[live_idx] = hashes
        self.cached_block_hash_to_block.update(zip(hashes, live_idx.tolist()))
        return True

    def _prune_runs(self) -> None:
        """Forget lazy runs none of whose blocks is cached any more (they index nothing)."""
        marked = self.run_of[self.run_of > 0]
        live = np.bincount(marked, minlength=self._next_run_id).tolist()
        for run_id in [r for r in self._runs if not live[r]]:
            del self._roots[self._runs.pop(run_id).root]
        self._prune_at = 4 * len(self._runs) + 4096  # amortized O(1) per run; a few MB of dead runs at most

    def cached_blocks(self) -> dict[int, int]:
        """Every cached hash -> block, as the eager index would hold it; for tests and debugging."""
        out = dict(self.cached_block_hash_to_block)
        run_of = self.run_of
        for run in list(self._runs.values()):
            if run.catch_up is not None:
                run.catch_up(False)
            n = run.num_blocks
            for b, h in zip(np.asarray(run.blocks[:n], dtype=np.int64).tolist(), run.hashes_upto(n)):
                if run_of.item(b) == run.run_id:
                    out[h] = b
        return out

    def is_cached(self) -> np.ndarray:
        """Per block: whether it holds registered content (eager hash or lazy run)."""
        return self.run_of != NOT_CACHED

    def touch(self, blocks: Sequence[int]) -> None:
        """Take a reference on prefix-hit blocks, pulling free ones out of the queue."""
        ref = self.ref_cnt
        remove = self.free_block_queue.remove
        for block in blocks:
            if not ref.item(block):
                remove(block)
        ref[np.array(blocks, dtype=np.int64)] += 1

    def free_blocks(self, ordered_blocks: Sequence[int] | np.ndarray) -> None:
        """Drop one reference from each block; blocks reaching 0 join the queue tail in order.

        Callers pass a request's blocks tail first, so a request's last blocks are evicted
        before its (more shareable) first blocks. A block may appear once per call. An int64
        array is used as is (not modified).
        """
        if isinstance(ordered_blocks, np.ndarray):
            idx = ordered_blocks
        else:
            idx = np.fromiter(ordered_blocks, np.int64, len(ordered_blocks))
        ref = self.ref_cnt[idx]
        if not _count_nonzero(ref != 1):  # the common case: nobody else holds any of them
            self.ref_cnt[idx] = 0
            self.free_block_queue.append_n(idx)
            return
        if _count_nonzero(ref < 1):
            raise RuntimeError(f"double free of block {int(idx[ref < 1][0])}")
        ref -= 1
        self.ref_cnt[idx] = ref
        self.free_block_queue.append_n(idx[ref == 0])

    def reset_prefix_cache(self) -> int:
        """Forget the hashes of all free blocks; returns how many were dropped.

        Blocks held by live requests keep their hashes (their content is still valid).
        """
        drop = np.flatnonzero((self.ref_cnt == 0) & self.is_cached())
        if len(drop):
            self._evict(drop, self.run_of[drop])
        return len(drop)

    def usage(self, num_free: int | None = None) -> float:
        """Fraction of blocks in use: now, or when ``num_free`` of them are free."""
        if num_free is None:
            num_free = self.free_block_queue.num_free_blocks
        return 1.0 - num_free / self.num_blocks


class HostBlockPool:
    """Host (CPU) memory blocks for swap preemption: just a capacity and a free list."""

    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 0:
            raise ValueError(f"HostBlockPool.num_blocks must be >= 0, got {num_blocks!r}")
        self.num_blocks = num_blocks
        self._free = list(range(num_blocks - 1, -1, -1))

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise RuntimeError(f"cannot allocate {n} host blocks: only {len(self._free)} free")
        return [self._free.pop() for _ in range(n)]

    def free(self, block_ids: list[int]) -> None:
        in_free = set(self._free)
        for b in block_ids:
            if b in in_free or not (0 <= b < self.num_blocks):
                raise RuntimeError(f"double free of host block {b}")
            in_free.add(b)
            self._free.append(b)
