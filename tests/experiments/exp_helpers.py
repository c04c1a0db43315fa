"""Helpers shared by the experiments-layer tests (a uniquely named module, because several
test folders have a conftest.py and ``import conftest`` would be ambiguous)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from hydra import compose
from omegaconf import DictConfig

import experiments.config  # noqa: F401  (registers the structured configs)

REPO = Path(__file__).resolve().parents[2]
CONF = REPO / "conf"


def compose_run(overrides: list[str], config_name: str = "config", hydra_cfg: bool = False) -> DictConfig:
    """A quick run config (progress bar off) with ``overrides``."""
    return compose(config_name, overrides=["quick=true", "progress=false", *overrides],
                   return_hydra_config=hydra_cfg)


def run_module(module: str, *args: str, cwd: Path = REPO, timeout: float = 120) -> subprocess.CompletedProcess:
    """``python -m module args`` with the repo importable, capturing output; stderr is a
    pipe, so the automatic progress bar stays off."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)
