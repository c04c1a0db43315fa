"""LazyDecodeScheduler: the Scheduler, with steady decoders advanced by the step counter.

In a simulation most running requests, in most steps, decode one token whose id is known
in advance (the workload's forced output ids, else one fixed id). Touching each of them
every step makes a step cost O(batch), which dominates a long simulation. This subclass
*parks* such a request: it stores the step ``p`` from which the request advances lazily,
its progress ``c0`` and output count ``n0`` then, and from then on its progress at step
``s`` is ``c0 + s - p``. A parked request needs the KV cache manager only at block edges
(a new block when its position starts one, a prefix-cache registration when it fills one),
which happen every ``block_size`` steps at a step fixed by its *phase* ``(c0 - p) %
block_size``; parked requests are kept in one bucket per phase, so a step touches only the
requests at an edge. Its finish step is known when it is parked (its length limit, or the
first stop id among its known outputs). Its output ids and token times are written when it
leaves the lazy state (finish, abort, or a fallback step), from the end time of every step.

Results equal the plain Scheduler exactly (same blocks in the same order, same hashes,
same timestamps): edges are applied in the plain scheduler's order (running order, which
is admission order, tracked by a sequence number), and any step whose outcome could depend
on parked requests in a way this bookkeeping does not model (a possible preemption, a
token budget that cannot cover every running request) first writes every parked request
back and runs the plain step. Only a backend that knows the decode tokens in advance may use
it: the simulator's ``SimBackend`` (``default_token_id`` is its ``SIM_TOKEN_ID``).

With ``through_finishes`` a fast-forward run (``decode_segments``, ``apply_decode_steps``)
goes on past finishes while nobody waits: a finish then only shrinks the batch, so the run
is planned as segments with one batch each (costed by the caller as the separate runs they
replace) and each finished request leaves at its step, as in the plain scheduler.
"""
from __future__ import annotations

import bisect
from array import array
from collections import deque
from collections.abc import Iterator
from functools import partial

from core.config import CacheConfig, SchedulerConfig
from core.request import Request, RequestStatus
from core.scheduler import _BLOCKED_BUDGET, _BLOCKED_KV, _BLOCKED_NONE, Scheduler, largest_fitting
from core.scheduler_output import SchedulerOutput, StepResult


class _Parked:
    """Where a parked request stood when it was parked (see the module docstring)."""

    __slots__ = ("p", "c0", "n0", "finish", "phase", "block_ids", "default_from", "spare")

    def __init__(self, p: int, c0: int, n0: int, finish: int, phase: int, block_ids: array,
                 default_from: int, spare: bool) -> None:
        self.p = p  # first step it advances lazily
        self.c0 = c0  # num_computed_tokens before step p
        self.n0 = n0  # output tokens before step p
        self.finish = finish  # the step that samples its last token
        self.phase = phase  # (c0 - p) % block_size: its bucket
        # Its KV cache manager block table (the same object while it stays parked: only a
        # preemption or swap replaces it, and those run the plain way), read at every edge.
        self.block_ids = block_ids
        self.default_from = default_from  # every token from this position on is the default id
        # It holds blocks past those of positions < c0 (reserved ahead): some of its edges take no
        # block. Without spare blocks every edge takes one (its table ends where it writes next).
        self.spare = spare


class LazyDecodeScheduler(Scheduler):
    emits_token_ids = False  # its backend knows every id (see the module docstring)

    def __init__(self, scheduler_config: SchedulerConfig, cache_config: CacheConfig,
                 eos_token_id: int | None = None, default_token_id: int = 1, through_finishes: bool = False) -> None:
        super().__init__(scheduler_config, cache_config, eos_token_id)
        self.default_token_id = default_token_id
        self._default_block = (default_token_id,) * cache_config.block_size
        self._parked: dict[Request, _Parked] = {}
        self._phases: list[list[Request]] = [[] for _ in range(cache_config.block_size)]  # sorted by _seq
        # The same buckets' block tables, entry by entry: a step's takes hand blocks to a bucket's
        # tables in C. ``_num_spare``: parked requests with spare blocks (``_Parked.spare``: reserved
        # ahead, as Orca and static batching do), whose edges may need no block (the others' always do).
        self._phase_tables: list[list[array]] = [[] for _ in range(cache_config.block_size)]
        self._num_spare = 0
        # The parked requests whose block registrations run at their edges; the others' are
        # deferred (see _defer_registrations), in the same phase buckets, also sorted by _seq.
        self._reg_phases: list[list[Request]] = [[] for _ in range(cache_config.block_size)]
        self._defer = cache_config.enable_prefix_caching and cache_config.block_size > 1
        self.through_finishes = through_finishes
        self._finish_at: dict[int, list[Request]] = {}
        # Sorted (not heaps: decode_segments walks them in order): the keys of _finish_at (stale
        # keys dropped lazily), and (-(c0 - p), seq, req) of the parked requests.
        self._finish_steps: list[int] = []
        self._offsets: list[tuple[int, int, Request]] = []
        self._offset_sum = 0  # sum of (c0 - p) over parked requests
        self._active: list[Request] = []  # running requests that are not parked, in running order
        self._seq: dict[Request, int] = {}  # running order: a number given at each admission
        self._next_seq = 0
        self._ends = array("d", [0.0])  # _ends[s]: end time of step s (unused slots hold 0)
        # Block hashes are computed lazily, possibly while a request is parked and its token
        # list lags: the KV cache manager asks for the (known) tokens it needs.
        self.kv.fill_tokens = self._fill_to_length

    # --- lazy progress ---------------------------------------------------------------
    def _num_computed(self, request: Request) -> int:
        """Progress after the last step (a parked request has done steps p..step_id)."""
        st = self._parked.get(request)
        return request.num_computed_tokens if st is None else st.c0 + self.step_id - st.p + 1

    def _oracle(self, request: Request, start: int, stop: int) -> list[int]:
        """Output ids ``start:stop`` of a request, as the simulator's backend samples them."""
        forced = request.forced_output_token_ids
        if not forced or len(forced) <= start:
            return [self.default_token_id] * (stop - start)
        toks = forced[start:stop]
        if len(toks) < stop - start:
            toks += [self.default_token_id] * (stop - start - len(toks))
        return toks

    def _fill_tokens(self, request: Request, num_outputs: int) -> None:
        """Extend ``all_token_ids`` to ``num_outputs`` outputs (block hashes read them)."""
        known = len(request.all_token_ids) - len(request.prompt_token_ids)
        if known < num_outputs:
            request.all_token_ids.extend(self._oracle(request, known, num_outputs))

    def _catch_up(self, request: Request, end: bool) -> None:
        """Apply a parked request's deferred block registrations; with ``end``, stop deferring.

        A parked request whose chain is lazy (``core.block_pool.ChainRun``: nobody else shares
        its root) does not register its blocks at its edges: a lazy chain's registrations
        change nothing anyone can observe until the chain is materialized, which calls this
        first (as do unparking and ``BlockPool.cached_blocks``). That saves one edge visit per
        ``block_size`` decode steps of most requests. It registers every block filled through
        ``step_id``. Inside ``schedule``'s merged loop of active and parked requests that is one
        block more than the plain order (the request's own edge of this step comes later), and
        harmlessly so: only a request starting its chain in this step can share a lazy root (two
        chains on one root make it eager), and that request registers its block 0 alone, a hash
        no later block carries (a parked one fills one block a step; an active one ahead of the
        parked one in running order got at least as many tokens in every step the parked one
        ran, so it started its chain first).
        """
        if self._apply_deferred(request, end) and end:  # it stays parked, registering at its edges
            self._insort(self._reg_phases[self._parked[request].phase], request)

    def _apply_deferred(self, request: Request, end: bool, at_free: bool = False) -> bool:
        """``_catch_up``'s registrations (and with ``end`` no more deferring); False if none are deferred.

        ``at_free``: the request is freed next (it finished), so its registrations are handed to
        that free (``KVCacheManager.register_at_free``), which reads its block ids anyway."""
        run = self.kv.req_to_run.get(request.request_id)
        if run is None or run.catch_up is None:
            return False
        st = self._parked[request]
        steps = self.step_id - st.p
        if steps >= 0:  # the oracle knows its tokens: no need to write them for a lazy chain
            if at_free:
                self.kv.register_at_free(request, st.c0 + steps + 1)
            else:
                self.kv.cache_blocks(request, st.c0 + steps + 1, tokens_known=True)
        if end:
            run.catch_up = None
        return True

    def _fill_to_length(self, request: Request, num_tokens: int) -> None:
        self._fill_tokens(request, num_tokens - len(request.prompt_token_ids))

    def _write_back(self, request: Request, st: _Parked, last_step: int) -> None:
        """Write a parked request's progress through ``last_step`` into its fields."""
        count = last_step - st.p + 1
        if count <= 0:
            return
        n = st.n0 + count
        toks = self._oracle(request, st.n0, n)
        request.output_token_ids.extend(toks)
        known = len(request.all_token_ids) - len(request.prompt_token_ids)
        if known < n:
            if known == st.n0:
                request.all_token_ids.extend(toks)
            else:
                request.all_token_ids.extend(toks[known - st.n0:] if known > st.n0 else self._oracle(request, known, n))
        request.token_times.extend(self._ends[st.p:last_step + 1])
        if request.first_token_time is None:
            request.first_token_time = self._ends[st.p]
        request.num_computed_tokens = st.c0 + count

    def _park(self, request: Request, p: int) -> None:
        c0 = request.num_computed_tokens
        n0 = len(request.output_token_ids)
        # Step p + j samples output n0 + j and leaves the request c0 + j + 2 tokens long.
        last = request.max_num_tokens - c0 - 2
        stops = request.stop_set
        if stops is not None:
            forced = request.forced_output_token_ids or []
            for j, tok in enumerate(forced[n0:n0 + last + 1]):
                if tok in stops:
                    last = j
                    break
            else:
                if self.default_token_id in stops:
                    last = min(last, max(0, len(forced) - n0))
        kv = self.kv
        rid = request.request_id
        default_from = max(len(request.all_token_ids),
                           len(request.prompt_token_ids) + len(request.forced_output_token_ids or ()))
        bs = kv.block_size
        table = kv.req_to_block_ids[rid]
        st = _Parked(p, c0, n0, p + last, (c0 - p) % bs, table, default_from, len(table) > -(-c0 // bs))
        self._parked[request] = st
        seq = self._seq[request]
        self._insort(self._phases[st.phase], request, self._phase_tables[st.phase], table)
        self._num_spare += st.spare
        run = kv.req_to_run.get(rid)
        if self._defer and run is not None and not run.eager:
            run.catch_up = partial(self._catch_up, request)
        else:
            self._insort(self._reg_phases[st.phase], request)
        finish_list = self._finish_at.get(st.finish)
        if finish_list is None:
            self._finish_at[st.finish] = [request]
            bisect.insort(self._finish_steps, st.finish)
        else:
            finish_list.append(request)
        self._offset_sum += c0 - p
        bisect.insort(self._offsets, (p - c0, seq, request))

    def _insort(self, bucket: list[Request], request: Request, tables: list[array] | None = None,
                table: array | None = None) -> None:
        """Insert into a phase bucket in running order (usually at its end: the newest admission),
        and ``table`` into its parallel ``tables`` at the same index."""
        seq = self._seq
        if not bucket or seq[bucket[-1]] < seq[request]:
            bucket.append(request)
            if tables is not None:
                tables.append(table)
        else:
            i = bisect.bisect_right(bucket, seq[request], key=seq.__getitem__)
            bucket.insert(i, request)
            if tables is not None:
                tables.insert(i, table)

    def _unpark(self, request: Request, last_step: int, finished: bool = False) -> _Parked:
        """Take one request out of the lazy state (its finish entry is the caller's), written back;
        ``finished``: it is freed next (see ``_apply_deferred``)."""
        if not self._apply_deferred(request, True, at_free=finished):
            self._reg_phases[self._parked[request].phase].remove(request)
        st = self._parked.pop(request)
        bucket = self._phases[st.phase]
        i = bucket.index(request)
        del bucket[i], self._phase_tables[st.phase][i]
        self._num_spare -= st.spare
        self._offset_sum -= st.c0 - st.p
        offsets = self._offsets
        del offsets[bisect.bisect_left(offsets, (st.p - st.c0, self._seq[request], request))]
        self._write_back(request, st, last_step)
        return st

    def _unpark_all(self) -> None:
        """Write every parked request back: the next step runs the plain scheduler's way."""
        if not self._parked:
            return
        last = self._last_stamped()
        for request, st in self._parked.items():
            self._apply_deferred(request, True)
            self._write_back(request, st, last)
        self._parked.clear()
        for bucket in self._phases + self._reg_phases + self._phase_tables:
            bucket.clear()
        self._num_spare = 0
        self._finish_at.clear()
        self._finish_steps.clear()
        self._offsets.clear()
        self._offset_sum = 0

    def _last_stamped(self) -> int:
        """The last step whose result was applied (an abort may come between schedule and update)."""
        return min(self.step_id, len(self._ends) - 1)

    def _renumber(self) -> None:
        """Give the running requests fresh sequence numbers in running order."""
        seq = self._seq
        seq.clear()
        n = self._next_seq
        for r in self.running:
            seq[r] = n
            n += 1
        self._next_seq = n

    def _longest_offset(self) -> int:
        return -self._offsets[0][0] if self._offsets else 0

    def decode_shape(self) -> tuple[int, int, int]:
        """(batch, sum of context lengths, longest context) of the next pure-decode step.

        Only valid when ``decode_horizon()`` is non-zero (every running request parked).
        """
        n = len(self._parked)
        s = self.step_id + 1
        return n, self._offset_sum + n * s + n, self._longest_offset() + s + 1

    # --- edges -----------------------------------------------------------------------
    def _num_edges(self, s: int) -> int:
        """Parked requests at a block edge in step ``s`` (taking or registering a block)."""
        bs = self.kv.block_size
        n = len(self._phases[-s % bs])
        if self.kv.enable_prefix_caching and bs > 1:
            n += len(self._phases[(bs - 1 - s) % bs])
        return n

    def _edge_requests(self, s: int, deferred_too: bool = False) -> list[Request]:
        """Parked requests at a block edge in step ``s``, in running order; a registration edge
        of a request whose registrations are deferred only if ``deferred_too``."""
        bs = self.kv.block_size
        take = self._phases[-s % bs]
        if not self.kv.enable_prefix_caching or bs == 1:
            return take
        reg = (self._phases if deferred_too else self._reg_phases)[(bs - 1 - s) % bs]
        if not take:
            return reg
        if not reg:
            return take
        return sorted(take + reg, key=self._seq.__getitem__)

    def _run_edges(self, edges: list[Request], s: int) -> None:
        """What ``KVCacheManager.append_decode_slot`` does for parked requests at an edge in step ``s``.

        Inlined (one call per step, not several per request): edges are most of the work
        left in a long simulation. A registration the fast path cannot prove to be the plain
        one (the request's next block to register is not this one) goes the general way.
        """
        kv = self.kv
        bs = kv.block_size
        caching = kv.enable_prefix_caching
        parked = self._parked
        num_cached = kv.num_cached_blocks
        pool = kv.block_pool
        get_new_block = pool.get_new_block
        cache_block = pool.cache_block
        runs = kv.req_to_run
        for r in edges:
            st = parked[r]
            steps = s - st.p
            c = st.c0 + steps
            if not c % bs:
                blocks = st.block_ids
                if c >= len(blocks) * bs:
                    blocks.append(get_new_block())
            if caching and not (c + 1) % bs:
                i = c // bs
                rid = r.request_id
                run = runs.get(rid)
                if run is None or num_cached[rid] != i:
                    self._fill_tokens(r, st.n0 + steps)
                    kv.cache_blocks(r, c + 1)
                    continue
                if run.eager:  # its hash is needed now: compute it without writing the tokens back
                    hashes = r.block_hashes
                    if len(hashes) < i:
                        self._fill_tokens(r, st.n0 + steps)
                        kv.cache_blocks(r, c + 1)
                        continue
                    if len(hashes) == i:
                        start = i * bs
                        tokens = (self._default_block if start >= st.default_from
                                  else self._block_tokens(r, start, c + 1))
                        hashes.append(hash((hashes[-1] if i else None, tokens, r.cache_salt)))
                cache_block(run, i)
                num_cached[rid] = i + 1

    def _take_blocks(self, phase: int, s: int) -> None:
        """``_run_edges`` of step ``s`` (whose edges are bucket ``phase``'s) when they only take
        blocks: one ``get_new_blocks``, handed out in running order (the same blocks to the same
        requests: nothing between two takes looks at the pool)."""
        tables = self._phase_tables[phase]
        if self._num_spare:  # some may hold the block already
            bs = self.kv.block_size
            tables = [st.block_ids for st in map(self._parked.__getitem__, self._phases[phase])
                      if st.c0 + s - st.p >= len(st.block_ids) * bs]
        if tables:
            deque(map(array.append, tables, self.kv.block_pool.get_new_blocks(len(tables))), 0)

    def _block_tokens(self, request: Request, start: int, stop: int) -> tuple[int, ...]:
        """Token ids of the full block at positions ``start:stop`` of a parked request."""
        tokens = request.all_token_ids
        if stop <= len(tokens):
            return tuple(tokens[start:stop])
        prompt_len = len(request.prompt_token_ids)
        forced = request.forced_output_token_ids
        if start >= len(tokens) and (not forced or len(forced) <= start - prompt_len):
            return self._default_block  # all sampled ids: the common case, built once
        lo = max(start, len(tokens))
        return tuple(tokens[start:lo]) + tuple(self._oracle(request, lo - prompt_len, stop - prompt_len))

    # --- one step --------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        s = self.step_id + 1
        if not self._parked or not self._fits(self._num_edges(s)):
            return self._plain_schedule()
        active = self._active
        edges = self._edge_requests(s, deferred_too=bool(active))
        self.step_id = s
        out = SchedulerOutput(s, block_size=self.cache_config.block_size, finished_req_ids=self.finished_req_ids)
        self.finished_req_ids = []
        reqs: list[Request] = []
        nums: list[int] = []
        if not active:  # the common case: only parked requests, no merge needed
            bs = self.kv.block_size
            if self.kv.enable_prefix_caching and (bs == 1 or self._reg_phases[(bs - 1 - s) % bs]):
                self._run_edges(edges, s)
            else:  # only takes (registrations deferred, or none)
                self._take_blocks(-s % bs, s)
            order = []
        elif edges:
            order = sorted(active + edges, key=self._seq.__getitem__)
        else:
            order = active
        kv = self.kv
        parked = self._parked
        threshold = self.config.long_prefill_token_threshold
        for req in order:
            if req in parked:
                self._run_edges([req], s)
                continue
            c = req.num_computed_tokens
            num_new = len(req.all_token_ids) - c
            if num_new == 1 and c:
                ok = kv.append_decode_slot(req)
            else:
                if threshold and num_new > threshold:
                    num_new = threshold
                ok = kv.allocate_slots(req, num_new) is not None
            if not ok:
                raise RuntimeError(f"LazyDecodeScheduler: allocation for {req.request_id!r} failed in a step "
                                   "_fits() admitted; this is a bug")
            reqs.append(req)
            nums.append(num_new)
        n_parked = len(parked)
        budget = self.config.max_num_batched_tokens - sum(nums) - n_parked
        self._blocked = _BLOCKED_NONE
        if self.waiting:
            n = len(self.running)
            self._admit(out, reqs, nums, budget)
            self._number_new(n)
        self._finalize(out, reqs, nums)
        out.num_lazy_decodes = n_parked
        out.lazy_computed_sum = self._offset_sum + n_parked * s
        out.lazy_computed_max = self._longest_offset() + s
        out.total_num_scheduled_tokens += n_parked
        return out

    def _plain_schedule(self) -> SchedulerOutput:
        """The plain scheduler's step, with every parked request written back first."""
        self._unpark_all()
        out = super().schedule()
        self._renumber()
        self._active = list(self.running)
        return out

    def _fits(self, num_edges: int) -> bool:
        """Whether the next step can run lazily: every running request gets its tokens within
        the budget and every allocation (``num_edges`` parked requests' at most, and the active
        requests') is sure to succeed, so nobody is preempted."""
        kv = self.kv
        bs = kv.block_size
        held = kv.req_to_block_ids
        threshold = self.config.long_prefill_token_threshold
        demand = len(self._parked)
        need = num_edges
        for r in self._active:
            c = r.num_computed_tokens
            n = len(r.all_token_ids) - c
            if threshold and n > threshold:
                n = threshold
            demand += n
            need += max(0, -(-(c + n) // bs) - len(held[r.request_id]))
        return demand <= self.config.max_num_batched_tokens and need <= kv.num_free_blocks

    def _number_new(self, n_before: int) -> None:
        """Sequence numbers and the active list for requests ``_admit`` just appended."""
        new = self.running[n_before:]
        n = self._next_seq
        for r in new:
            self._seq[r] = n
            n += 1
        self._next_seq = n
        self._active.extend(new)

    def update_from_output(self, out: SchedulerOutput, result: StepResult, now: float) -> list[Request]:
        if out.step_id != self.step_id:
            raise RuntimeError(f"update_from_output for step {out.step_id}, but the last schedule() was step "
                               f"{self.step_id}")
        s = out.step_id
        self._stamp(s, now)
        finished = self._apply_sampled(out, result, now)
        parked_done = self._finish_parked(s, now)
        if parked_done:  # in running order, as the plain scheduler finishes (and frees) them
            finished = sorted(finished + parked_done, key=self._seq.__getitem__)
        if finished:
            self._finish(finished)
        self._park_active(s + 1)
        return finished

    def _stamp(self, s: int, now: float) -> None:
        ends = self._ends
        if len(ends) < s:
            ends.extend([0.0] * (s - len(ends)))
        ends.append(now)

    def _finish_parked(self, s: int, now: float) -> list[Request]:
        done = self._finish_at.pop(s, None)
        if not done:
            return []
        done.sort(key=self._seq.__getitem__)
        for r in done:
            self._unpark(r, s, finished=True)
            if not self._check_stop(r, r.output_token_ids[-1]):
                raise RuntimeError(f"LazyDecodeScheduler: {r.request_id!r} was due to finish in step {s} "
                                   "but does not; this is a bug")
            r.finish_time = now
        return done

    def _park_active(self, p: int) -> None:
        """Park the active requests that now simply decode; keep the others active."""
        running = RequestStatus.RUNNING
        keep = []
        for r in self._active:
            if r.status is not running:
                self._seq.pop(r, None)
                continue
            c = r.num_computed_tokens
            if c and len(r.all_token_ids) - c == 1:
                self._park(r, p)
            else:
                keep.append(r)
        self._active = keep

    def _finish(self, finished: list[Request]) -> None:
        super()._finish(finished)
        for r in finished:
            self._seq.pop(r, None)

    def abort_request(self, request_id: str) -> Request | None:
        request = self.requests.get(request_id)
        if request is not None and request in self._parked:
            st = self._unpark(request, self._last_stamped())
            same_step = self._finish_at[st.finish]
            same_step.remove(request)
            if not same_step:
                del self._finish_at[st.finish]
        request = super().abort_request(request_id)
        if request is not None:
            self._seq.pop(request, None)
            if request in self._active:
                self._active.remove(request)
        return request

    # --- fast-forward ------------------------------------------------------------------
    def decode_horizon(self) -> int:
        """Like ``Scheduler.decode_horizon``, in O(1) of the batch when every running request is parked.

        Unlike the plain scheduler, a request that finished (or was aborted) since the last
        step does not stop the run when nobody waits: the blocks it freed could only matter to
        admission, and this scheduler's backend (the simulator's) needs no finished ids, which
        ``apply_decode_steps`` hands over. A step right after each finish is otherwise plain.
        """
        if self._active or not self._parked:
            return 0
        running = self.running
        if (self.finished_req_ids and self.waiting) or len(running) > self.config.max_num_batched_tokens:
            return 0
        if self.waiting and not self._admission_stays_blocked():
            return 0
        k = self._next_finish() - self.step_id  # includes the step in which the first request finishes
        if self.waiting and self._blocked in (_BLOCKED_KV, _BLOCKED_BUDGET):
            k = self._hit_growth_horizon(k)
        if k <= 0:
            return 0
        free = self.kv.num_free_blocks
        if len(self._parked) * -(-k // self.kv.block_size) <= free:  # a bound on _takes_within(k)
            return k
        return largest_fitting(k, self._takes_within, free)

    def _next_finish(self) -> int:
        steps = self._finish_steps
        while steps[0] not in self._finish_at:
            del steps[0]
        return steps[0]

    def _take_all_blocks(self, s0: int, k: int) -> dict[int, int] | None:
        """The edges of steps ``s0+1..s0+k`` in one go, if they only take blocks: for each
        finish step of the run, how many of the blocks come after it; else None (nothing done).

        Taking blocks in step order and running order from the LRU head is one
        ``get_new_blocks`` of them all. Only a registration that touches the index (an eager
        chain's; lazy chains' are deferred, see ``_catch_up``) could tell the order apart. So
        could a finish inside the run, but only if the pool ran short: its freed blocks join
        the queue's tail, and the takes after it come from the head as long as the blocks free
        before the run cover them all (else None).
        """
        kv = self.kv
        bs = kv.block_size
        if kv.enable_prefix_caching and (bs == 1 or any(self._reg_phases[(bs - 1 - s) % bs]
                                                        for s in range(s0 + 1, s0 + min(k, bs) + 1))):
            return None
        parked = self._parked
        phases = self._phases
        phase_tables = self._phase_tables
        finish_at = self._finish_at
        tables: list[array] = []  # one entry per block to take, in order
        through: dict[int, int] = {}  # finish step -> blocks taken up to it
        state = parked.__getitem__
        # Up to the first finish every parked request is still there; without spare blocks each
        # edge takes a block: a step's takes are its bucket's tables, as they stand.
        whole_buckets = s0 if self._num_spare else min(s0 + k, self._next_finish())
        for s in range(s0 + 1, s0 + k + 1):
            if s <= whole_buckets:
                tables += phase_tables[-s % bs]
            else:
                for st in map(state, phases[-s % bs]):
                    # Edges come at multiples of bs, so a request's earlier take in this run (not
                    # appended yet) never changes whether this one is needed.
                    if st.c0 + s - st.p >= len(st.block_ids) * bs and s <= st.finish:
                        tables.append(st.block_ids)
            if s in finish_at:
                through[s] = len(tables)
        n = len(tables)
        if n > kv.num_free_blocks:
            return None
        if tables:  # each table appends its block, in C
            deque(map(array.append, tables, kv.block_pool.get_new_blocks(n)), 0)
        return {f: n - t for f, t in through.items()}

    def _takes_within(self, k: int) -> int:
        """Blocks the parked requests may take in the next ``k`` steps (an upper bound)."""
        bs = self.kv.block_size
        s = self.step_id
        total = 0
        for phase, bucket in enumerate(self._phases):
            if bucket:  # steps t in (s, s + k] with (phase + t) % bs == 0
                total += len(bucket) * ((s + k + phase) // bs - (s + phase) // bs)
        return total


    def apply_decode_steps(self, k: int, step_end_times: list[float],
                           token_ids: list[list[int]] | None = None) -> list[Request]:
        """``k`` pure-decode steps of parked requests; ``token_ids`` is not needed (the ids are known).

        With ``through_finishes`` and nobody waiting the run may go on past finishes (see
        ``decode_segments``): each finished request leaves at its step, stamped with that step's
        end, exactly as the plain scheduler would finish and free it.
        """
        s0 = self.step_id
        last = s0 + k
        if self._active or not self._parked or (self._next_finish() < last and not self._runs_through_finishes()):
            raise RuntimeError(f"apply_decode_steps({k}): not a run of pure-decode steps (see decode_horizon)")
        self.finished_req_ids = []  # delivered with the run (see decode_horizon)
        ends = self._ends
        if len(ends) <= s0:
            ends.extend([0.0] * (s0 + 1 - len(ends)))
        ends.extend(step_end_times)
        batch = len(self._parked)
        segments = self.run_segments = []
        finished: list[Request] = []
        kv = self.kv
        start = s0  # the current stretch with one batch begins after this step
        f = self._next_finish()
        takes = self._take_all_blocks(s0, k)
        if takes is not None:  # all blocks are taken: KV usage after a finish counts the later takes as free
            while f <= last:
                done = self._finish_step(f, step_end_times[f - s0 - 1], finished)
                segments.append((f - start, batch, kv.usage(kv.num_free_blocks + takes[f])))
                batch -= done
                start = f
                f = self._next_finish() if self._parked else last + 1
        else:  # registrations touch the index: edge by edge, each finish at its step (the plain order)
            for s in range(s0 + 1, last + 1):
                self._run_edges(self._edge_requests(s), s)
                if s == f:
                    done = self._finish_step(f, step_end_times[f - s0 - 1], finished)
                    segments.append((f - start, batch, kv.usage()))
                    batch -= done
                    start = f
                    f = self._next_finish() if self._parked else last + 1
        if start < last:
            segments.append((last - start, batch, kv.usage()))
        self.step_id = last
        return finished

    def _runs_through_finishes(self) -> bool:
        """Whether a run may go on past a finish: a finish then only shrinks the batch (nobody
        waits for the blocks it frees, and the caller asked for it, see ``through_finishes``)."""
        return self.through_finishes and not self.waiting

    def _finish_step(self, f: int, now: float, finished: list[Request]) -> int:
        """Finish and free the parked requests whose last step is ``f`` (ending at ``now``); how many."""
        self.step_id = f  # their deferred registrations catch up through f
        done = self._finish_parked(f, now)
        if done:
            self._finish(done)
            finished.extend(done)
        return len(done)

    def decode_segments(self) -> Iterator[tuple[int, int, int, int]]:
        """The next fast-forward run, as segments of steps with one batch: ``(steps, batch, sum
        of context lengths, longest context)``, the shape of each segment's first step.

        The first segment is ``decode_horizon()`` steps of ``decode_shape()``. With
        ``_runs_through_finishes`` the run goes on past each finish with the batch that is
        left, one segment per finish step (so a caller costs each segment as the separate runs
        it replaces), for as long as the KV pool surely holds what the whole run takes (frees
        not counted: the next run, planned after this one is applied, counts them). The
        caller takes segments until it has enough (the next arrival); each is computed lazily.
        """
        k = self.decode_horizon()
        if not k:
            return
        n, ctx, longest = self.decode_shape()
        yield k, n, ctx, longest
        f = self.step_id + k
        if not self._runs_through_finishes() or f != self._next_finish():
            return
        bs = self.kv.block_size
        free = self.kv.num_free_blocks - n * -(-k // bs)  # each request takes at most one block per bs steps
        parked = self._parked
        finish_at = self._finish_at
        offset_sum = self._offset_sum
        offsets = self._offsets
        top = 0  # the longest context first
        for g in self._finish_steps:
            if g <= f or g not in finish_at:
                continue  # f itself, a stale or repeated key
            for r in finish_at[f]:  # the batch after step f
                offset_sum -= parked[r].c0 - parked[r].p
            n -= len(finish_at[f])
            while True:  # the longest context among those left
                neg, _, r = offsets[top]
                if parked[r].finish > f:
                    break
                top += 1
            k = g - f
            free -= n * -(-k // bs)
            if free < 0:
                return
            yield k, n, offset_sum + n * (f + 1) + n, f + 2 - neg
            f = g

