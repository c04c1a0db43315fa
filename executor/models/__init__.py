"""Registry of decoder implementations, keyed by the HF ``architectures`` name."""
from __future__ import annotations

from torch import nn

from executor.config import SUPPORTED_ARCHITECTURES
from executor.models.llama import LlamaForCausalLM

MODEL_REGISTRY: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": LlamaForCausalLM,
    "Qwen3ForCausalLM": LlamaForCausalLM,
}
assert set(MODEL_REGISTRY) == set(SUPPORTED_ARCHITECTURES), "config parsing and registry disagree"


def get_model_class(architecture: str) -> type[nn.Module]:
    """The class implementing ``architecture``; ``ValueError`` lists the supported ones."""
    try:
        return MODEL_REGISTRY[architecture]
    except KeyError:
        raise ValueError(f"unsupported architecture {architecture!r}; "
                         f"supported: {', '.join(MODEL_REGISTRY)}") from None
