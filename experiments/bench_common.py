"""What the executor benchmarks share: H100 reference rates, where random models live and
how they are written quickly, and the environment block every result JSON starts with.

The rates are the yardsticks the floors are computed against, so they live in one place:
a benchmark that used a different bandwidth than another would make their "fraction of
floor" columns incomparable.
"""
from __future__ import annotations

import datetime as dt
import json
import os
import platform
import shutil
import subprocess
import time
from pathlib import Path

BANDWIDTH = 3.0e12  # bytes/s, device-to-device copy on the H100 (read + write)
PEAK_FLOPS = 790e12  # bf16 FLOP/s large GEMMs reach on Hopper (device notes for the H200, same tensor cores as the H100 SXM; datasheet 989)


def models_root() -> str:
    """Where random models are written: $SERVELAB_MODELS, else RAM-backed /dev/shm when it
    has room (writing 16 GB to a slow VM disk costs minutes), else /tmp."""
    if os.environ.get("SERVELAB_MODELS"):
        return os.environ["SERVELAB_MODELS"]
    try:
        if shutil.disk_usage("/dev/shm").free > 24e9:
            return "/dev/shm/servelab-models"
    except OSError:
        pass
    return "/tmp/servelab-models"


def default_model_dir(shape: str) -> str:
    """One directory per catalog shape, so benchmarks of the same shape share the weights
    (the 16 GB Llama-3.1-8B is written once per machine)."""
    return os.path.join(models_root(), f"{shape}-random-bf16")


def commit_id() -> str:
    """The checkout's short commit ($SERVELAB_COMMIT wins: device copies have no .git)."""
    if os.environ.get("SERVELAB_COMMIT"):
        return os.environ["SERVELAB_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10, check=False)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def write_random_model_fast(out_dir: Path, shape: str, seed: int = 0, std: float = 0.02,
                            max_shard_bytes: int = 5 * 10**9) -> None:
    """``executor.make_random_model.write_random_model`` (bf16, same layout, names, shapes,
    sharding and init recipe), drawing the numbers on the GPU: the CPU generator needs
    minutes for 8B. ``config.json`` is written last, so its presence marks a complete model."""
    import torch
    from safetensors.torch import save_file

    from executor.config import ModelConfig
    from executor.make_random_model import _shard, checkpoint_shapes, hf_config_for

    hf = hf_config_for(None, shape)
    hf["torch_dtype"] = "bfloat16"
    config = ModelConfig.from_hf(hf)
    out_dir.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator(device="cuda").manual_seed(seed)
    shards = _shard(checkpoint_shapes(config), torch.bfloat16.itemsize, max_shard_bytes)
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    weight_map, total = {}, 0
    for file_name, shard in zip(names, shards):
        tensors = {}
        for name, shp in shard:
            t = torch.randn(shp, generator=generator, device="cuda", dtype=torch.bfloat16)
            t = t.mul_(0.1).add_(1.0) if name.endswith("norm.weight") else t.mul_(std)
            tensors[name] = t.cpu()
            weight_map[name] = file_name
            total += t.nbytes
        save_file(tensors, str(out_dir / file_name), metadata={"format": "pt"})
        del tensors
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    (out_dir / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
    torch.cuda.empty_cache()


def ensure_model(model_dir: str, shape: str) -> Path:
    """Write a random-weight bf16 ``shape`` model to ``model_dir`` unless one is there."""
    import torch

    path = Path(model_dir)
    if not (path / "config.json").is_file():
        t = time.perf_counter()
        if torch.cuda.is_available():
            write_random_model_fast(path, shape)
        else:
            from executor.make_random_model import write_random_model

            write_random_model(path, shape=shape, dtype="bfloat16")
        print(f"wrote random {shape} to {path} in {time.perf_counter() - t:.1f} s", flush=True)
    return path


def environment() -> dict[str, object]:
    """Device, library versions, date and commit: what a result needs to be compared later."""
    import torch
    import triton

    return {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu",
        "torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda,
        "python": platform.python_version(), "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": commit_id(),
    }


def write_result(path: str | Path, result: dict[str, object]) -> Path:
    """Write a result JSON (creating its folder); returns the path."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    return out
