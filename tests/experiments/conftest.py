"""Fixtures for the experiments-layer tests: Hydra's compose API on the repo's conf/, and
small input files for the presets that need one (a BurstGPT CSV, a calibrated profile).

Every run here is ``quick`` (a couple of dozen requests) and the progress bar stays off,
so the whole folder runs in well under a minute on two cores.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import pytest
from exp_helpers import CONF
from hydra import initialize_config_dir


@pytest.fixture(scope="module")
def hydra_conf() -> Iterator[None]:
    """Hydra initialized on conf/ for the module's compose() calls."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        yield


@pytest.fixture(scope="session")
def burstgpt_csv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 40-row BurstGPT-format trace (BurstGPT itself is not shipped)."""
    path = tmp_path_factory.mktemp("traces") / "burstgpt.csv"
    rows = ["Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type"]
    rows += [f"{0.5 * i},ChatGPT,{100 + 7 * i},{20 + i},{120 + 8 * i},Conversation log" for i in range(40)]
    path.write_text("\n".join(rows) + "\n")
    return path


@pytest.fixture(scope="session")
def calibrated_profile(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A made-up servelab-profile-v1 for Llama-3.1-8B at tp=1 (plausible H100 magnitudes)."""
    tokens = [1, 128, 1024, 8192]
    gemm = [20e-6 + 3e-7 * t for t in tokens]
    decode = [(b, b * c) for b in (1, 64, 256) for c in (128, 4096)]
    prefill = [(n, L) for n in (16, 512, 4096) for L in (n, n + 4096)]
    profile = {
        "format": "servelab-profile-v1", "model": "Llama-3.1-8B", "hardware": "H100-measured", "tp": 1, "pp": 1,
        "per_token_ops": {"num_tokens": tokens, "qkv_proj": gemm, "o_proj": [g / 2 for g in gemm],
                          "mlp": [3 * g for g in gemm]},
        "lm_head": {"num_rows": [1, 256], "seconds": [300e-6, 500e-6]},
        "sampling": {"num_rows": [1, 256], "seconds": [50e-6, 150e-6]},
        "attn_decode": {"batch": [b for b, _ in decode], "total_context": [c for _, c in decode],
                        "seconds": [10e-6 + 2e-7 * b + 4e-11 * c for b, c in decode]},
        "attn_prefill": {"chunk_tokens": [n for n, _ in prefill], "context_len": [L for _, L in prefill],
                         "seconds": [30e-6 + 1e-8 * n + 2e-10 * L + 3e-13 * n * L for n, L in prefill]},
        "overhead": {"eager_s": 4e-3, "graph_s": 1e-3, "graph_max_batch": 128},
    }
    path = tmp_path_factory.mktemp("profiles") / "llama8b_tp1.json"
    path.write_text(json.dumps(profile))
    return path
