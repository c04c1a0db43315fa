"""The real executor: loader, paged-KV models, Triton kernels, model runner, offline LLM API.

Importing ``executor`` is cheap (no torch); the public names load on first use::

    from executor import LLM, SamplingParams
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "LLM": "executor.llm",
    "GenerationOutput": "executor.llm",
    "RequestMetrics": "executor.llm",
    "RealBackend": "executor.backend",
    "create_engine": "executor.backend",
    "ModelRunner": "executor.model_runner",
    "run_online": "executor.online",
    "OnlineResult": "executor.online",
    "load_model": "executor.loader",
    "SamplingParams": "core.sampling_params",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'executor' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
