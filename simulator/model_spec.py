"""Model-shape catalog: the dimensions of a decoder that fix its FLOPs, bytes and KV size.

Only shapes live here (no weights, no torch), so the simulator can cost a 70B model on a
laptop. Entries copy the published HF ``config.json`` values; ``ModelSpec.from_hf_config``
reads any Llama / Qwen2 / Qwen3 / Mistral / Mixtral config so a new checkpoint needs no
catalog edit. ``quantization`` is part of the spec because it is part of the checkpoint
(``quantization_config`` in config.json) and both the cost model and the memory arithmetic
must read the same weight size.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "half": 2, "float32": 4, "float": 4}
_QUANTIZATIONS = (None, "fp8")
_KV_CACHE_DTYPES = ("auto", "fp8")


@dataclass(frozen=True)
class ModelSpec:
    """Shapes of a decoder-only transformer.

    ``intermediate_size`` is the dense MLP width; an MoE model (``num_experts > 0``) uses
    ``moe_intermediate_size`` per expert in every layer instead. ``gated_mlp`` is True for
    SwiGLU (gate, up, down: 3 matrices), False for a plain 2-matrix MLP (BLOOM).
    ``dtype_bytes`` is the activation element size; weights take
    ``weight_bytes_per_param`` (1 with ``quantization="fp8"``), the KV cache
    ``kv_dtype_bytes`` (1 with ``kv_cache_dtype="fp8"``, the executor's float8 e4m3 cache).
    """

    name: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    tie_word_embeddings: bool = False
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    dtype_bytes: int = 2
    max_position_embeddings: int = 4096
    gated_mlp: bool = True
    qkv_bias: bool = False
    qk_norm: bool = False
    quantization: str | None = None
    kv_cache_dtype: str = "auto"

    def __post_init__(self) -> None:
        for name in ("hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                     "head_dim", "vocab_size", "dtype_bytes", "max_position_embeddings"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"ModelSpec.{name} must be an int >= 1, got {v!r} ({self.name})")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"ModelSpec {self.name}: num_heads {self.num_heads} is not a multiple of "
                             f"num_kv_heads {self.num_kv_heads}")
        if self.num_experts:
            if not 1 <= self.num_experts_per_tok <= self.num_experts or self.moe_intermediate_size < 1:
                raise ValueError(f"ModelSpec {self.name}: MoE needs 1 <= num_experts_per_tok <= num_experts "
                                 f"and moe_intermediate_size >= 1, got {self.num_experts_per_tok}, "
                                 f"{self.num_experts}, {self.moe_intermediate_size}")
        elif self.num_experts_per_tok or self.moe_intermediate_size:
            raise ValueError(f"ModelSpec {self.name}: num_experts_per_tok / moe_intermediate_size set "
                             "without num_experts")
        if self.kv_cache_dtype not in _KV_CACHE_DTYPES:
            raise ValueError(f"ModelSpec.kv_cache_dtype must be one of {_KV_CACHE_DTYPES}, "
                             f"got {self.kv_cache_dtype!r}")
        if self.quantization not in _QUANTIZATIONS:
            raise ValueError(f"ModelSpec.quantization must be one of {_QUANTIZATIONS}, got {self.quantization!r}")

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def weight_bytes_per_param(self) -> int:
        return 1 if self.quantization == "fp8" else self.dtype_bytes

    @property
    def kv_dtype_bytes(self) -> int:
        return 1 if self.kv_cache_dtype == "fp8" else self.dtype_bytes

    @property
    def kv_bytes_per_token(self) -> int:
        """K and V of one token over all layers (whole model, unsharded)."""
        return 2 * self.kv_dim * self.kv_dtype_bytes * self.num_layers

    @property
    def attention_params_per_layer(self) -> int:
        qkv = self.hidden_size * (self.q_dim + 2 * self.kv_dim)
        bias = (self.q_dim + 2 * self.kv_dim) if self.qkv_bias else 0
        return qkv + bias + self.q_dim * self.hidden_size + (2 * self.head_dim if self.qk_norm else 0)

    @property
    def expert_params(self) -> int:
        """Parameters of one MoE expert (0 for a dense model)."""
        return 3 * self.hidden_size * self.moe_intermediate_size if self.is_moe else 0

    @property
    def mlp_params_per_layer(self) -> int:
        if self.is_moe:
            return self.num_experts * self.expert_params + self.hidden_size * self.num_experts  # + router
        return (3 if self.gated_mlp else 2) * self.hidden_size * self.intermediate_size

    @property
    def num_params(self) -> int:
        embed = self.vocab_size * self.hidden_size
        lm_head = 0 if self.tie_word_embeddings else embed
        per_layer = self.attention_params_per_layer + self.mlp_params_per_layer + 2 * self.hidden_size
        return embed + lm_head + self.num_layers * per_layer + self.hidden_size

    @property
    def weight_bytes(self) -> int:
        return self.num_params * self.weight_bytes_per_param

    @classmethod
    def from_hf_config(cls, config: str | Path | dict[str, Any], name: str | None = None) -> ModelSpec:
        """Spec from an HF ``config.json`` (a dict, the file, or its directory).

        Understands the Llama / Mistral / Qwen2 (q/k/v bias) / Qwen3 (q/k norm, explicit
        ``head_dim``) / Mixtral and Qwen3-MoE field names; an ``fp8`` quantization_config
        sets ``quantization="fp8"``.
        """
        if isinstance(config, dict):
            cfg, default_name = config, "hf-model"
        else:
            path = Path(config)
            if path.is_dir():
                path = path / "config.json"
            cfg, default_name = json.loads(path.read_text()), path.parent.name
        required = ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
        missing = [k for k in required if k not in cfg]
        if missing:
            raise ValueError(f"HF config lacks {missing} (model_type {cfg.get('model_type')!r})")
        model_type = cfg.get("model_type", "")
        heads = cfg["num_attention_heads"]
        hidden = cfg["hidden_size"]
        experts = cfg.get("num_local_experts") or cfg.get("num_experts") or 0
        moe_inter = cfg.get("moe_intermediate_size") or (cfg.get("intermediate_size") if experts else 0) or 0
        quant = cfg.get("quantization_config") or {}
        dtype = cfg.get("torch_dtype") or cfg.get("dtype") or "bfloat16"
        if dtype not in _DTYPE_BYTES:
            raise ValueError(f"HF config dtype {dtype!r} not understood; known: {list(_DTYPE_BYTES)}")
        return cls(
            name=name or str(cfg.get("_name_or_path") or default_name).rstrip("/").split("/")[-1],
            hidden_size=hidden,
            intermediate_size=cfg.get("intermediate_size") or 4 * hidden,
            num_layers=cfg["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or hidden // heads,
            vocab_size=cfg["vocab_size"],
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            num_experts=experts,
            num_experts_per_tok=cfg.get("num_experts_per_tok", 0) if experts else 0,
            moe_intermediate_size=moe_inter,
            dtype_bytes=_DTYPE_BYTES[dtype],
            max_position_embeddings=cfg.get("max_position_embeddings", 4096),
            qkv_bias=model_type == "qwen2" or bool(cfg.get("attention_bias", False)),
            qk_norm=model_type in ("qwen3", "qwen3_moe"),
            quantization="fp8" if quant.get("quant_method") == "fp8" else None,
        )


MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec("Llama-3.2-1B", hidden_size=2048, intermediate_size=8192, num_layers=16, num_heads=32,
                  num_kv_heads=8, head_dim=64, vocab_size=128256, tie_word_embeddings=True,
                  max_position_embeddings=131072),
        ModelSpec("Llama-3.1-8B", hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32,
                  num_kv_heads=8, head_dim=128, vocab_size=128256, max_position_embeddings=131072),
        ModelSpec("Llama-3.1-70B", hidden_size=8192, intermediate_size=28672, num_layers=80, num_heads=64,
                  num_kv_heads=8, head_dim=128, vocab_size=128256, max_position_embeddings=131072),
        ModelSpec("Llama-2-70B", hidden_size=8192, intermediate_size=28672, num_layers=80, num_heads=64,
                  num_kv_heads=8, head_dim=128, vocab_size=32000, max_position_embeddings=4096),
        ModelSpec("Qwen3-0.6B", hidden_size=1024, intermediate_size=3072, num_layers=28, num_heads=16,
                  num_kv_heads=8, head_dim=128, vocab_size=151936, tie_word_embeddings=True,
                  max_position_embeddings=40960, qk_norm=True),
        ModelSpec("Qwen3-8B", hidden_size=4096, intermediate_size=12288, num_layers=36, num_heads=32,
                  num_kv_heads=8, head_dim=128, vocab_size=151936, max_position_embeddings=40960, qk_norm=True),
        ModelSpec("Qwen3-32B", hidden_size=5120, intermediate_size=25600, num_layers=64, num_heads=64,
                  num_kv_heads=8, head_dim=128, vocab_size=151936, max_position_embeddings=40960, qk_norm=True),
        ModelSpec("Qwen2.5-7B", hidden_size=3584, intermediate_size=18944, num_layers=28, num_heads=28,
                  num_kv_heads=4, head_dim=128, vocab_size=152064, max_position_embeddings=131072,
                  qkv_bias=True),
        ModelSpec("Mistral-7B-v0.1", hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32,
                  num_kv_heads=8, head_dim=128, vocab_size=32000, max_position_embeddings=32768),
        ModelSpec("Mixtral-8x7B", hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32,
                  num_kv_heads=8, head_dim=128, vocab_size=32000, num_experts=8, num_experts_per_tok=2,
                  moe_intermediate_size=14336, max_position_embeddings=32768),
        # BLOOM: MHA, plain GELU MLP of 4 x hidden, ALiBi (no rotary), tied embeddings.
        ModelSpec("BLOOM-176B", hidden_size=14336, intermediate_size=4 * 14336, num_layers=70, num_heads=112,
                  num_kv_heads=112, head_dim=128, vocab_size=250880, tie_word_embeddings=True,
                  max_position_embeddings=2048, gated_mlp=False, qkv_bias=True),
    )
}

_ALIASES: dict[str, str] = {
    "llama2-70b": "Llama-2-70B", "bloom": "BLOOM-176B", "bloom-176b": "BLOOM-176B",
    "mistral-7b": "Mistral-7B-v0.1", "mixtral-8x7b-v0.1": "Mixtral-8x7B",
    "meta-llama-3.1-8b": "Llama-3.1-8B", "meta-llama-3.1-70b": "Llama-3.1-70B",
}


def normalize_model_name(name: str) -> str:
    """Case-, org- and ``-Instruct``-insensitive key: instruct variants share the base shapes."""
    return name.strip().rsplit("/", 1)[-1].lower().replace("_", "-").replace("-instruct", "")


_LOOKUP: dict[str, str] = ({normalize_model_name(n): n for n in MODELS}
                          | {normalize_model_name(a): n for a, n in _ALIASES.items()})


def get_model(name: str) -> ModelSpec:
    """Catalog entry by name (``Qwen/Qwen3-8B``, ``llama-3.1-8b-instruct`` and the like work)."""
    try:
        return MODELS[_LOOKUP[normalize_model_name(name)]]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(MODELS)}") from None
