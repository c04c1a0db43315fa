"""Triton kernels of the executor, each with a pure-torch reference (``reference``).

CUDA tensors run the Triton kernels; CPU tensors run the references unless
``TRITON_INTERPRET=1`` is set before import (see ``_dispatch``).
"""
from executor.kernels.paged_attention import choose_num_splits, paged_attention
from executor.kernels.qk_norm_rope_store import qk_norm_rope_store
from executor.kernels.rmsnorm import rms_norm
from executor.kernels.rotary import apply_rotary, rope_cos_sin_cache, rope_inv_freq
from executor.kernels.silu_mul import silu_mul
from executor.kernels.store_kv import store_kv

__all__ = [
    "apply_rotary",
    "choose_num_splits",
    "paged_attention",
    "qk_norm_rope_store",
    "rms_norm",
    "rope_cos_sin_cache",
    "rope_inv_freq",
    "silu_mul",
    "store_kv",
]
