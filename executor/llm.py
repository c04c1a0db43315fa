"""Offline inference: ``LLM(model_dir).generate(prompts, sampling_params)``.

The same core as the simulator: ``generate`` adds one ``core.Request`` per prompt to an
``EngineCore`` and steps it until every request is done, passing the wall-clock time since
the ``LLM`` was built as the step's ``now``; a ``RealBackend`` runs each step on the model.

    from executor import LLM
    from core.sampling_params import SamplingParams
    llm = LLM("/models/Qwen3-0.6B")
    outs = llm.generate([[1, 2, 3], "Hello"], SamplingParams(temperature=0, max_tokens=32))
"""
from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from core.config import SchedulerConfig
from core.async_engine import AsyncEngineCore
from core.engine import EngineCore
from core.request import Request, RequestStatus
from core.sampling_params import SamplingParams
from executor.backend import RealBackend, resolve_device
from executor.loader import load_config, load_model

#: ``max_model_len`` when none is given: the model's ``max_position_embeddings``, capped here.
DEFAULT_MAX_MODEL_LEN_CAP = 8192

_FINISH_REASONS = {
    RequestStatus.FINISHED_LENGTH: "length",
    RequestStatus.FINISHED_STOPPED: "stop",
    RequestStatus.FINISHED_ABORTED: "abort",
}


@dataclass
class RequestMetrics:
    """Times in seconds on the LLM's clock (wall time since it was built)."""

    arrival_time: float
    first_scheduled_time: float | None
    first_token_time: float | None
    finish_time: float | None
    num_prompt_tokens: int
    num_output_tokens: int
    num_cached_tokens: int
    num_preemptions: int

    @property
    def ttft(self) -> float | None:
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time

    @property
    def e2e_latency(self) -> float | None:
        return None if self.finish_time is None else self.finish_time - self.arrival_time


@dataclass
class GenerationOutput:
    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str | None
    finish_reason: str  # "length" (max_tokens / max_model_len), "stop" (EOS or a stop token), "abort"
    metrics: RequestMetrics


class LLM:
    """An offline engine over one model directory (Hugging Face layout).

    Arguments follow vLLM's names. ``max_model_len`` defaults to the model's
    ``max_position_embeddings`` capped at ``DEFAULT_MAX_MODEL_LEN_CAP``. On a GPU the KV
    pool takes ``gpu_memory_utilization`` of the device memory minus the profiled peak of a
    ``max_num_batched_tokens`` step, unless ``num_gpu_blocks`` fixes it; on the CPU a fixed
    default is used. ``enforce_eager`` disables CUDA graphs. Scheduling options
    (``policy``, ``batching``, ``preemption_mode``, ``enable_chunked_prefill``,
    ``long_prefill_token_threshold``, ``watermark``) go to the core's ``SchedulerConfig``.
    ``swap_space`` (GiB) or ``num_cpu_blocks`` size the host pool for swap preemption;
    ``tokenizer`` overrides the directory's; other keywords go to ``ModelRunner``.
    ``async_scheduling`` (default: on, except under tensor parallelism) schedules each step
    while the device runs the previous one (``core.async_engine``); outputs are identical.
    ``kv_cache_dtype="fp8"`` stores K/V as float8 e4m3 (unit scale, as vLLM without
    calibrated scales): twice the KV blocks and half the attention traffic, at the cost of
    3-bit mantissas in the cached keys and values.
    """

    def __init__(self, model: str | Path, dtype: str | torch.dtype | None = None,
                 device: str | torch.device | None = None, max_num_seqs: int = 256,
                 max_num_batched_tokens: int = 16384, max_model_len: int | None = None, block_size: int = 16,
                 gpu_memory_utilization: float = 0.9, num_gpu_blocks: int | None = None,
                 enforce_eager: bool = False, enable_prefix_caching: bool = True,
                 enable_chunked_prefill: bool = True, policy: str = "fcfs", batching: str = "continuous",
                 preemption_mode: str = "recompute", long_prefill_token_threshold: int = 0,
                 watermark: float = 0.01, swap_space: float | None = None, num_cpu_blocks: int | None = None,
                 cuda_graph_sizes: list[int] | None = None, seed: int | None = 0,
                 tokenizer: Any | None = None, tensor_parallel_size: int | None = None,
                 async_scheduling: bool | None = None, kv_cache_dtype: str = "auto",
                 **runner_options: Any) -> None:
        self.device = resolve_device(device)
        config = load_config(model, dtype)  # fails early, naming the path, if it is not a model
        if max_model_len is None:
            max_model_len = min(config.max_position_embeddings, DEFAULT_MAX_MODEL_LEN_CAP)
        elif max_model_len > config.max_position_embeddings:
            raise ValueError(f"max_model_len={max_model_len} exceeds the model's max_position_embeddings="
                             f"{config.max_position_embeddings}")
        self.scheduler_config = SchedulerConfig(
            max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
            max_model_len=max_model_len, enable_chunked_prefill=enable_chunked_prefill,
            long_prefill_token_threshold=long_prefill_token_threshold, policy=policy, batching=batching,
            preemption_mode=preemption_mode, watermark=watermark)
        backend_kwargs = dict(
            block_size=block_size, gpu_memory_utilization=gpu_memory_utilization, num_gpu_blocks=num_gpu_blocks,
            num_cpu_blocks=num_cpu_blocks, swap_space=swap_space, enforce_eager=enforce_eager,
            cuda_graph_sizes=cuda_graph_sizes, enable_prefix_caching=enable_prefix_caching, seed=seed,
            kv_cache_dtype=kv_cache_dtype, **runner_options)
        from executor.parallel.state import resolve_tp_group

        tp = resolve_tp_group(tensor_parallel_size)
        if tp is None:
            loaded = load_model(model, dtype=dtype, device=self.device)
            self.backend = RealBackend.from_pretrained(loaded, scheduler_config=self.scheduler_config,
                                                       **backend_kwargs)
        else:  # tensor parallel: every rank loads its shard (executor.parallel)
            from executor.parallel.worker import make_tp_backend

            self.backend = make_tp_backend(model, self.scheduler_config, tp, dtype=dtype, device=self.device,
                                           **backend_kwargs)
            loaded = self.backend.loaded
        # The checkpoint's config (under TP ``loaded.config`` is the rank's shard view).
        self.model_config = loaded.config if tp is None else loaded.model.config
        self.tokenizer = tokenizer if tokenizer is not None else loaded.tokenizer
        cache = self.backend.cache_config
        if cache.num_gpu_blocks * cache.block_size < max_model_len:
            raise ValueError(
                f"max_model_len={max_model_len} is larger than the {cache.num_gpu_blocks * cache.block_size} "
                f"tokens the KV cache can hold ({cache.num_gpu_blocks} blocks of {cache.block_size}); raise "
                f"gpu_memory_utilization or num_gpu_blocks, or lower max_model_len")
        if async_scheduling is None:
            async_scheduling = tp is None
        elif async_scheduling and tp is not None:
            raise ValueError("async_scheduling is not supported with tensor parallelism")
        self.async_scheduling = async_scheduling
        if async_scheduling:
            self.engine: EngineCore = AsyncEngineCore(self.scheduler_config, cache, self.backend,
                                                      eos_token_id=self.backend.eos_token_id, clock=self.clock)
        else:
            self.engine = EngineCore(self.scheduler_config, cache, self.backend,
                                     eos_token_id=self.backend.eos_token_id)
        self.backend.bind(self.engine.scheduler.requests)
        self.runner = self.backend.runner
        self._t0 = time.perf_counter()
        self._next_id = 0

    def clock(self) -> float:
        """Seconds since this LLM was built (the engine's ``now``)."""
        return time.perf_counter() - self._t0

    # --- input normalisation --------------------------------------------------------------
    def _prompt_ids(self, prompts: Any) -> list[list[int]]:
        if isinstance(prompts, str):
            prompts = [prompts]
        elif isinstance(prompts, Sequence) and prompts and isinstance(prompts[0], int):
            prompts = [prompts]  # one prompt of token ids
        elif hasattr(prompts, "tolist") and not isinstance(prompts, (list, tuple)):
            prompts = prompts.tolist()
        if not isinstance(prompts, Sequence) or len(prompts) == 0:
            raise ValueError("generate() needs a prompt, a list of prompts (strings or token-id lists)")
        vocab = self.model_config.vocab_size
        result = []
        for i, p in enumerate(prompts):
            if isinstance(p, str):
                if self.tokenizer is None:
                    raise ValueError(f"prompt {i} is a string but the model directory has no tokenizer; "
                                     "pass token ids (a list of ints) instead")
                ids = list(self.tokenizer.encode(p))
            else:
                if hasattr(p, "tolist"):
                    p = p.tolist()
                try:
                    ids = [int(t) for t in p]
                except (TypeError, ValueError):
                    raise ValueError(f"prompt {i} must be a string or a list of token ids, got {type(p).__name__}") \
                        from None
            if not ids:
                raise ValueError(f"prompt {i} is empty")
            lo, hi = min(ids), max(ids)
            if lo < 0 or hi >= vocab:
                raise ValueError(f"prompt {i} has token id {lo if lo < 0 else hi} outside the vocabulary "
                                 f"[0, {vocab})")
            result.append(ids)
        return result

    def _sampling_list(self, sampling_params: SamplingParams | Sequence[SamplingParams] | None,
                       n: int) -> list[SamplingParams]:
        if sampling_params is None:
            params = [SamplingParams()] * n
        elif isinstance(sampling_params, SamplingParams):
            params = [sampling_params] * n
        else:
            params = list(sampling_params)
            if len(params) != n:
                raise ValueError(f"got {len(params)} sampling params for {n} prompts")
            for p in params:
                if not isinstance(p, SamplingParams):
                    raise ValueError(f"sampling_params must be SamplingParams, got {type(p).__name__}")
        extra = self.backend.extra_eos_token_ids
        if extra:
            params = [p if p.ignore_eos else dataclasses.replace(
                p, stop_token_ids=tuple(p.stop_token_ids) + tuple(t for t in extra if t not in p.stop_token_ids))
                for p in params]
        return params

    # --- the loop ------------------------------------------------------------------------
    def generate(self, prompts: Any, sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[GenerationOutput]:
        """Generate for every prompt; outputs come back in prompt order."""
        prompt_ids = self._prompt_ids(prompts)
        params = self._sampling_list(sampling_params, len(prompt_ids))
        engine = self.engine
        requests: list[Request] = []
        try:
            now = self.clock()
            for ids, sp in zip(prompt_ids, params):
                req = Request(str(self._next_id), ids, sp, arrival_time=now)
                self._next_id += 1
                try:
                    engine.add_request(req)
                except ValueError as e:
                    raise ValueError(self._explain(str(e))) from None
                requests.append(req)
            self._run(requests, use_tqdm)
        except BaseException:
            if isinstance(engine, AsyncEngineCore):
                with contextlib.suppress(Exception):
                    engine.drain()
            now = self.clock()
            for req in requests:  # leave the engine clean for the next call
                if not req.is_finished:
                    engine.abort_request(req.request_id, now)
            raise
        return [self._output(r) for r in requests]

    def _run(self, requests: list[Request], use_tqdm: bool) -> None:
        engine = self.engine
        pbar = None
        if use_tqdm:
            from tqdm.auto import tqdm

            pbar = tqdm(total=len(requests), desc="Generating", unit="req", dynamic_ncols=True)
        out_tokens = 0
        t_start = time.perf_counter()
        try:
            while engine.has_unfinished():
                step = engine.step(self.clock())
                if pbar is not None and step.result is not None:
                    out_tokens += sum(len(t) for t in step.result.sampled_token_ids)
                    if step.finished:
                        pbar.update(len(step.finished))
                    elapsed = time.perf_counter() - t_start
                    if elapsed > 0:
                        pbar.set_postfix_str(f"{out_tokens / elapsed:,.0f} out tok/s", refresh=False)
        finally:
            if pbar is not None:
                pbar.close()

    def _explain(self, message: str) -> str:
        if "KV blocks" in message:
            c = self.backend.cache_config
            return (f"{message}. The KV cache holds {c.num_gpu_blocks} blocks of {c.block_size} tokens; raise "
                    f"gpu_memory_utilization or num_gpu_blocks, or lower max_tokens / max_model_len")
        return message

    def _output(self, req: Request) -> GenerationOutput:
        text = None
        if self.tokenizer is not None:
            text = self.tokenizer.decode(req.output_token_ids, skip_special_tokens=True)
        metrics = RequestMetrics(req.arrival_time, req.first_scheduled_time, req.first_token_time,
                                 req.finish_time, req.num_prompt_tokens, req.num_output_tokens,
                                 req.num_cached_tokens, req.num_preemptions)
        return GenerationOutput(req.request_id, list(req.prompt_token_ids), list(req.output_token_ids), text,
                                _FINISH_REASONS.get(req.status, req.status.name.lower()), metrics)
