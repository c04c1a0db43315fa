"""Fixtures: tiny random-weight models in HF layout, loaded by our loader and by transformers.

Each family case is written once per session (fp32, std 0.1 so attention is far from
uniform and RoPE / masking mistakes move the logits well above the tolerance).
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from executor.loader import LoadedModel, load_model
from executor.make_random_model import write_random_model

TEST_STD = 0.1

# name -> (architecture, config overrides on that family's tiny shape)
FAMILY_CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "llama3-rope": ("LlamaForCausalLM", {}),
    "llama-tied-bias-linear-rope": ("LlamaForCausalLM", {
        "tie_word_embeddings": True, "attention_bias": True, "mlp_bias": True,
        "rope_scaling": {"rope_type": "linear", "factor": 2.0}}),
    "mistral-sliding-window": ("MistralForCausalLM", {"sliding_window": 8}),
    "qwen2-qkv-bias": ("Qwen2ForCausalLM", {}),
    "qwen2-sliding-upper-layers": ("Qwen2ForCausalLM", {
        "use_sliding_window": True, "sliding_window": 8, "max_window_layers": 1}),
    "qwen3-qk-norm-tied": ("Qwen3ForCausalLM", {}),
    "qwen3-untied-mqa": ("Qwen3ForCausalLM", {"tie_word_embeddings": False, "num_key_value_heads": 1}),
}


@dataclass
class FamilyCase:
    name: str
    path: Path
    ours: LoadedModel
    hf: Any  # transformers PreTrainedModel


def _load_hf(path: Path) -> Any:
    """The transformers reference: eager attention in fp32, so differences are ours."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()


@pytest.fixture(scope="session")
def load_hf() -> Callable[[Path], Any]:
    """``load_hf(model_dir)``: the HF reference model (a fixture, so tests need not import
    this conftest as a module)."""
    return _load_hf


@pytest.fixture(scope="session")
def make_tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """``make_tiny_model(arch, overrides=None, **write_kwargs) -> dir`` in a fresh tmp dir."""

    def make(arch: str, overrides: dict[str, Any] | None = None, **kwargs: Any) -> Path:
        kwargs = {"dtype": "float32", "std": TEST_STD} | kwargs
        out = tmp_path_factory.mktemp(arch)
        return write_random_model(out, arch, "tiny", overrides=overrides, **kwargs)

    return make


@pytest.fixture(scope="session", params=list(FAMILY_CASES), ids=list(FAMILY_CASES))
def family_case(request: pytest.FixtureRequest, make_tiny_model: Callable[..., Path]) -> FamilyCase:
    arch, overrides = FAMILY_CASES[request.param]
    path = make_tiny_model(arch, overrides)
    return FamilyCase(name=request.param, path=path, ours=load_model(path), hf=_load_hf(path))


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread() -> Iterator[None]:
    """Tiny matmuls on a shared 2-core CI box: OpenMP spinning across threads costs ~50x."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
