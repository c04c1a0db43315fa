"""Tensor-parallel partitioning and layers (Megatron-style, as in vLLM).

Per decoder layer, two all-reduces: the fused q/k/v and gate/up projections are
*column*-parallel (each rank computes its heads / its slice of the intermediate dimension,
no communication), o_proj and down_proj are *row*-parallel (each rank multiplies its input
slice, a sum over ranks completes the product: ``RowParallelLinear`` all-reduces). Attention
is local: rank ``r`` owns query heads ``[r*Hq/tp, (r+1)*Hq/tp)`` and the KV heads they read.
KV heads are split when ``tp <= Hk`` and *replicated* when ``tp > Hk`` (each rank keeps the
one KV head its query heads belong to; ``tp`` must then be a multiple of ``Hk``).

The vocabulary is split in ``ceil(V / tp)``-row shards (the last padded with zero rows): the
embedding looks up the ids in its shard (others give zero) and all-reduces; the LM head
computes its shard's logits and all-gathers them (every rank holds the full ``[N, V]``
logits; only rank 0 samples).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from executor.config import ModelConfig
from executor.parallel.state import TPGroup


def tp_size_of(tp: TPGroup | None) -> int:
    return 1 if tp is None else tp.world_size


@dataclass(frozen=True)
class ShardPlan:
    """How one rank's shard of a model is cut from the checkpoint."""

    rank: int
    size: int
    num_heads: int  # local query heads
    num_kv_heads: int  # local KV heads (1 when replicated)
    kv_head_start: int  # first checkpoint KV head this rank holds
    intermediate: int  # local MLP intermediate size
    vocab_shard: int  # rows per vocabulary shard (ceil(V / tp))

    @property
    def vocab_start(self) -> int:
        return self.rank * self.vocab_shard

    def vocab_rows(self, vocab_size: int) -> int:
        """Real (non-padding) rows of this rank's vocabulary shard."""
        return max(0, min(self.vocab_shard, vocab_size - self.vocab_start))


def shard_plan(config: ModelConfig, tp: TPGroup | None) -> ShardPlan:
    """This rank's partition; ``ValueError`` when the shape cannot be split ``tp`` ways."""
    size = tp_size_of(tp)
    rank = 0 if tp is None else tp.rank
    hq, hk, inter = config.num_attention_heads, config.num_key_value_heads, config.intermediate_size
    if hq % size:
        raise ValueError(f"tensor parallel size {size} must divide num_attention_heads={hq}")
    if inter % size:
        raise ValueError(f"tensor parallel size {size} must divide intermediate_size={inter}")
    if size <= hk:
        if hk % size:
            raise ValueError(f"tensor parallel size {size} must divide num_key_value_heads={hk}")
        kv_local, kv_start = hk // size, rank * (hk // size)
    else:
        if size % hk:
            raise ValueError(f"tensor parallel size {size} > num_key_value_heads={hk} must be a multiple of it "
                             "(KV heads are then replicated)")
        kv_local, kv_start = 1, rank * hk // size
    return ShardPlan(rank=rank, size=size, num_heads=hq // size, num_kv_heads=kv_local, kv_head_start=kv_start,
                     intermediate=inter // size, vocab_shard=-(-config.vocab_size // size))


def shard_config(config: ModelConfig, plan: ShardPlan) -> ModelConfig:
    """The per-rank view of ``config``: local head counts and intermediate size (what the KV
    pool, the attention modules and the runner's kernel choices see); the vocabulary stays
    the full one (logits are gathered before sampling)."""
    if plan.size == 1:
        return config
    return dataclasses.replace(config, num_attention_heads=plan.num_heads, num_key_value_heads=plan.num_kv_heads,
                               intermediate_size=plan.intermediate)


class RowParallelLinear(nn.Linear):
    """``y = all_reduce(x_r @ W_r^T) + b``: ``weight`` is this rank's input-column slice
    ``[out, in / tp]``; the bias (full) is added by rank 0 only, before the sum."""

    def __init__(self, in_features_local: int, out_features: int, bias: bool, tp: TPGroup) -> None:
        super().__init__(in_features_local, out_features, bias=bias)
        self.tp = tp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.bias if self.tp.rank == 0 else None
        return self.tp.all_reduce(F.linear(x, self.weight, bias))


class VocabParallelEmbedding(nn.Module):
    """Rows ``[rank * shard, (rank + 1) * shard)`` of the embedding; ids outside give zeros
    and an all-reduce sums the shards (exactly one rank contributes each row)."""

    def __init__(self, vocab_size: int, hidden_size: int, tp: TPGroup) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.shard = -(-vocab_size // tp.world_size)
        self.start = tp.rank * self.shard
        self.weight = nn.Parameter(torch.empty(self.shard, hidden_size))
        self.tp = tp

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.start
        outside = (local < 0) | (local >= self.shard)
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        out.masked_fill_(outside.unsqueeze(-1), 0)
        return self.tp.all_reduce(out)


def gather_logits(hidden: torch.Tensor, weight: torch.Tensor, vocab_size: int, tp: TPGroup) -> torch.Tensor:
    """Full-vocabulary logits [N, V] (model dtype) from this rank's LM-head shard."""
    local = F.linear(hidden, weight)
    full = tp.all_gather_last(local)
    return full[:, :vocab_size] if full.shape[1] != vocab_size else full
