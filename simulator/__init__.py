"""SimPy simulator backend: hardware / model catalogs, cost models, KV memory arithmetic."""
from simulator.cost_model import (
    COST_MODEL_KINDS,
    OPS,
    BatchShape,
    CalibratedCostModel,
    CostModel,
    ParallelConfig,
    RooflineCostModel,
    StepTiming,
    make_cost_model,
)
from simulator.hardware import HARDWARE, HardwareSpec, get_hardware
from simulator.memory import kv_block_bytes, num_kv_blocks
from simulator.model_spec import MODELS, ModelSpec, get_model

__all__ = [
    "COST_MODEL_KINDS", "HARDWARE", "MODELS", "OPS", "BatchShape", "CalibratedCostModel", "CostModel",
    "HardwareSpec", "ModelSpec", "ParallelConfig", "RooflineCostModel", "StepTiming", "get_hardware",
    "get_model", "kv_block_bytes", "make_cost_model", "num_kv_blocks",
]
