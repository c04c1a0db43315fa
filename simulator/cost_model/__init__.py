"""Cost models behind one interface, picked by name with ``make_cost_model``."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from simulator.cost_model.base import OPS, BatchShape, CostModel, StepTiming
from simulator.cost_model.calibrated import PROFILE_FORMAT, CalibratedCostModel, PiecewiseLinear
from simulator.cost_model.parallel import ParallelConfig, p2p_send_time, ring_allreduce_time
from simulator.cost_model.roofline import DEFAULT_CPU_OVERHEAD_S, RooflineCostModel
from simulator.hardware import HardwareSpec
from simulator.model_spec import ModelSpec, normalize_model_name

COST_MODEL_KINDS: tuple[str, ...] = ("roofline", "calibrated")


def make_cost_model(kind: str, model: ModelSpec, hardware: HardwareSpec, tp: int = 1, pp: int = 1,
                    **kw: Any) -> CostModel:
    """Build a cost model by name (what a Hydra ``backend`` config selects).

    ``roofline`` takes ``cpu_overhead`` and ``num_microbatches``; ``calibrated`` needs
    ``profile`` (a JSON path or an already loaded dict) measured for this model at this
    ``tp`` / ``pp``, and rejects one that was measured for another.
    """
    parallel = ParallelConfig(tp=tp, pp=pp, num_microbatches=kw.pop("num_microbatches", 1))
    kind_key = kind.strip().lower()
    if kind_key == "roofline":
        return RooflineCostModel(model, hardware, parallel, **kw)
    if kind_key == "calibrated":
        profile = kw.pop("profile", None)
        if profile is None:
            raise ValueError("cost model 'calibrated' needs profile=<path to a profile JSON>")
        if kw:
            raise ValueError(f"cost model 'calibrated' got unexpected options {sorted(kw)}")
        parallel.validate(model)
        cm = (CalibratedCostModel(profile) if isinstance(profile, dict)
              else CalibratedCostModel.from_file(Path(profile)))
        if (cm.tp, cm.pp) != (tp, pp):
            raise ValueError(f"profile was measured at tp={cm.tp}, pp={cm.pp}, not tp={tp}, pp={pp}")
        if cm.model_name and normalize_model_name(cm.model_name) != normalize_model_name(model.name):
            raise ValueError(f"profile was measured for {cm.model_name!r}, not {model.name!r}")
        return cm
    raise ValueError(f"unknown cost model kind {kind!r}; known: {', '.join(COST_MODEL_KINDS)}")


__all__ = [
    "COST_MODEL_KINDS", "DEFAULT_CPU_OVERHEAD_S", "OPS", "PROFILE_FORMAT", "BatchShape",
    "CalibratedCostModel", "CostModel", "ParallelConfig", "PiecewiseLinear", "RooflineCostModel",
    "StepTiming", "make_cost_model", "p2p_send_time", "ring_allreduce_time",
]
