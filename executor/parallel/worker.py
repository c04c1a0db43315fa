"""Rank 0's tensor-parallel backend and the loop every other rank runs.

Rank 0 runs the core (``EngineCore`` + scheduler) as in a single-GPU run; its backend,
``TPDriverBackend``, broadcasts each ``SchedulerOutput`` over the gloo control group before
running the step on its own shard. Ranks 1.. sit in ``serve_worker``: they build the same
``RealBackend`` (their shard) when told to, then execute every broadcast step. Each step is
the same sequence of collectives on every rank (two all-reduces a layer, one for the embedding,
one all-gather of the sampling rows' logits), so the ranks stay in lock-step; only rank 0
samples, and the next step's ``SchedulerOutput`` carries the sampled tokens to everyone.

Messages (pickled, ``TPGroup.broadcast_object``)::

    ("init", generation, model_dir, backend_kwargs)   build a fresh runner (drops the old one)
    ("step", generation, scheduler_output, gone_ids)  execute one step
    ("close", generation)                             drop the runner
    ("stop",)                                         leave the loop

Workers have no scheduler: their runner's request table holds a stub per live request
(added for ``new_req_ids``, dropped for ``finished_req_ids`` and ``gone_ids``). ``gone_ids``
lists requests that ended while the engine skipped an empty step (their ``finished_req_ids``
never reached a backend); rank 0 finds them when the step ids jump.
"""
from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import torch

from core.config import SchedulerConfig
from core.request import RequestStatus
from core.sampling_params import SamplingParams
from core.scheduler_output import SchedulerOutput, StepResult
from executor.backend import RealBackend
from executor.parallel.state import TPGroup

_generations = itertools.count(1)


class _StubRequest:
    """What a worker's runner reads from a request: sampling params (unused: rank 0 samples)
    and a live status, so the runner's row sweep keeps it."""

    __slots__ = ()
    sampling_params = SamplingParams(temperature=0.0)
    status = RequestStatus.RUNNING
    is_finished = False


_STUB = _StubRequest()


def _worker_device(device: Any) -> Any:
    """Every rank uses its own ``cuda:LOCAL_RANK`` (the current device): drop an explicit index."""
    if device is None:
        return None
    device = torch.device(device)
    return torch.device("cuda") if device.type == "cuda" else device


class TPDriverBackend(RealBackend):
    """``RealBackend`` on rank 0 of a tensor-parallel group: broadcast, then execute."""

    def __init__(self, backend: RealBackend, tp: TPGroup, generation: int) -> None:
        super().__init__(backend.runner, backend.loaded, backend.enable_prefix_caching)
        self.tp = tp
        self.generation = generation
        self._known: set[str] = set()  # requests the workers hold a stub for
        self._last_step: int | None = None
        self.closed = False

    def execute(self, scheduler_output: SchedulerOutput) -> StepResult:
        if self.closed:
            raise RuntimeError("this tensor-parallel backend was closed")
        out = scheduler_output
        known = self._known
        gone: list[str] = []
        if self._last_step is not None and out.step_id != self._last_step + 1:
            # Empty steps were skipped: requests may have ended without a backend hearing of it.
            requests = self.runner.requests
            gone = [rid for rid in known if rid not in requests]
            known.difference_update(gone)
        self._last_step = out.step_id
        known.difference_update(out.finished_req_ids)
        known.update(out.new_req_ids)
        self.tp.broadcast_object(("step", self.generation, out, gone))
        return self.runner.execute(out)

    def close(self) -> None:
        """Tell the workers to drop their shard (the group stays up for the next engine)."""
        if not self.closed:
            self.closed = True
            self.tp.broadcast_object(("close", self.generation))

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "tensor_parallel_size": self.tp.world_size}


def make_tp_backend(model: str | Path, scheduler_config: SchedulerConfig | None, tp: TPGroup,
                    **backend_kwargs: Any) -> TPDriverBackend:
    """On rank 0: have every rank load its shard of ``model`` (a directory) with the same
    arguments (``RealBackend.from_pretrained``'s), and return rank 0's backend.

    The KV pool is the smallest any rank can hold (the runner agrees on it with a MIN over the
    group), so the core's block ids are valid on every shard. One engine at a time: building a
    new one replaces the workers' runner."""
    if not tp.is_driver:
        raise RuntimeError(f"rank {tp.rank} is a tensor-parallel worker: only rank 0 builds engines")
    if not isinstance(model, (str, Path)):
        raise TypeError("tensor parallelism needs a model directory (every rank loads its own shard), "
                         f"got {type(model).__name__}")
    sched = scheduler_config or SchedulerConfig()
    if "device" in backend_kwargs:
        backend_kwargs["device"] = _worker_device(backend_kwargs["device"])
    generation = next(_generations)
    tp.broadcast_object(("init", generation, str(model), {"scheduler_config": sched, **backend_kwargs}))
    backend = RealBackend.from_pretrained(model, scheduler_config=sched, tp=tp, **backend_kwargs)
    return TPDriverBackend(backend, tp, generation)


def serve_worker(tp: TPGroup) -> None:
    """The loop of ranks 1..: execute what rank 0 broadcasts until it says stop."""
    if tp.is_driver:
        raise RuntimeError("serve_worker runs on ranks other than 0")
    backend: RealBackend | None = None
    generation = None
    table: dict[str, _StubRequest] = {}
    while True:
        msg = tp.broadcast_object()
        kind = msg[0]
        if kind == "step":
            _, gen, out, gone = msg
            if backend is None or gen != generation:
                raise RuntimeError(f"rank {tp.rank}: step for engine {gen}, but this worker holds {generation}")
            for rid in gone:
                table.pop(rid, None)
            for rid in out.finished_req_ids:
                table.pop(rid, None)
            for rid in out.new_req_ids:
                table[rid] = _STUB
            backend.execute(out)
        elif kind == "init":
            _, gen, model_dir, kwargs = msg
            backend = None
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            table = {}
            backend = RealBackend.from_pretrained(model_dir, tp=tp, **kwargs)
            backend.bind(table)  # type: ignore[arg-type]
            generation = gen
        elif kind == "close":
            if msg[1] == generation:
                backend = None
                generation = None
                table = {}
        elif kind == "stop":
            return
        else:
            raise RuntimeError(f"rank {tp.rank}: unknown message {kind!r}")


def stop_workers(tp: TPGroup) -> None:
    """Rank 0: release the workers from ``serve_worker``."""
    if tp.world_size > 1 and tp.is_driver:
        tp.broadcast_object(("stop",))
