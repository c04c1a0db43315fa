"""Load a local Hugging Face model directory into an executor model.

A model directory holds ``config.json``, the weights as one ``*.safetensors`` file or as
shards listed by ``model.safetensors.index.json``, and optionally tokenizer files. Weights
are streamed one tensor at a time into a model materialized without initialization
(built on the meta device, then ``to_empty``), so peak host memory stays near one tensor.
"""
from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from executor.config import ModelConfig
from executor.models import get_model_class

_INDEX_FILE = "model.safetensors.index.json"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json")


@dataclass
class LoadedModel:
    """A ready-to-run model with what the runner needs beside it."""

    model: nn.Module
    config: ModelConfig
    tokenizer: Any | None  # a transformers tokenizer when the directory ships one
    path: Path


def read_hf_config(path: str | Path) -> dict[str, Any]:
    """The raw ``config.json`` of a model directory, with errors that name the path."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"model path {path} is not a directory")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{path} is not a Hugging Face model directory: no config.json")
    with config_file.open() as f:
        return json.load(f)


def load_config(path: str | Path, dtype: str | torch.dtype | None = None) -> ModelConfig:
    """Parse a model directory's config (``dtype`` overrides the checkpoint's)."""
    path = Path(path)
    try:
        return ModelConfig.from_hf(read_hf_config(path), dtype)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


def safetensors_files(path: str | Path) -> list[Path]:
    """The weight files of a model directory: the index's shards, or every ``*.safetensors``."""
    path = Path(path)
    index_file = path / _INDEX_FILE
    if index_file.is_file():
        with index_file.open() as f:
            shard_names = sorted(set(json.load(f)["weight_map"].values()))
        missing = [n for n in shard_names if not (path / n).is_file()]
        if missing:
            raise FileNotFoundError(f"{path}: shards listed in {_INDEX_FILE} are missing: {missing}")
        return [path / n for n in shard_names]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{path} has no *.safetensors weights (only safetensors checkpoints are supported)")
    return files


def iter_safetensors(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, CPU tensor) one at a time, so only one tensor is resident."""
    for file in files:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


def load_tokenizer(path: str | Path) -> Any | None:
    """``AutoTokenizer`` for the directory if it ships tokenizer files, else ``None``
    (random-weight test models have none; the engine then works on token ids only)."""
    path = Path(path)
    if not any((path / name).is_file() for name in _TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer  # heavy import, only when there is a tokenizer

    return AutoTokenizer.from_pretrained(str(path))


def load_model(path: str | Path, dtype: str | torch.dtype | None = None,
               device: str | torch.device = "cpu", tp: Any | None = None) -> LoadedModel:
    """Build the model for ``path`` in ``dtype`` (default: the checkpoint's) on ``device``.

    ``tp`` (an ``executor.parallel.state.TPGroup`` of more than one rank): build and load only
    this rank's tensor-parallel shard; ``LoadedModel.config`` is then the shard's config (local
    head counts and intermediate size, the full vocabulary)."""
    path = Path(path)
    config = load_config(path, dtype)
    files = safetensors_files(path)
    sharded = tp is not None and tp.world_size > 1
    with torch.device("meta"):
        model_cls = get_model_class(config.architecture)
        model = model_cls(config, tp=tp) if sharded else model_cls(config)
    model = model.to(dtype=config.dtype).to_empty(device=device)
    model.init_buffers()
    try:
        model.load_weights(iter_safetensors(files))
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    model.requires_grad_(False).eval()  # inference only: no autograd graphs, in-place kernels allowed
    if sharded:
        config = model.shard_config
    return LoadedModel(model=model, config=config, tokenizer=load_tokenizer(path), path=path)
