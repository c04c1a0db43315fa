"""The executor's model configuration, parsed from a Hugging Face ``config.json``.

HF configs differ between families (Qwen2 has qkv bias without an ``attention_bias`` key,
Qwen3 adds q/k norms, Mistral has a global sliding window) and between transformers
versions (legacy ``rope_theta`` + ``rope_scaling`` vs. v5 ``rope_parameters``). This module
turns all of them into one flat, validated record so the model code reads flags, never
architecture names.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

# Architectures this executor runs, with the family-level facts that config.json leaves
# implicit. ``qkv_bias=None`` means "read ``attention_bias``" (Llama / Qwen3 style, which
# also puts a bias on o_proj); Qwen2 always has q/k/v bias and never an o_proj bias.
_ARCH_RULES: dict[str, dict[str, Any]] = {
    "LlamaForCausalLM": {"qkv_bias": None, "qk_norm": False, "sliding": "none"},
    "MistralForCausalLM": {"qkv_bias": False, "qk_norm": False, "sliding": "global"},
    "Qwen2ForCausalLM": {"qkv_bias": True, "qk_norm": False, "sliding": "qwen"},
    "Qwen3ForCausalLM": {"qkv_bias": None, "qk_norm": True, "sliding": "qwen"},
}
SUPPORTED_ARCHITECTURES: tuple[str, ...] = tuple(_ARCH_RULES)

SUPPORTED_ROPE_TYPES: tuple[str, ...] = ("default", "linear", "llama3")

_DTYPES: dict[str, torch.dtype] = {
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
}


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """Accept the spellings found in configs and on command lines (``bf16``, ``torch.float16``...)."""
    if isinstance(dtype, torch.dtype):
        if dtype not in _DTYPES.values():
            raise ValueError(f"unsupported dtype {dtype}; use bfloat16, float16 or float32")
        return dtype
    key = str(dtype).lower().removeprefix("torch.")
    if key not in _DTYPES:
        raise ValueError(f"unsupported dtype {dtype!r}; use one of {sorted(_DTYPES)}")
    return _DTYPES[key]


@dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding parameters (``rope_type`` selects how ``inv_freq`` is rescaled)."""

    theta: float
    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def inv_freq(self, rotary_dim: int) -> torch.Tensor:
        """Per-pair inverse frequencies in fp32, computed exactly as transformers does."""
        exponents = torch.arange(0, rotary_dim, 2, dtype=torch.int64).to(torch.float32) / rotary_dim
        inv_freq = 1.0 / (self.theta ** exponents)
        if self.rope_type == "linear":
            return inv_freq / self.factor
        if self.rope_type == "llama3":
            # Llama 3.1: keep high frequencies, divide low ones by ``factor``, blend between.
            low_freq_wavelen = self.original_max_position_embeddings / self.low_freq_factor
            high_freq_wavelen = self.original_max_position_embeddings / self.high_freq_factor
            wavelen = 2 * math.pi / inv_freq
            scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / self.factor, inv_freq)
            smooth = ((self.original_max_position_embeddings / wavelen - self.low_freq_factor)
                      / (self.high_freq_factor - self.low_freq_factor))
            smoothed = (1 - smooth) * scaled / self.factor + smooth * scaled
            is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
            return torch.where(is_medium, smoothed, scaled)
        return inv_freq


@dataclass(frozen=True)
class ModelConfig:
    """Everything the decoder needs, with family quirks resolved into flags.

    ``sliding_windows[i]`` is the attention window of layer ``i`` in tokens (a key at
    position ``j`` is visible to a query at ``p`` iff ``p - window < j <= p``), or ``None``
    for full causal attention.
    """

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    rope: RopeConfig
    tie_word_embeddings: bool
    qkv_bias: bool
    o_proj_bias: bool
    mlp_bias: bool
    qk_norm: bool
    sliding_windows: tuple[int | None, ...]
    dtype: torch.dtype
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]

    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_key_value_heads * self.head_dim

    @classmethod
    def from_hf(cls, hf: dict[str, Any], dtype: str | torch.dtype | None = None) -> ModelConfig:
        """Parse a ``config.json`` dict; ``dtype`` overrides the checkpoint's ``torch_dtype``."""
        archs = hf.get("architectures") or []
        arch = next((a for a in archs if a in _ARCH_RULES), None)
        if arch is None:
            raise ValueError(f"unsupported architecture {archs or '(none given)'}; "
                             f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
        rules = _ARCH_RULES[arch]

        def req(key: str) -> Any:
            if hf.get(key) is None:
                raise ValueError(f"config.json of {arch} lacks required key {key!r}")
            return hf[key]

        act = hf.get("hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"unsupported hidden_act {act!r}; only 'silu' is implemented")
        num_layers = int(req("num_hidden_layers"))
        num_heads = int(req("num_attention_heads"))
        num_kv_heads = int(hf.get("num_key_value_heads") or num_heads)
        if num_heads % num_kv_heads:
            raise ValueError(f"num_attention_heads={num_heads} is not a multiple of "
                             f"num_key_value_heads={num_kv_heads}")
        hidden = int(req("hidden_size"))
        attention_bias = bool(hf.get("attention_bias", False))
        qkv_bias = attention_bias if rules["qkv_bias"] is None else rules["qkv_bias"]
        eos = hf.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
        max_pos = int(hf.get("max_position_embeddings", 4096))
        return cls(
            architecture=arch,
            vocab_size=int(req("vocab_size")),
            hidden_size=hidden,
            intermediate_size=int(req("intermediate_size")),
            num_hidden_layers=num_layers,
            num_attention_heads=num_heads,
            num_key_value_heads=num_kv_heads,
            head_dim=int(hf.get("head_dim") or hidden // num_heads),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=max_pos,
            rope=_parse_rope(hf, max_pos),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            qkv_bias=qkv_bias,
            o_proj_bias=attention_bias and rules["qkv_bias"] is None,
            mlp_bias=bool(hf.get("mlp_bias", False)),
            qk_norm=rules["qk_norm"],
            sliding_windows=_parse_sliding_windows(hf, rules["sliding"], num_layers),
            dtype=parse_dtype(dtype or hf.get("torch_dtype") or hf.get("dtype") or "bfloat16"),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_ids=eos_ids,
        )


def _parse_rope(hf: dict[str, Any], max_pos: int) -> RopeConfig:
    """Read legacy (``rope_theta`` + ``rope_scaling``) and v5 (``rope_parameters``) layouts."""
    params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(f"unsupported rope type {rope_type!r}; supported: {', '.join(SUPPORTED_ROPE_TYPES)}")
    if rope_type == "default":
        return RopeConfig(theta=theta)
    if rope_type == "linear":
        return RopeConfig(theta=theta, rope_type="linear", factor=float(params["factor"]))
    return RopeConfig(
        theta=theta, rope_type="llama3", factor=float(params["factor"]),
        low_freq_factor=float(params["low_freq_factor"]),
        high_freq_factor=float(params["high_freq_factor"]),
        original_max_position_embeddings=int(params.get("original_max_position_embeddings", max_pos)),
    )


def _parse_sliding_windows(hf: dict[str, Any], rule: str, num_layers: int) -> tuple[int | None, ...]:
    """Per-layer windows with transformers' semantics for each family.

    Mistral applies ``sliding_window`` to every layer when it is set; Qwen2/Qwen3 only when
    ``use_sliding_window`` is true, and then to the layers marked ``sliding_attention`` in
    ``layer_types`` (default: layers ``>= max_window_layers``).
    """
    window = hf.get("sliding_window")
    if rule == "global" and window is not None:
        return (int(window),) * num_layers
    if rule == "qwen" and hf.get("use_sliding_window") and window is not None:
        max_window_layers = int(hf.get("max_window_layers", num_layers))
        layer_types = hf.get("layer_types") or [
            "sliding_attention" if i >= max_window_layers else "full_attention" for i in range(num_layers)]
        return tuple(int(window) if t == "sliding_attention" else None for t in layer_types)
    return (None,) * num_layers
