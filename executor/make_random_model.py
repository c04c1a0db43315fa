"""Write random-weight models in Hugging Face layout (config.json + safetensors).

Serving studies need real *shapes* (memory, FLOPs, KV size), not real weights, and tests
need tiny models that transformers can load too. Catalog shapes use the published
``config.json`` values of each model; ``tiny-*`` shapes are test-sized. Tensors are
generated one at a time directly in the target dtype and written shard by shard, so an
8B model never needs more host memory than one shard.

    python -m executor.make_random_model --shape Qwen3-0.6B --dtype bfloat16 --out DIR
"""
from __future__ import annotations

import argparse
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from executor.config import ModelConfig, parse_dtype
from executor.models import get_model_class

DEFAULT_MAX_SHARD_BYTES = 5 * 10**9  # transformers' save_pretrained default ("5GB")

_LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}

# Published config.json values (architecture-relevant keys) of the catalog models.
CATALOG: dict[str, dict[str, Any]] = {
    "Llama-3.1-8B": {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128256,
        "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
        "num_attention_heads": 32, "num_key_value_heads": 8, "hidden_act": "silu",
        "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
        "rope_scaling": _LLAMA3_ROPE, "attention_bias": False, "mlp_bias": False,
        "tie_word_embeddings": False, "bos_token_id": 128000, "eos_token_id": 128001,
    },
    "Llama-3.2-1B": {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128256,
        "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
        "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64, "hidden_act": "silu",
        "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
        "rope_scaling": {**_LLAMA3_ROPE, "factor": 32.0}, "attention_bias": False, "mlp_bias": False,
        "tie_word_embeddings": True, "bos_token_id": 128000, "eos_token_id": 128001,
    },
    "Mistral-7B": {  # Mistral-7B-v0.3 (v0.1 differs: vocab 32000, sliding_window 4096, theta 1e4)
        "architectures": ["MistralForCausalLM"], "model_type": "mistral", "vocab_size": 32768,
        "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
        "num_attention_heads": 32, "num_key_value_heads": 8, "hidden_act": "silu",
        "max_position_embeddings": 32768, "rms_norm_eps": 1e-5, "rope_theta": 1000000.0,
        "sliding_window": None, "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2,
    },
    "Qwen2.5-7B": {
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "vocab_size": 152064,
        "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
        "num_attention_heads": 28, "num_key_value_heads": 4, "hidden_act": "silu",
        "max_position_embeddings": 131072, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
        "sliding_window": 131072, "use_sliding_window": False, "max_window_layers": 28,
        "tie_word_embeddings": False, "bos_token_id": 151643, "eos_token_id": 151643,
    },
    "Qwen3-0.6B": {
        "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "vocab_size": 151936,
        "hidden_size": 1024, "intermediate_size": 3072, "num_hidden_layers": 28,
        "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 128, "hidden_act": "silu",
        "max_position_embeddings": 40960, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
        "rope_scaling": None, "attention_bias": False, "sliding_window": None,
        "use_sliding_window": False, "max_window_layers": 28, "tie_word_embeddings": True,
        "bos_token_id": 151643, "eos_token_id": 151645,
    },
}

_TINY_DIMS: dict[str, Any] = {
    "vocab_size": 512, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "hidden_act": "silu",
    "max_position_embeddings": 512, "bos_token_id": 1, "eos_token_id": 2,
}
# Test-sized shapes that keep each family's distinguishing features.
CATALOG |= {
    "tiny-llama": {"architectures": ["LlamaForCausalLM"], "model_type": "llama", **_TINY_DIMS,
                   "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
                   # original context 256 < 512 positions, and with head_dim 16 the 8 frequencies
                   # fall in all three llama3 bands (kept, smoothed, divided by factor).
                   "rope_scaling": {**_LLAMA3_ROPE, "original_max_position_embeddings": 256},
                   "tie_word_embeddings": False},
    "tiny-mistral": {"architectures": ["MistralForCausalLM"], "model_type": "mistral", **_TINY_DIMS,
                     "rms_norm_eps": 1e-5, "rope_theta": 1000000.0, "sliding_window": None,
                     "tie_word_embeddings": False},
    "tiny-qwen2": {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", **_TINY_DIMS,
                   "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "use_sliding_window": False,
                   "tie_word_embeddings": False},
    "tiny-qwen3": {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", **_TINY_DIMS,
                   "head_dim": 32, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
                   "attention_bias": False, "use_sliding_window": False, "tie_word_embeddings": True},
}
_TINY_BY_ARCH = {cfg["architectures"][0]: name for name, cfg in CATALOG.items() if name.startswith("tiny-")}


def hf_config_for(arch: str | None, shape: str | Mapping[str, Any],
                  overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The config.json dict for a catalog shape (or ``"tiny"`` of ``arch``) plus overrides.

    ``shape`` may also be a mapping of overrides on the tiny shape of ``arch``.
    """
    if not isinstance(shape, str):
        overrides = {**shape, **(overrides or {})}
        shape = "tiny"
    if shape == "tiny":
        if arch not in _TINY_BY_ARCH:
            raise ValueError(f"shape 'tiny' needs an architecture, one of {sorted(_TINY_BY_ARCH)}; got {arch!r}")
        shape = _TINY_BY_ARCH[arch]
    if shape not in CATALOG:
        raise ValueError(f"unknown shape {shape!r}; known: {', '.join(CATALOG)}")
    config = json.loads(json.dumps(CATALOG[shape]))  # deep copy
    if arch is not None and arch != config["architectures"][0]:
        raise ValueError(f"shape {shape!r} is a {config['architectures'][0]}, not {arch}")
    return config | dict(overrides or {})


def checkpoint_shapes(config: ModelConfig) -> list[tuple[str, tuple[int, ...]]]:
    """HF checkpoint tensor names and shapes for ``config``, in checkpoint order.

    Read off the model itself (built on the meta device, so no memory), so the writer and
    the loader can never disagree; summing the shapes gives the parameter count.
    """
    with torch.device("meta"):
        model = get_model_class(config.architecture)(config)
    return [(name, (rows, *param.shape[1:])) for name, (param, _, rows) in model.checkpoint_targets().items()]


def _shard(plan: list[tuple[str, tuple[int, ...]]], itemsize: int,
           max_shard_bytes: int) -> list[list[tuple[str, tuple[int, ...]]]]:
    """Greedy split of the tensors into shards of at most ``max_shard_bytes`` (a single
    larger tensor gets a shard of its own), keeping checkpoint order."""
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in plan:
        nbytes = itemsize * torch.Size(shape).numel()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nbytes
    return shards


def write_random_model(out_dir: str | Path, arch: str | None = None, shape: str | Mapping[str, Any] = "tiny",
                       dtype: str | torch.dtype = "bfloat16", seed: int = 0, *,
                       overrides: Mapping[str, Any] | None = None, std: float = 0.02,
                       max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> Path:
    """Write ``config.json`` and random weights for a shape; returns ``out_dir``.

    Linear, embedding and bias weights are N(0, std); RMSNorm weights are 1 + N(0, 0.1)
    (not all ones, so a swapped or dropped norm weight changes the outputs). The same
    arguments always give the same bytes. More than ``max_shard_bytes`` of weights are
    split into ``model-0000i-of-0000n.safetensors`` with ``model.safetensors.index.json``.
    """
    hf = hf_config_for(arch, shape, overrides)
    torch_dtype = parse_dtype(dtype)
    hf["torch_dtype"] = str(torch_dtype).removeprefix("torch.")
    config = ModelConfig.from_hf(hf)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(hf, indent=2) + "\n")

    generator = torch.Generator().manual_seed(seed)
    shards = _shard(checkpoint_shapes(config), torch_dtype.itemsize, max_shard_bytes)
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    weight_map: dict[str, str] = {}
    total_bytes = 0
    for file_name, shard in zip(names, shards):
        tensors: dict[str, torch.Tensor] = {}
        for name, shape_ in shard:
            t = torch.randn(shape_, generator=generator, dtype=torch_dtype)
            if name.endswith("norm.weight"):
                tensors[name] = t.mul_(0.1).add_(1.0)
            else:
                tensors[name] = t.mul_(std)
            weight_map[name] = file_name
            total_bytes += t.nbytes
        save_file(tensors, str(out / file_name), metadata={"format": "pt"})
    if len(shards) > 1:
        index = {"metadata": {"total_size": total_bytes}, "weight_map": weight_map}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", required=True, help=f"one of {', '.join(CATALOG)}, or 'tiny' with --arch")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--arch", default=None, help="HF architecture (needed for --shape tiny)")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--std", type=float, default=0.02)
    parser.add_argument("--max-shard-gb", type=float, default=DEFAULT_MAX_SHARD_BYTES / 1e9)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=JSON",
                        help="override a config.json key, e.g. --set num_hidden_layers=4")
    args = parser.parse_args(argv)
    overrides = {}
    for item in args.set:
        key, _, value = item.partition("=")
        overrides[key] = json.loads(value)
    out = write_random_model(args.out, args.arch, args.shape, args.dtype, args.seed, overrides=overrides,
                             std=args.std, max_shard_bytes=int(args.max_shard_gb * 1e9))
    print(out)


if __name__ == "__main__":
    main()
