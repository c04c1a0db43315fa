"""The scheduler: one token-budget loop per step, running requests first, then waiting.

There are no prefill and decode phases. Each request computes ``num_tokens -
num_computed_tokens`` tokens when it can; the step's token budget, the chunking switch
and ``long_prefill_token_threshold`` cap that number, so a chunked prefill, a whole
prompt and a decode token are the same case. When the KV cache cannot grow a running
request, the queue policy names a victim to preempt (recompute: drop its blocks; swap:
copy them to host memory). New requests are admitted only in steps without preemption.
"""
from __future__ import annotations

import bisect
from collections.abc import Callable
from itertools import filterfalse

from core.config import CacheConfig, SchedulerConfig
from core.kv_cache_manager import KVCacheManager
from core.policies import make_batching_policy, make_queue_policy
from core.request import Request, RequestStatus
from core.scheduler_output import SchedulerOutput, StepResult

# Why admission stopped in the last schedule(); the first three persist over decode-only
# steps (free blocks only shrink, the batch only ages), which is what makes fast-forward safe.
_BLOCKED_KV, _BLOCKED_BUDGET, _BLOCKED_POLICY, _BLOCKED_SEQS, _BLOCKED_NONE = range(5)
# Statuses read per request (an enum member lookup on the class costs ~60 ns).
_WAITING, _RUNNING, _SWAPPED = RequestStatus.WAITING, RequestStatus.RUNNING, RequestStatus.SWAPPED


def largest_fitting(k: int, need: Callable[[int], int], limit: int) -> int:
    """Largest ``k' <= k`` with ``need(k') <= limit``, for a non-decreasing ``need`` with
    ``need(0) <= limit``: how many decode steps the free KV blocks can carry."""
    if need(k) <= limit:
        return k
    lo, hi = 0, k  # need(lo) fits, need(hi) does not
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if need(mid) <= limit:
            lo = mid
        else:
            hi = mid
    return lo


class Scheduler:
    #: Whether ``SchedulerOutput.new_token_ids`` is filled. Copying every prompt chunk's ids
    #: is wasted work for a backend that never reads them (the simulator's).
    emits_token_ids = True

    def __init__(self, scheduler_config: SchedulerConfig, cache_config: CacheConfig,
                 eos_token_id: int | None = None) -> None:
        self.config = scheduler_config
        self.cache_config = cache_config
        self.eos_token_id = eos_token_id
        self.policy = make_queue_policy(scheduler_config.policy)
        self.batching = make_batching_policy(scheduler_config.batching)
        self.chunking = scheduler_config.enable_chunked_prefill and self.batching.allow_chunking
        bs = cache_config.block_size
        if not self.chunking and scheduler_config.max_num_batched_tokens < bs:
            raise ValueError(f"SchedulerConfig.max_num_batched_tokens ({scheduler_config.max_num_batched_tokens}) "
                             f"must be >= block_size ({bs}) when chunked prefill is off")
        if scheduler_config.preemption_mode == "swap" and cache_config.num_cpu_blocks == 0:
            raise ValueError("SchedulerConfig.preemption_mode='swap' needs CacheConfig.num_cpu_blocks > 0")
        self.kv = KVCacheManager(bs, cache_config.num_gpu_blocks, cache_config.num_cpu_blocks,
                                 cache_config.enable_prefix_caching)
        self.watermark_blocks = int(scheduler_config.watermark * cache_config.num_gpu_blocks)
        self.requests: dict[str, Request] = {}
        self.waiting: list[Request] = []  # sorted by policy key
        self.running: list[Request] = []  # in admission order
        self.finished_req_ids: list[str] = []  # since the last schedule()
        self.step_id = 0
        self.num_preemptions = 0
        self._blocked = _BLOCKED_NONE
        self._scheduled_reqs: list[Request] = []  # requests of the last schedule(), for update
        self._blocked_need = 0  # whole-prompt tokens the blocked head needs (no chunking)
        self._swap = scheduler_config.preemption_mode == "swap"
        # The last apply_decode_steps run, one entry per stretch of it with one batch (a lazy
        # scheduler's run may go on past finishes): (steps, batch, KV usage at its end).
        self.run_segments: list[tuple[int, int, float]] = []

    # --- requests in and out -----------------------------------------------------------
    def add_request(self, request: Request) -> None:
        """Validate and queue a request; raises ValueError (and changes nothing) on bad input."""
        cfg = self.config
        rid = request.request_id
        if rid in self.requests:
            raise ValueError(f"request_id {rid!r} is already live")
        if request.status is not _WAITING or request.num_computed_tokens:
            raise ValueError(f"request {rid!r} is not a fresh request (status {request.status.name})")
        max_tokens = request.max_tokens
        if max_tokens >= cfg.max_model_len:
            raise ValueError(f"request {rid!r}: max_tokens={max_tokens} leaves no room for a prompt "
                             f"within max_model_len={cfg.max_model_len}")
        prompt = request.prompt_token_ids  # truncated locally: a rejected request stays untouched
        total = len(prompt) + max_tokens
        if total > cfg.max_model_len:
            if not cfg.truncate_prompt:
                raise ValueError(f"request {rid!r}: prompt ({len(prompt)} tokens) + max_tokens "
                                 f"({max_tokens}) = {total} exceeds max_model_len={cfg.max_model_len}")
            keep = cfg.max_model_len - max_tokens  # keep the prompt's tail, as vLLM's truncation does
            prompt = prompt[-keep:]
            total = cfg.max_model_len
        if not self.chunking and len(prompt) > cfg.max_num_batched_tokens:
            raise ValueError(f"request {rid!r}: prompt of {len(prompt)} tokens exceeds "
                             f"max_num_batched_tokens={cfg.max_num_batched_tokens} with chunked prefill off")
        reserve = max(total, self.batching.reserve_tokens(request, cfg.max_model_len))
        need = self.kv.num_blocks_for(reserve)
        usable = self.kv.num_gpu_blocks - self.watermark_blocks
        if need > usable:
            raise ValueError(f"request {rid!r}: needs {need} KV blocks ({reserve} tokens) but the pool can "
                             f"ever give {usable} ({self.kv.num_gpu_blocks} blocks minus a watermark of "
                             f"{self.watermark_blocks}); it could never run")
        if prompt is not request.prompt_token_ids:
            request.prompt_token_ids = prompt
            request.all_token_ids = list(prompt)
        sp = request.sampling_params
        stops = set(sp.stop_token_ids)
        if self.eos_token_id is not None and not sp.ignore_eos:
            stops.add(self.eos_token_id)
        request.stop_set = frozenset(stops) if stops else None
        request.max_num_tokens = min(len(prompt) + max_tokens, cfg.max_model_len)
        self.requests[rid] = request
        self._enqueue(request)
        self._blocked = _BLOCKED_NONE  # the newcomer has not been tried yet: no fast-forward

    def _enqueue(self, request: Request) -> None:
        bisect.insort(self.waiting, request, key=self.policy.key)

    def abort_request(self, request_id: str) -> Request | None:
        """Abort a live request; returns it, or None if it is unknown or already finished."""
        request = self.requests.pop(request_id, None)
        if request is None:
            return None
        if request.status == RequestStatus.RUNNING:
            self.running.remove(request)
        else:
            self.waiting.remove(request)
            if request.swap_out_blocks:
                self.kv.host_pool.free(request.swap_out_blocks)
                request.swap_out_blocks = []
        self.kv.free(request)
        request.status = RequestStatus.FINISHED_ABORTED
        self.finished_req_ids.append(request_id)
        return request

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    # --- one step ----------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        cfg = self.config
        kv = self.kv
        policy = self.policy
        self.step_id += 1
        out = SchedulerOutput(self.step_id, block_size=self.cache_config.block_size,
                              finished_req_ids=self.finished_req_ids)
        self.finished_req_ids = []
        budget = cfg.max_num_batched_tokens
        threshold = cfg.long_prefill_token_threshold
        # Scheduled requests and their new-token counts, in schedule order.
        reqs: list[Request] = []
        nums: list[int] = []
        running = self.running

        # 1. Running requests, in admission order.
        bs = kv.block_size
        mask = bs - 1
        last_slot = bs - 1
        i = 0
        while i < len(running) and budget > 0:
            req = running[i]
            c = req.num_computed_tokens
            num_new = len(req.all_token_ids) - c
            if num_new == 1 and c and (0 < (c & mask) < last_slot or kv.append_decode_slot(req)):
                # Decode fast path: inside a partly filled block the KV cache manager has
                # nothing to do; at a block edge it takes or registers one block.
                reqs.append(req)
                nums.append(1)
                budget -= 1
                i += 1
                continue
            if num_new > budget:
                num_new = budget
            if threshold and num_new > threshold:
                num_new = threshold
            while kv.allocate_slots(req, num_new) is None:
                v = policy.victim_index(running)
                victim = running[v]
                for j, r in enumerate(reqs):
                    if r is victim:  # already scheduled this step: refund its tokens
                        budget += nums.pop(j)
                        del reqs[j]
                        break
                self._preempt(victim, v, out)
                if v < i:
                    i -= 1
                if victim is req:
                    break
            else:
                reqs.append(req)
                nums.append(num_new)
                budget -= num_new
                i += 1

        # 2. Waiting requests, only if nobody was preempted this step.
        self._blocked = _BLOCKED_NONE
        if self.waiting and not out.preempted_req_ids:
            self._admit(out, reqs, nums, budget)

        self._finalize(out, reqs, nums)
        return out

    def _finalize(self, out: SchedulerOutput, reqs: list[Request], nums: list[int]) -> None:
        """Fill the plain output object from the scheduled requests and their token counts."""
        block_ids = self.kv.req_to_block_ids
        self._scheduled_reqs = reqs
        out.req_ids = [r.request_id for r in reqs]
        out.num_new_tokens = nums
        computed = out.num_computed_tokens = [r.num_computed_tokens for r in reqs]
        if self.emits_token_ids:
            out.new_token_ids = [r.all_token_ids[c:c + n] for r, c, n in zip(reqs, computed, nums)]
        out.block_tables = [block_ids[rid] for rid in out.req_ids]
        out.samples = [c + n >= len(r.all_token_ids) for r, c, n in zip(reqs, computed, nums)]
        out.total_num_scheduled_tokens = sum(nums)

    def _admit(self, out: SchedulerOutput, reqs: list[Request], nums: list[int], budget: int) -> None:
        cfg = self.config
        kv = self.kv
        policy = self.policy
        waiting = self.waiting
        running = self.running
        if policy.dynamic:
            policy.refresh(kv)
            waiting.sort(key=policy.key)
        threshold = cfg.long_prefill_token_threshold
        wm = self.watermark_blocks
        admitted = 0
        while waiting:
            if budget <= 0:
                self._blocked = _BLOCKED_BUDGET
                self._blocked_need = 0  # the head was not sized: decode_horizon must not assume it stays blocked
                return
            if len(running) >= cfg.max_num_seqs:
                self._blocked = _BLOCKED_SEQS
                return
            if not self.batching.can_admit(len(running), admitted):
                self._blocked = _BLOCKED_POLICY
                return
            req = waiting[0]
            if req.status is _SWAPPED:
                num_new = min(req.num_tokens - req.num_computed_tokens, budget)
                if threshold and num_new > threshold:  # swapped out in the middle of a long prefill
                    num_new = threshold
                extra = kv.num_blocks_for(req.num_computed_tokens + num_new) - len(req.swap_out_blocks)
                if extra > kv.num_free_blocks - len(req.swap_out_blocks) - wm:
                    self._blocked = _BLOCKED_KV
                    return
                out.blocks_to_swap_in.extend(kv.swap_in(req))
                kv.allocate_slots(req, num_new)
            else:
                computed, num_hit = kv.get_computed_blocks(req)
                num_new = req.num_tokens - num_hit
                # Without chunking a prompt runs whole; only the recomputation of a preempted
                # request that outgrew the whole budget (prompt + outputs) is chunked, else it never runs.
                if not self.chunking and budget < num_new <= cfg.max_num_batched_tokens:
                    self._blocked = _BLOCKED_BUDGET
                    self._blocked_need = num_new
                    return
                if num_new > budget:
                    num_new = budget
                if threshold and num_new > threshold:
                    num_new = threshold
                reserve = self.batching.reserve_tokens(req, cfg.max_model_len)
                if kv.allocate_slots(req, num_new, computed, reserve_tokens=reserve,
                                     watermark_blocks=wm) is None:
                    self._blocked = _BLOCKED_KV
                    return
                req.num_computed_tokens = num_hit
                kv.record_prefix_hit(req, num_hit)
                out.new_req_ids.append(req.request_id)
                out.num_cached_tokens[req.request_id] = num_hit
            waiting.pop(0)
            req.status = _RUNNING
            running.append(req)
            admitted += 1
            reqs.append(req)
            nums.append(num_new)
            budget -= num_new

    def _preempt(self, victim: Request, index: int, out: SchedulerOutput) -> None:
        del self.running[index]
        kv = self.kv
        if self._swap and kv.can_swap_out(victim):
            out.blocks_to_swap_out.extend(kv.swap_out(victim))
            victim.status = RequestStatus.SWAPPED
        else:
            kv.free(victim)
            victim.status = RequestStatus.PREEMPTED
            victim.num_computed_tokens = 0
        victim.num_preemptions += 1
        self.num_preemptions += 1
        out.preempted_req_ids.append(victim.request_id)
        self._enqueue(victim)

    # --- applying a step's result -------------------------------------------------------
    def update_from_output(self, out: SchedulerOutput, result: StepResult, now: float) -> list[Request]:
        """Advance progress, append sampled tokens (stamped ``now``), finish and free requests."""
        if out.step_id != self.step_id:
            raise RuntimeError(f"update_from_output for step {out.step_id}, but the last schedule() was step "
                               f"{self.step_id}")
        finished = self._apply_sampled(out, result, now)
        if finished:
            self._finish(finished)
        return finished

    def _apply_sampled(self, out: SchedulerOutput, result: StepResult, now: float) -> list[Request]:
        """Advance the scheduled requests and append their tokens; returns those that finished
        (status set, not yet freed)."""
        finished: list[Request] = []
        running_status = RequestStatus.RUNNING
        for req, n, tokens in zip(self._scheduled_reqs, out.num_new_tokens, result.sampled_token_ids):
            if req.status is not running_status:
                continue  # aborted or preempted after scheduling
            req.num_computed_tokens += n
            for token in tokens:
                req.output_token_ids.append(token)
                req.all_token_ids.append(token)
                req.token_times.append(now)
                if req.first_token_time is None:
                    req.first_token_time = now
                stops = req.stop_set
                if (len(req.all_token_ids) >= req.max_num_tokens or (stops is not None and token in stops)) \
                        and self._check_stop(req, token):
                    req.finish_time = now
                    finished.append(req)
                    break
        return finished

    def _check_stop(self, req: Request, token: int) -> bool:
        sp = req.sampling_params
        if token == self.eos_token_id and not sp.ignore_eos:
            req.status = RequestStatus.FINISHED_STOPPED
            req.stop_reason = token
        elif token in sp.stop_token_ids:
            req.status = RequestStatus.FINISHED_STOPPED
            req.stop_reason = token
        elif len(req.output_token_ids) >= sp.max_tokens or len(req.all_token_ids) >= self.config.max_model_len:
            req.status = RequestStatus.FINISHED_LENGTH
        else:
            return False
        return True

    def _finish(self, finished: list[Request]) -> None:
        # The finished are the only non-running requests left in ``running``; a set filter
        # in C keeps this O(batch) at C speed (a step usually finishes one or two requests).
        if len(finished) == 1:  # the usual case: one C-level scan by identity, stopping at it
            try:
                self.running.remove(finished[0])
            except ValueError:
                pass
        else:
            self.running = list(filterfalse(set(finished).__contains__, self.running))
        for req in finished:
            self.kv.free(req)
            del self.requests[req.request_id]
            self.finished_req_ids.append(req.request_id)

    # --- fast-forward over identical decode steps ---------------------------------------
    def decode_horizon(self) -> int:
        """How many upcoming steps are guaranteed to be the same pure-decode step.

        Non-zero only if every running request decodes one token, all fit the budget,
        admission is blocked for a reason that decode steps cannot lift, and the KV pool
        can grow every request for that many steps. The bound includes the step in which
        the first request reaches max_tokens. Arrivals are the caller's bound. A request
        could still stop on a sampled stop token; ``apply_decode_steps`` checks for that.
        """
        running = self.running
        if not running or self.finished_req_ids or len(running) > self.config.max_num_batched_tokens:
            return 0
        if self.waiting and not self._admission_stays_blocked():
            return 0
        k = self.config.max_model_len
        for r in running:  # hot path of the simulator: plain attribute reads only
            c = r.num_computed_tokens
            if len(r.all_token_ids) - c != 1 or c == 0:
                return 0
            left = r.sampling_params.max_tokens - len(r.output_token_ids)
            if left < k:
                k = left
        # add_request guarantees prompt + max_tokens <= max_model_len, so max_tokens bounds length too.
        if self.waiting and self._blocked in (_BLOCKED_KV, _BLOCKED_BUDGET):
            k = self._hit_growth_horizon(k)
        if k <= 0:
            return 0
        return self._kv_horizon(k)

    def _admission_stays_blocked(self) -> bool:
        """Whether the waiting queue's head stays blocked over pure-decode steps."""
        if self.policy.dynamic and self._blocked != _BLOCKED_SEQS:
            return False
        blocked = self._blocked
        if blocked == _BLOCKED_BUDGET:
            # Persists only if a pure-decode step's leftover budget is still too small.
            return not self.chunking and self._blocked_need > self.config.max_num_batched_tokens - len(self.running)
        return blocked in (_BLOCKED_KV, _BLOCKED_SEQS, _BLOCKED_POLICY)

    def _num_computed(self, request: Request) -> int:
        """A running request's progress (a subclass may advance some requests lazily)."""
        return request.num_computed_tokens

    def _hit_growth_horizon(self, k: int) -> int:
        """Largest k' <= k such that no step before k' extends the blocked head's prefix hit.

        A running request that fills a block continuing the head's cached chain (e.g. the head
        is an earlier turn's prompt + output) lengthens the head's hit, which shrinks what it
        needs and can unblock it in that very step. Only a running request whose full blocks
        so far are a prefix of the head's chain can do that, at the step that fills the block
        just past the head's hit.
        """
        kv = self.kv
        head = self.waiting[0]
        if not kv.enable_prefix_caching or head.status == RequestStatus.SWAPPED:
            return k
        bs = kv.block_size
        n = kv.get_computed_blocks(head)[1] // bs
        if n >= (len(head.all_token_ids) - 1) // bs:
            return k  # the hit cannot grow
        hashes = head.block_hashes
        for r in self.running:
            c = self._num_computed(r)
            f = c // bs
            if f > n:
                continue  # its block n is already full: registering it again changes nothing
            if f == 0:
                if r.cache_salt != head.cache_salt:
                    continue
            elif kv.block_hashes(r, f)[f - 1] != hashes[f - 1]:
                continue
            s = (n + 1) * bs - c - 1  # the step that fills its block n
            if s < k:
                k = s
        return k

    def _kv_horizon(self, k: int) -> int:
        """Largest k' <= k such that growing every running request k' tokens fits the free pool."""
        bs = self.kv.block_size
        held = self.kv.req_to_block_ids
        state = [(r.num_computed_tokens, len(held[r.request_id])) for r in self.running]
        free = self.kv.num_free_blocks

        def need(steps: int) -> int:
            return sum(max(0, -(-(c + steps) // bs) - nb) for c, nb in state)

        return largest_fitting(k, need, free)

    def apply_decode_steps(self, k: int, step_end_times: list[float],
                           token_ids: list[list[int]]) -> list[Request]:
        """Apply ``k`` pure-decode steps at once; equal to ``k`` schedule/update rounds.

        ``token_ids[i]`` holds the k tokens sampled by ``running[i]``; ``step_end_times``
        the k steps' end times. Blocks are taken in the same order as step by step, so
        block ids, evictions and later cache hits are identical.
        """
        running = self.running
        kv = self.kv
        bs = kv.block_size
        eos = self.eos_token_id
        for r, toks in zip(running, token_ids):  # validate before changing anything
            sp = r.sampling_params
            stops = set(sp.stop_token_ids)
            if eos is not None and not sp.ignore_eos:
                stops.add(eos)
            if stops and not stops.isdisjoint(toks[:-1]):
                raise RuntimeError(f"apply_decode_steps: request {r.request_id!r} sampled a stop token "
                                   "inside a fast-forwarded run; the backend must not fast-forward it")
        # (step, index, kind) in step-by-step order: kind 0 takes a new block (the step computes
        # the first position past the held blocks), kind 1 registers the block the step fills.
        # Registering in this order matters: a hash already indexed on a free block keeps that
        # entry (first writer wins) until the free block is reused, exactly as step by step.
        events = []
        caching = kv.enable_prefix_caching
        for idx, r in enumerate(running):
            c = r.num_computed_tokens
            for step in range(len(kv.req_to_block_ids[r.request_id]) * bs - c, k, bs):
                events.append((step, idx, 0))
            if caching:
                for step in range(bs - 1 - c % bs, k, bs):
                    events.append((step, idx, 1))
        for r, toks in zip(running, token_ids):
            if r.first_token_time is None:
                r.first_token_time = step_end_times[0]
            r.output_token_ids.extend(toks)
            r.all_token_ids.extend(toks)  # known before registration: hashes read these tokens
            r.token_times.extend(step_end_times)
        if events:
            events.sort()
            get = kv.block_pool.get_new_block
            held = kv.req_to_block_ids
            for step, idx, kind in events:
                r = running[idx]
                if kind:
                    kv.cache_blocks(r, r.num_computed_tokens + step + 1)
                else:
                    held[r.request_id].append(get())
        batch = len(running)
        finished = []
        for r, toks in zip(running, token_ids):
            r.num_computed_tokens += k
            if self._check_stop(r, toks[-1]):
                r.finish_time = step_end_times[-1]
                finished.append(r)
        self.step_id += k
        if finished:
            self._finish(finished)
        self.run_segments = [(k, batch, kv.usage())]
        return finished
