"""Llama-style decoder serving the Llama, Mistral, Qwen2 and Qwen3 families.

The four families share one block (pre-norm, GQA attention with RoPE, SwiGLU MLP); their
differences are config flags: qkv / o_proj / MLP biases, per-head q/k RMSNorm (Qwen3), an
explicit ``head_dim``, sliding windows, tied embeddings and the RoPE variant.

Unlike HF's modeling code this model has no batch dimension and no cache object: it takes
the flattened tokens of a mixed prefill/decode batch plus ``AttentionMetadata`` and reads
and writes a paged KV cache owned by the model runner. q/k/v and gate/up projections are
fused into one matmul each; checkpoint tensors are copied into their slice at load time.
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from executor.config import ModelConfig
from executor.layers import (
    AttentionMetadata,
    PagedAttention,
    RMSNorm,
    RotaryEmbedding,
    get_kernel_ops,
    silu_and_mul,
)

if TYPE_CHECKING:
    from executor.parallel.state import TPGroup

# Checkpoint tensors that carry no weights (old Llama checkpoints saved the RoPE table).
_IGNORED_SUFFIXES: tuple[str, ...] = ("rotary_emb.inv_freq",)


def _row_linear(in_features: int, out_features: int, bias: bool, tp: TPGroup | None) -> nn.Linear:
    """``nn.Linear``, or its row-parallel twin (all-reduce after it) under tensor parallelism;
    ``in_features`` is then this rank's slice (the shard config's sizes)."""
    if tp is None or tp.world_size == 1:
        return nn.Linear(in_features, out_features, bias=bias)
    from executor.parallel.layers import RowParallelLinear

    return RowParallelLinear(in_features, out_features, bias, tp)


class LlamaAttention(nn.Module):
    """``config`` is the rank's shard config under tensor parallelism (local head counts)."""

    def __init__(self, config: ModelConfig, layer_idx: int, rotary_emb: RotaryEmbedding,
                 tp: TPGroup | None = None) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.q_size, self.kv_size = config.q_size, config.kv_size
        self.qkv_proj = nn.Linear(config.hidden_size, self.q_size + 2 * self.kv_size, bias=config.qkv_bias)
        self.o_proj = _row_linear(self.q_size, config.hidden_size, config.o_proj_bias, tp)
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps) if config.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps) if config.qk_norm else None
        self.rotary_emb = rotary_emb  # shared by all layers; a buffer-only module
        self.attn = PagedAttention(self.num_heads, self.num_kv_heads, self.head_dim,
                                   config.sliding_windows[layer_idx])

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor,
                metadata: AttentionMetadata) -> torch.Tensor:
        num_tokens = hidden.shape[0]
        q, k, v = self.qkv_proj(hidden).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(num_tokens, self.num_heads, self.head_dim)
        k = k.view(num_tokens, self.num_kv_heads, self.head_dim)
        v = v.view(num_tokens, self.num_kv_heads, self.head_dim)
        fused = get_kernel_ops().qk_norm_rope_store
        if fused is not None:
            # One kernel: q/k norm (Qwen3), rotary, and the KV-cache store of k and v.
            k_cache, v_cache = self.attn.bound_cache()
            has_norm = self.q_norm is not None and self.k_norm is not None
            rope = self.rotary_emb
            q, k = fused(q, k, v, positions, rope.cos_cache, rope.sin_cache,
                         self.q_norm.weight if has_norm else None,
                         self.k_norm.weight if has_norm else None,
                         self.q_norm.eps if has_norm else 0.0, k_cache, v_cache, metadata.slot_mapping)
            out = self.attn(q, k, v, metadata, kv_stored=True)
        else:
            if self.q_norm is not None and self.k_norm is not None:
                q, k = self.q_norm(q), self.k_norm(k)
            q, k = self.rotary_emb(positions, q, k)
            out = self.attn(q, k, v, metadata)
        return self.o_proj(out.reshape(num_tokens, self.q_size))


class LlamaMLP(nn.Module):
    def __init__(self, config: ModelConfig, tp: TPGroup | None = None) -> None:
        super().__init__()
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=config.mlp_bias)
        self.down_proj = _row_linear(config.intermediate_size, config.hidden_size, config.mlp_bias, tp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(silu_and_mul(self.gate_up_proj(x)))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int, rotary_emb: RotaryEmbedding,
                 tp: TPGroup | None = None) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = LlamaAttention(config, layer_idx, rotary_emb, tp)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = LlamaMLP(config, tp)

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor, residual: torch.Tensor | None,
                metadata: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (MLP output, residual stream before it); the next layer's input norm adds
        them, so each residual add is fused into a norm. ``residual`` is None at layer 0."""
        if residual is None:
            hidden, residual = self.input_layernorm(hidden), hidden
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(positions, hidden, metadata)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual


class LlamaModel(nn.Module):
    def __init__(self, config: ModelConfig, tp: TPGroup | None = None) -> None:
        super().__init__()
        if tp is None or tp.world_size == 1:
            self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        else:
            from executor.parallel.layers import VocabParallelEmbedding

            self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size, tp)
        self.rotary_emb = RotaryEmbedding(config.head_dim, config.max_position_embeddings, config.rope)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config, i, self.rotary_emb, tp)
                                    for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                metadata: AttentionMetadata) -> torch.Tensor:
        hidden = self.embed_tokens(input_ids)
        residual = None
        for layer in self.layers:
            hidden, residual = layer(positions, hidden, residual, metadata)
        hidden, _ = self.norm(hidden, residual)
        return hidden


class LlamaForCausalLM(nn.Module):
    """The paged-KV causal LM. Module names mirror HF's so checkpoint names map 1:1,
    except the fused ``qkv_proj`` and ``gate_up_proj`` (see ``PACKED_WEIGHTS``)."""

    # (fused parameter, checkpoint projection, position of the shard in the fused output)
    PACKED_WEIGHTS: tuple[tuple[str, str, int], ...] = (
        ("qkv_proj", "q_proj", 0), ("qkv_proj", "k_proj", 1), ("qkv_proj", "v_proj", 2),
        ("gate_up_proj", "gate_proj", 0), ("gate_up_proj", "up_proj", 1),
    )

    def __init__(self, config: ModelConfig, tp: TPGroup | None = None) -> None:
        """``tp``: the tensor-parallel group this rank's shard belongs to (None: the whole
        model). Under tensor parallelism ``shard_config`` has the local head counts and
        intermediate size; ``config`` stays the checkpoint's."""
        super().__init__()
        self.config = config
        self.tp = tp if tp is not None and tp.world_size > 1 else None
        self.shard_plan = None
        self.shard_config = config
        vocab_rows = config.vocab_size
        if self.tp is not None:
            from executor.parallel.layers import shard_config, shard_plan

            self.shard_plan = shard_plan(config, self.tp)
            self.shard_config = shard_config(config, self.shard_plan)
            vocab_rows = self.shard_plan.vocab_shard
        self.model = LlamaModel(self.shard_config, self.tp)
        self.lm_head = (None if config.tie_word_embeddings
                        else nn.Linear(config.hidden_size, vocab_rows, bias=False))

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                attn_metadata: AttentionMetadata) -> torch.Tensor:
        """``input_ids``/``positions`` [T] of a flattened batch -> final-norm hidden [T, H]."""
        return self.model(input_ids, positions, attn_metadata)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits [N, vocab] in fp32 for the rows that sample (usually each request's last
        token), so the LM head runs only where needed and sampling sees full precision."""
        return self.logits(hidden).float()

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Full-vocabulary logits [N, vocab] in the model dtype (gathered from every rank's
        vocabulary shard under tensor parallelism)."""
        weight = self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        if self.tp is not None:
            from executor.parallel.layers import gather_logits

            return gather_logits(hidden, weight, self.config.vocab_size, self.tp)
        return F.linear(hidden, weight)

    def bind_kv_cache(self, kv_caches: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Hand each layer its (k_cache, v_cache), each [num_blocks, block_size, Hk, D]."""
        cfg = self.shard_config
        if len(kv_caches) != cfg.num_hidden_layers:
            raise ValueError(f"got {len(kv_caches)} KV caches for {cfg.num_hidden_layers} layers")
        for i, (layer, (k_cache, v_cache)) in enumerate(zip(self.model.layers, kv_caches)):
            if k_cache.shape != v_cache.shape or k_cache.dim() != 4 or \
                    tuple(k_cache.shape[2:]) != (cfg.num_key_value_heads, cfg.head_dim):
                raise ValueError(f"layer {i}: KV caches must both be [num_blocks, block_size, "
                                 f"{cfg.num_key_value_heads}, {cfg.head_dim}], got "
                                 f"{tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
            layer.self_attn.attn.kv_cache = (k_cache, v_cache)

    def init_buffers(self) -> None:
        """Compute non-weight buffers (the RoPE table) after ``to_empty`` materialization."""
        self.model.rotary_emb.reset_parameters()

    def checkpoint_targets(self) -> dict[str, tuple[torch.Tensor, int, int]]:
        """Map every expected checkpoint tensor name to (parameter, row offset, rows).

        Unfused tensors fill their whole parameter; q/k/v and gate/up fill row ranges of
        the fused projections (weights and biases alike, both split along dim 0).
        """
        cfg = self.shard_config  # local sizes under tensor parallelism
        shard_rows = {"qkv_proj": [cfg.q_size, cfg.kv_size, cfg.kv_size],
                      "gate_up_proj": [cfg.intermediate_size, cfg.intermediate_size]}
        targets: dict[str, tuple[torch.Tensor, int, int]] = {}
        for name, param in self.named_parameters():
            shards = [(fused, ckpt, idx) for fused, ckpt, idx in self.PACKED_WEIGHTS if f".{fused}." in name]
            for fused, ckpt, idx in shards:
                rows = shard_rows[fused]
                targets[name.replace(fused, ckpt)] = (param, sum(rows[:idx]), rows[idx])
            if not shards:
                rows = param.shape[0]
                if self.shard_plan is not None and name.endswith(("embed_tokens.weight", "lm_head.weight")):
                    rows = self.shard_plan.vocab_rows(self.config.vocab_size)  # the last shard is padded
                targets[name] = (param, 0, rows)
        return targets

    def checkpoint_narrows(self) -> dict[str, tuple[int, int, int]]:
        """Under tensor parallelism: checkpoint tensor name -> (dim, start, length) of the
        slice this rank loads (column-parallel rows, row-parallel columns, its KV heads,
        its vocabulary rows); tensors not listed (norms, row-parallel biases) load whole."""
        plan = self.shard_plan
        if plan is None:
            return {}
        cfg, d = self.config, self.config.head_dim
        q_local, kv_local, i_local = plan.num_heads * d, plan.num_kv_heads * d, plan.intermediate
        narrows: dict[str, tuple[int, int, int]] = {}
        for name in self.checkpoint_targets():
            leaf = name.split(".")[-2]
            is_weight = name.endswith(".weight")
            if leaf == "q_proj":
                narrows[name] = (0, plan.rank * q_local, q_local)
            elif leaf in ("k_proj", "v_proj"):
                narrows[name] = (0, plan.kv_head_start * d, kv_local)
            elif leaf in ("gate_proj", "up_proj"):
                narrows[name] = (0, plan.rank * i_local, i_local)
            elif leaf == "o_proj" and is_weight:
                narrows[name] = (1, plan.rank * q_local, q_local)
            elif leaf == "down_proj" and is_weight:
                narrows[name] = (1, plan.rank * i_local, i_local)
            elif name in ("model.embed_tokens.weight", "lm_head.weight"):
                narrows[name] = (0, plan.vocab_start, plan.vocab_rows(cfg.vocab_size))
        return narrows

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy checkpoint tensors into the parameters (casting to the model dtype/device).

        Raises ``ValueError`` naming unexpected, mis-shaped and missing tensors, so a wrong
        checkpoint fails at load time rather than producing garbage.
        """
        targets = self.checkpoint_targets()
        narrows = self.checkpoint_narrows()
        if self.shard_plan is not None:  # zero the padding rows of the last vocabulary shard
            with torch.no_grad():
                for name, (param, _, rows) in targets.items():
                    if rows < param.shape[0] and name in ("model.embed_tokens.weight", "lm_head.weight"):
                        param[rows:].zero_()
        loaded: set[str] = set()
        unexpected: list[str] = []
        for name, tensor in weights:
            if name.endswith(_IGNORED_SUFFIXES) or (name == "lm_head.weight" and self.lm_head is None):
                continue
            if name not in targets:
                unexpected.append(name)
                continue
            param, offset, rows = targets[name]
            if name in narrows:
                dim, start, length = narrows[name]
                tensor = tensor.narrow(dim, start, length)
            expected = (rows, *param.shape[1:])
            if tuple(tensor.shape) != expected:
                raise ValueError(f"tensor {name} has shape {tuple(tensor.shape)}, expected {expected}")
            with torch.no_grad():
                param[offset:offset + rows].copy_(tensor)
            loaded.add(name)
        if unexpected:
            raise ValueError(f"unexpected tensors for {self.config.architecture}: {sorted(unexpected)}")
        missing = sorted(set(targets) - loaded)
        if missing:
            raise ValueError(f"checkpoint is missing {len(missing)} tensors: {missing}")
