"""KV cache blocks, their free queue and the prefix-cache index.

Design (vLLM v1's, re-derived): every block lives in one pool. A block with ref_cnt 0 sits
in the free queue but keeps its content hash, so a later request can still hit it (lazy
eviction); it is evicted only when ``get_new_blocks`` pops it for reuse. The free queue is
a doubly linked list so a hit can pull a block out of the middle in O(1), and its order is
the LRU order: freed blocks go to the tail, allocation takes from the head.
"""
from __future__ import annotations

from collections.abc import Iterable


class KVCacheBlock:
    __slots__ = ("block_id", "ref_cnt", "block_hash", "prev", "next")

    def __init__(self, block_id: int) -> None:
        self.block_id = block_id
        self.ref_cnt = 0
        self.block_hash: int | None = None
        self.prev: KVCacheBlock | None = None
        self.next: KVCacheBlock | None = None

    def __repr__(self) -> str:
        return f"KVCacheBlock(id={self.block_id}, ref={self.ref_cnt}, hash={self.block_hash})"


class FreeBlockQueue:
    """Doubly linked list of free blocks with sentinels; O(1) popleft, append and remove."""

    def __init__(self, blocks: list[KVCacheBlock]) -> None:
        self._head = KVCacheBlock(-1)
        self._tail = KVCacheBlock(-1)
        self._head.next = self._tail
        self._tail.prev = self._head
        self.num_free_blocks = 0
        for b in blocks:
            self.append(b)

    def popleft(self) -> KVCacheBlock:
        block = self._head.next
        if block is self._tail:
            raise RuntimeError("FreeBlockQueue.popleft on an empty queue")
        self.remove(block)
        return block

    def remove(self, block: KVCacheBlock) -> None:
        prev, nxt = block.prev, block.next
        if prev is None or nxt is None:
            raise RuntimeError(f"{block} is not in the free queue")
        prev.next = nxt
        nxt.prev = prev
        block.prev = block.next = None
        self.num_free_blocks -= 1

    def append(self, block: KVCacheBlock) -> None:
        if block.prev is not None or block.next is not None:
            raise RuntimeError(f"{block} is already in the free queue")
        last = self._tail.prev
        last.next = block
        block.prev = last
        block.next = self._tail
        self._tail.prev = block
        self.num_free_blocks += 1

    def block_ids(self) -> list[int]:
        """Free block ids from head (next to be reused) to tail; for tests and debugging."""
        out, b = [], self._head.next
        while b is not self._tail:
            out.append(b.block_id)
            b = b.next
        return out


class BlockPool:
    """All GPU KV blocks, the free queue and the hash -> block index of cached blocks."""

    def __init__(self, num_blocks: int, enable_caching: bool = True) -> None:
        if num_blocks < 1:
            raise ValueError(f"BlockPool.num_blocks must be >= 1, got {num_blocks!r}")
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.blocks = [KVCacheBlock(i) for i in range(num_blocks)]
        self.free_block_queue = FreeBlockQueue(self.blocks)
        self.cached_block_hash_to_block: dict[int, KVCacheBlock] = {}
        self.num_evictions = 0

    @property
    def num_free_blocks(self) -> int:
        return self.free_block_queue.num_free_blocks

    def get_cached_block(self, block_hash: int) -> KVCacheBlock | None:
        return self.cached_block_hash_to_block.get(block_hash)

    def get_new_blocks(self, n: int) -> list[KVCacheBlock]:
        """Take ``n`` blocks from the LRU head, evicting their cached hashes."""
        queue = self.free_block_queue
        if n > queue.num_free_blocks:
            raise RuntimeError(f"cannot get {n} blocks: only {self.num_free_blocks} free")
        pop = self.cached_block_hash_to_block.pop
        evicted = 0
        out = []
        append = out.append
        head = queue._head
        block = head.next
        for _ in range(n):  # FreeBlockQueue.popleft_n and _drop_hash, inlined: admission takes dozens
            append(block)
            h = block.block_hash
            if h is not None:
                owner = pop(h, None)  # one lookup: the block almost always owns its entry
                if owner is not block and owner is not None:
                    self.cached_block_hash_to_block[h] = owner  # a duplicate: the entry stays the owner's
                block.block_hash = None
                evicted += 1
            block.ref_cnt = 1
            nxt = block.next
            block.prev = block.next = None
            block = nxt
        head.next = block
        block.prev = head
        queue.num_free_blocks -= n
        self.num_evictions += evicted
        return out

    def get_new_block(self) -> KVCacheBlock:
        """``get_new_blocks(1)[0]`` in one call: a decoding request takes one block at a time."""
        queue = self.free_block_queue
        head = queue._head
        block = head.next
        if block is queue._tail:
            raise RuntimeError("cannot get a block: none free")
        nxt = block.next
        head.next = nxt
        nxt.prev = head
        block.prev = block.next = None
        queue.num_free_blocks -= 1
        h = block.block_hash
        if h is not None:
            index = self.cached_block_hash_to_block
            if index.get(h) is block:
                del index[h]
            block.block_hash = None
            self.num_evictions += 1
        block.ref_cnt = 1
        return block

    def _drop_hash(self, block: KVCacheBlock) -> None:
        if self.cached_block_hash_to_block.get(block.block_hash) is block:
            del self.cached_block_hash_to_block[block.block_hash]
        block.block_hash = None

    def cache_block(self, block: KVCacheBlock, block_hash: int) -> None:
        """Register a full block under its chained hash (first writer wins on duplicates)."""
        if block.block_hash is not None:
            return
        block.block_hash = block_hash
        self.cached_block_hash_to_block.setdefault(block_hash, block)

    def touch(self, blocks: list[KVCacheBlock]) -> None:
        """Take a reference on prefix-hit blocks, pulling free ones out of the queue."""
        remove = self.free_block_queue.remove
        for block in blocks:
            if block.ref_cnt == 0:
                remove(block)
            block.ref_cnt += 1

    def free_blocks(self, ordered_blocks: Iterable[KVCacheBlock]) -> None:
        """Drop one reference from each block; blocks reaching 0 join the queue tail in order.

        Callers pass a request's blocks tail first, so a request's last blocks are evicted
        before its (more shareable) first blocks.
        """
        queue = self.free_block_queue
        tail = queue._tail
        last = tail.prev
        added = 0
        try:
            for block in ordered_blocks:  # FreeBlockQueue.append, inlined: a finishing request frees dozens
                ref = block.ref_cnt - 1
                if ref:  # still shared, or a double free
                    if ref < 0:
                        raise RuntimeError(f"double free of {block}")
                    block.ref_cnt = ref
                    continue
                if block.prev is not None:  # queued blocks are always linked (the head is a sentinel)
                    raise RuntimeError(f"{block} is already in the free queue")
                block.ref_cnt = 0
                last.next = block
                block.prev = last
                last = block
                added += 1
        finally:  # the blocks before a bad one stay freed, the list stays closed
            last.next = tail
            tail.prev = last
            queue.num_free_blocks += added

    def reset_prefix_cache(self) -> int:
        """Forget the hashes of all free blocks; returns how many were dropped.

        Blocks held by live requests keep their hashes (their content is still valid).
        """
        dropped = 0
        for block in self.blocks:
            if block.ref_cnt == 0 and block.block_hash is not None:
                self._drop_hash(block)
                dropped += 1
        return dropped

    def usage(self) -> float:
        return 1.0 - self.free_block_queue.num_free_blocks / self.num_blocks


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
