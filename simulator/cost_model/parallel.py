"""Parallelism model: how tensor and pipeline parallelism change a step's time.

Tensor parallel (degree ``tp``, Megatron style as in vLLM): attention heads and the MLP's
intermediate dimension are split across GPUs, so every GEMM's FLOPs and weight bytes are
divided by ``tp``; K/V heads are split too, but when ``tp > num_kv_heads`` each GPU keeps
one replicated K/V head. Each layer ends its attention and its MLP with an all-reduce of the
layer's activations (``num_tokens x hidden`` elements), modelled as a ring::

    t_allreduce = 2 (tp - 1) / tp * bytes / (link_bandwidth * link_efficiency)
                  + 2 (tp - 1) * link_latency + collective_overhead

(``2 (tp - 1)`` ring steps, each paying one link latency, plus the fixed cost of the call).
This is the textbook bandwidth term plus latency terms that dominate small decode batches.

Pipeline parallel (degree ``pp``): the layers are split into ``pp`` equal stages; the first
also runs the embedding, the last the final norm, LM head and sampling; each stage but the
last sends its activations (``num_tokens x hidden``) to the next over one link
(``bytes / link + link_latency + collective_overhead``). A step's batch is split into ``m`` micro-batches of equal
aggregates; micro-batch ``i`` enters stage ``s`` when both are free, so the step takes the
classic pipeline time::

    t_step = sum_s t_s + (m - 1) * max_s t_s      # = (m + pp - 1) t_stage for equal stages

Every stage holds the same number of layers, so the slowest stage is the one with the
largest extra work (embedding + send, or LM head + sampling). With the default ``m = 1``
a step is latency-optimal (stages run one after the other, no bubble to fill); ``m > 1``
overlaps stages at the price of re-reading each stage's weights once per micro-batch.
All links are assumed to be the host's GPU-to-GPU links (one node).
"""
from __future__ import annotations

from dataclasses import dataclass

from simulator.hardware import HardwareSpec
from simulator.model_spec import ModelSpec


@dataclass(frozen=True)
class ParallelConfig:
    """Tensor- and pipeline-parallel degrees and the micro-batches a step is split into."""

    tp: int = 1
    pp: int = 1
    num_microbatches: int = 1

    def __post_init__(self) -> None:
        for name in ("tp", "pp", "num_microbatches"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"ParallelConfig.{name} must be an int >= 1, got {v!r}")

    def validate(self, model: ModelSpec) -> None:
        """Raise ValueError when ``model`` cannot be split this way (vLLM's own rules)."""
        if model.num_heads % self.tp:
            raise ValueError(f"tensor parallel size {self.tp} does not divide num_attention_heads "
                             f"{model.num_heads} of {model.name}")
        if model.num_kv_heads % self.tp and self.tp % model.num_kv_heads:
            raise ValueError(f"tensor parallel size {self.tp} and num_kv_heads {model.num_kv_heads} of "
                             f"{model.name}: one must divide the other")
        if model.num_layers % self.pp:
            raise ValueError(f"pipeline parallel size {self.pp} does not divide num_layers "
                             f"{model.num_layers} of {model.name}")

    def kv_heads_per_gpu(self, model: ModelSpec) -> int:
        """K/V heads stored on each GPU: split by ``tp``, at least one (replicated)."""
        return max(1, model.num_kv_heads // self.tp)

    def layers_per_stage(self, model: ModelSpec) -> int:
        return model.num_layers // self.pp


def ring_allreduce_time(num_bytes: float, tp: int, hardware: HardwareSpec) -> float:
    """Seconds for a ring all-reduce of ``num_bytes`` over ``tp`` GPUs (0 when tp == 1)."""
    if tp == 1:
        return 0.0
    steps = 2 * (tp - 1)
    return (steps / tp * num_bytes / hardware.achievable_link_bandwidth + steps * hardware.link_latency
            + hardware.collective_overhead)


def p2p_send_time(num_bytes: float, hardware: HardwareSpec) -> float:
    """Seconds to send ``num_bytes`` from one GPU to the next pipeline stage."""
    return num_bytes / hardware.achievable_link_bandwidth + hardware.link_latency + hardware.collective_overhead
