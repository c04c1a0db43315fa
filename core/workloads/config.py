"""A flat, validated workload spec and the builder that turns it into a ``Workload``.

``WorkloadConfig`` is a plain dataclass so a Hydra ``conf/workload/*.yaml`` group can map
onto it field for field (``WorkloadConfig.from_dict``). Defaults give the usual serving
benchmark: ShareGPT lengths, Poisson arrivals.

Determinism: every random choice draws from its own child stream of
``SeedSequence(seed)`` (arrivals, lengths, user tokens, history outputs, system prompts,
group assignment, priorities), so the same config always gives the same workload, and
changing one aspect (say ``vocab_size``) does not reshuffle the others (the arrival times).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from core.workloads._checks import check_float, check_int, check_optional_float, check_optional_int, check_range
from core.workloads.arrivals import (ArrivalProcess, ClosedLoopSpec, FixedIntervalArrivals, GammaArrivals,
                                     PoissonArrivals, TraceArrivals)
from core.workloads.lengths import EmpiricalLengths, FixedLengths, LengthDistribution, UniformLengths
from core.workloads.prompts import (HashBlockTokens, SystemPromptGroups, TokenSegments, check_vocab_size,
                                    conversation_prompts, random_token_segments, segments_len, truncate_segments)
from core.workloads.traces import (TRACE_KINDS, TraceData, read_azure_trace, read_burstgpt_trace,
                                   read_mooncake_trace, read_sharegpt_lengths, resolve_trace_path)
from core.workloads.workload import Workload, WorkloadRequest

WORKLOAD_KINDS = ("synthetic",) + TRACE_KINDS
TIMED_KINDS = ("azure_conv", "azure_code", "mooncake", "burstgpt")  # traces with arrival timestamps
ARRIVAL_KINDS = ("poisson", "gamma", "fixed", "closed_loop", "trace")
LENGTH_KINDS = ("fixed", "uniform") + TRACE_KINDS
_STREAMS = ("arrivals", "lengths", "user_tokens", "output_tokens", "system_prompts", "groups", "priorities")


@dataclass
class WorkloadConfig:
    """What to run. Fields a kind does not use are ignored, but contradictory ones are rejected.

    - ``kind``: ``synthetic`` (random prompts of ``lengths``), ``sharegpt`` (ShareGPT
      lengths, resampled), or a timed trace replayed row by row in file order
      (``azure_conv``, ``azure_code``, ``mooncake``, ``burstgpt``). ``trace_path`` picks
      the file (absolute, or relative to the traces dir); BurstGPT always needs one.
    - ``arrival``: ``poisson`` (``rate``), ``gamma`` (``rate``, ``cv``), ``fixed``
      (every 1/``rate`` s), ``trace`` (the trace's timestamps divided by ``speed``), or
      ``closed_loop`` (``num_users`` users, ``think_time_s``). None = ``trace`` for timed
      traces, else ``poisson``.
    - Cut-offs: ``num_requests`` and/or ``duration_s`` (seconds of arrivals; in a closed
      loop the driver enforces it). A trace also ends when its rows run out;
      ``num_requests`` defaults to 1000 for every kind, so set it to None to replay a
      whole trace.
    - ``lengths`` (synthetic only): ``fixed`` (``input_len``, ``output_len``),
      ``uniform`` (``input_range``, ``output_range``, inclusive) or a trace kind whose
      (input, output) rows are resampled; None = ``sharegpt``.
    - ``system_prompt_lens``: one shared system prompt per entry, prepended to the
      requests (conversations) assigned to it. ``num_turns`` > 1: multi-turn
      conversations (see ``core.workloads.prompts``); open loop interleaves them
      round-robin, a closed loop gives each conversation to one user.
    - ``num_priorities``: priorities drawn uniformly from ``0..num_priorities-1`` (lower
      = more important). ``deadline_s``: per-request deadline after arrival.
    - ``max_model_len``: when set, clip prompt + output to it by truncating the prompt's
      tail (and the output if it alone does not fit); when None, over-long requests are
      left for the scheduler to reject.
    """

    kind: str = "synthetic"
    trace_path: str | None = None
    arrival: str | None = None
    rate: float = 1.0
    cv: float = 1.0
    speed: float = 1.0
    num_users: int = 1
    think_time_s: float = 0.0
    num_requests: int | None = 1000
    duration_s: float | None = None
    lengths: str | None = None
    input_len: int = 1024
    output_len: int = 128
    input_range: tuple[int, int] = (1, 1024)
    output_range: tuple[int, int] = (1, 256)
    seed: int = 0
    vocab_size: int = 32000
    system_prompt_lens: tuple[int, ...] = ()
    num_turns: int = 1
    num_priorities: int = 1
    deadline_s: float | None = None
    max_model_len: int | None = None
    burstgpt_model: str | None = None
    burstgpt_log_type: str | None = None

    def __post_init__(self) -> None:
        # Hydra hands sequences over as ListConfig / list; store tuples so configs compare.
        self.input_range = tuple(self.input_range)
        self.output_range = tuple(self.output_range)
        self.system_prompt_lens = tuple(self.system_prompt_lens)
        self.validate()

    @classmethod
    def from_dict(cls, spec: Mapping[str, Any]) -> WorkloadConfig:
        """Build from a plain mapping (e.g. a Hydra node); unknown keys are an error, not ignored."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(str(k) for k in spec if k not in names)
        if unknown:
            raise ValueError(f"WorkloadConfig: unknown field(s) {unknown}; valid fields are {sorted(names)}")
        return cls(**{str(k): v for k, v in spec.items()})

    @property
    def arrival_kind(self) -> str:
        if self.arrival is not None:
            return self.arrival
        return "trace" if self.kind in TIMED_KINDS else "poisson"

    @property
    def lengths_kind(self) -> str | None:
        """Where synthetic lengths come from; None for timed traces (their own rows)."""
        if self.kind in TIMED_KINDS:
            return None
        return self.lengths or "sharegpt"

    def validate(self) -> None:
        """Raise ValueError naming the first bad field and its value."""
        own = "WorkloadConfig"
        for name, value, allowed in (("kind", self.kind, WORKLOAD_KINDS), ("arrival", self.arrival, ARRIVAL_KINDS),
                                     ("lengths", self.lengths, LENGTH_KINDS)):
            if value is not None and value not in allowed:
                raise ValueError(f"{own}.{name} must be one of {allowed}, got {value!r}")
        check_float(own, "rate", self.rate, positive=True)
        check_float(own, "cv", self.cv, positive=True)
        check_float(own, "speed", self.speed, positive=True)
        check_int(own, "num_users", self.num_users, 1)
        check_float(own, "think_time_s", self.think_time_s, positive=False)
        check_optional_int(own, "num_requests", self.num_requests, 1)
        check_optional_float(own, "duration_s", self.duration_s, positive=True)
        check_int(own, "input_len", self.input_len, 1)
        check_int(own, "output_len", self.output_len, 1)
        check_range(own, "input_range", self.input_range)
        check_range(own, "output_range", self.output_range)
        check_int(own, "seed", self.seed, 0)
        check_vocab_size(own, self.vocab_size)
        for g, prefix_len in enumerate(self.system_prompt_lens):
            check_int(own, f"system_prompt_lens[{g}]", prefix_len, 1)
        check_int(own, "num_turns", self.num_turns, 1)
        check_int(own, "num_priorities", self.num_priorities, 1)
        check_optional_float(own, "deadline_s", self.deadline_s, positive=True)
        check_optional_int(own, "max_model_len", self.max_model_len, 2)

        arrival, timed = self.arrival_kind, self.kind in TIMED_KINDS
        if arrival == "trace" and not timed:
            raise ValueError(f"{own}.arrival='trace' needs a timed trace kind {TIMED_KINDS}, got kind={self.kind!r}")
        if self.lengths is not None and (timed or (self.kind == "sharegpt" and self.lengths != "sharegpt")):
            raise ValueError(f"{own}.lengths={self.lengths!r} conflicts with kind={self.kind!r}, which brings its "
                             "own lengths; use kind='synthetic' to choose lengths")
        if not timed and arrival != "closed_loop" and self.num_requests is None and self.duration_s is None:
            raise ValueError(f"{own}: open-loop synthetic arrivals need num_requests or duration_s, got neither")
        if not timed and arrival == "closed_loop" and self.num_requests is None:
            raise ValueError(f"{own}.num_requests must be set for a synthetic closed loop (the requests users "
                             "draw from; duration_s is enforced by the driver), got None")
        if self.num_turns > 1 and timed:
            raise ValueError(f"{own}.num_turns={self.num_turns} is for synthetic conversations; "
                             f"kind={self.kind!r} replays independent trace rows")
        if self.system_prompt_lens and self.kind == "mooncake":
            raise ValueError(f"{own}.system_prompt_lens={self.system_prompt_lens!r} conflicts with kind='mooncake', "
                             "whose hash_ids already define the prompt sharing")
        file_source = self.kind if self.kind != "synthetic" else self.lengths_kind
        if self.trace_path is not None and file_source not in TRACE_KINDS:
            raise ValueError(f"{own}.trace_path={self.trace_path!r} is unused: kind={self.kind!r} with "
                             f"lengths={self.lengths_kind!r} reads no file")
        if (self.burstgpt_model is not None or self.burstgpt_log_type is not None) and file_source != "burstgpt":
            raise ValueError(f"{own}.burstgpt_model / burstgpt_log_type filter BurstGPT rows, "
                             f"but the data comes from {file_source!r}")


def _read(cfg: WorkloadConfig, kind: str, max_rows: int | None = None) -> TraceData:
    path = resolve_trace_path(kind, cfg.trace_path)
    if kind in ("azure_conv", "azure_code"):
        return read_azure_trace(path, max_rows)
    if kind == "mooncake":
        return read_mooncake_trace(path, max_rows)
    if kind == "sharegpt":
        return read_sharegpt_lengths(path, max_rows)
    # BurstGPT drops rows after reading, so a row limit would not bound the kept requests.
    return read_burstgpt_trace(path, model=cfg.burstgpt_model, log_type=cfg.burstgpt_log_type)


def _length_distribution(cfg: WorkloadConfig, kind: str) -> LengthDistribution:
    if kind == "fixed":
        return FixedLengths(cfg.input_len, cfg.output_len)
    if kind == "uniform":
        return UniformLengths(cfg.input_range, cfg.output_range)
    return EmpiricalLengths.from_trace(_read(cfg, kind))


def _arrival_process(cfg: WorkloadConfig) -> ArrivalProcess:
    arrival = cfg.arrival_kind
    if arrival == "poisson":
        return PoissonArrivals(cfg.rate)
    if arrival == "gamma":
        return GammaArrivals(cfg.rate, cfg.cv)
    return FixedIntervalArrivals(1.0 / cfg.rate)


def _clip(prompt: TokenSegments, max_tokens: int, max_model_len: int) -> tuple[TokenSegments, int]:
    """Fit prompt + output into ``max_model_len``, cutting the prompt's tail first (its head
    carries the shared prefixes) and the output only when it alone leaves no room."""
    n = segments_len(prompt)
    if n + max_tokens <= max_model_len:
        return prompt, max_tokens
    keep = max(1, max_model_len - max_tokens)
    return truncate_segments(prompt, keep), min(max_tokens, max_model_len - keep)


def _schedule(cfg: WorkloadConfig, trace: TraceData | None,
              rng: np.random.Generator) -> tuple[int, np.ndarray | None, ClosedLoopSpec | None]:
    """How many requests there are, their arrival times (None in a closed loop), the loop spec."""
    arrival = cfg.arrival_kind
    if arrival == "closed_loop":
        n = cfg.num_requests if trace is None else min(cfg.num_requests or len(trace), len(trace))
        return n, None, ClosedLoopSpec(cfg.num_users, cfg.think_time_s)
    if arrival == "trace":
        times = TraceArrivals(trace.timestamps_s, cfg.speed).arrival_times(None, cfg.num_requests, cfg.duration_s)
    else:
        times = _arrival_process(cfg).arrival_times(rng, cfg.num_requests, cfg.duration_s)
        if trace is not None:
            times = times[: len(trace)]  # the trace ran out of rows
    return len(times), times, None


def _conversations(n: int, turns: int, closed_loop: bool) -> tuple[np.ndarray, np.ndarray, list[range]]:
    """Conversation and turn of each request, and each conversation's requests in turn order.

    Open loop interleaves conversations round-robin (request j is turn j // C of
    conversation j % C) so a conversation's turns spread over the run; a closed loop
    numbers them contiguously so each user's queue holds whole conversations in turn order.
    """
    num_convs = -(-n // turns)
    idx = np.arange(n)
    if closed_loop:
        return idx // turns, idx % turns, [range(c * turns, min(n, (c + 1) * turns)) for c in range(num_convs)]
    return idx % num_convs, idx // num_convs, [range(c, n, num_convs) for c in range(num_convs)]


def _synthetic_prompts(cfg: WorkloadConfig, rng: dict[str, np.random.Generator], input_lens: np.ndarray,
                       output_lens: np.ndarray, conv_of: np.ndarray, turn_of: np.ndarray,
                       members: list[range]) -> list[TokenSegments]:
    """Random user tokens behind an optional system prompt, chained into conversations."""
    n = len(input_lens)
    prefix_of_conv: list[TokenSegments] = [()] * len(members)
    if cfg.system_prompt_lens:
        groups = SystemPromptGroups(cfg.system_prompt_lens)
        group_prefixes = [(p,) for p in groups.prefixes(rng["system_prompts"], cfg.vocab_size)]
        prefix_of_conv = [group_prefixes[g] for g in groups.assign(rng["groups"], len(members)).tolist()]
    user_parts = random_token_segments(rng["user_tokens"], input_lens, cfg.vocab_size)
    if cfg.num_turns == 1:
        return [prefix_of_conv[j] + (user_parts[j],) for j in range(n)]
    # History outputs are drawn only for turns that have a successor in their conversation.
    last_turn = np.array([len(m) - 1 for m in members])[conv_of]
    history_lens = np.where(turn_of < last_turn, output_lens, 0)
    output_parts = random_token_segments(rng["output_tokens"], history_lens, cfg.vocab_size)
    prompts: list[TokenSegments] = [()] * n
    for c, js in enumerate(members):
        turn_prompts = conversation_prompts(prefix_of_conv[c], [user_parts[j] for j in js],
                                            [output_parts[j] for j in js])
        for j, prompt in zip(js, turn_prompts):
            prompts[j] = prompt
    return prompts


def build_workload(config: WorkloadConfig | Mapping[str, Any]) -> Workload:
    """Generate the workload a config describes (deterministic for its seed)."""
    cfg = config if isinstance(config, WorkloadConfig) else WorkloadConfig.from_dict(config)
    cfg.validate()  # again: a dataclass's fields may have been changed since construction
    rng = {name: np.random.default_rng(s)
           for name, s in zip(_STREAMS, np.random.SeedSequence(cfg.seed).spawn(len(_STREAMS)))}
    # A timed trace is consumed in file order, so num_requests bounds the rows needed.
    trace = _read(cfg, cfg.kind, cfg.num_requests) if cfg.kind in TIMED_KINDS else None
    n, times, closed = _schedule(cfg, trace, rng["arrivals"])

    if trace is not None:  # a timed trace's own rows, in order
        input_lens, output_lens = trace.input_lens[:n], trace.output_lens[:n]
    else:
        input_lens, output_lens = _length_distribution(cfg, cfg.lengths_kind).sample(rng["lengths"], n)
    conv_of, turn_of, members = _conversations(n, cfg.num_turns, closed is not None)

    if cfg.kind == "mooncake":
        blocks = HashBlockTokens(cfg.vocab_size, cfg.seed, trace.hash_block_size)
        prompts = [blocks.expand(trace.hash_ids[j], int(input_lens[j])) for j in range(n)]
    else:
        prompts = _synthetic_prompts(cfg, rng, input_lens, output_lens, conv_of, turn_of, members)
    max_tokens = output_lens.tolist()
    if cfg.max_model_len is not None:
        for j in range(n):
            prompts[j], max_tokens[j] = _clip(prompts[j], max_tokens[j], cfg.max_model_len)

    priorities = (rng["priorities"].integers(0, cfg.num_priorities, size=n).tolist()
                  if cfg.num_priorities > 1 else [0] * n)
    if closed is not None:
        clients: list[int | None] = (conv_of % closed.num_users).tolist()
    elif cfg.num_turns > 1:
        clients = conv_of.tolist()
    else:
        clients = [None] * n
    arrivals = times.tolist() if times is not None else [None] * n
    requests = [WorkloadRequest(request_id=str(j), arrival_time=arrivals[j], prompt_segments=prompts[j],
                                max_tokens=max_tokens[j], priority=priorities[j], deadline_s=cfg.deadline_s,
                                client_id=clients[j], conversation_id=c, turn=t)
                for j, c, t in zip(range(n), conv_of.tolist(), turn_of.tolist())]
    return Workload(requests=requests, closed_loop=closed, duration_s=cfg.duration_s,
                    skipped=dict(trace.skipped) if trace is not None else {})


__all__ = ["WORKLOAD_KINDS", "TIMED_KINDS", "ARRIVAL_KINDS", "LENGTH_KINDS", "WorkloadConfig", "build_workload"]
