"""Hardware catalog: the few numbers of a GPU that a roofline cost model needs.

Peaks are the vendors' *dense* tensor-core numbers (no 2:4 sparsity). What a real kernel
achieves is kept apart in three efficiency fields so that a study can change "how good are
the kernels" without touching "what is the chip": a roofline multiplies each peak by its
efficiency. The defaults (0.8 for FLOPs and links, 0.9 for HBM) come from our own H100
measurement (bf16 GEMM 788 of 989 TFLOP/s, device copy 3.02 of 3.35 TB/s) and NCCL's usual
bus bandwidth on NVLink; ``H100-measured`` carries the measured numbers as its peaks with
efficiency 1.0, so both ways of expressing the same chip give the same answer.

``memory_bytes`` is the capacity the CUDA driver reports (``nvidia-smi`` MiB x 2**20), not
the marketing number, because KV-cache sizing starts from it.
"""
from __future__ import annotations

from dataclasses import dataclass

_GB = 1e9
_TB = 1e12
_TFLOP = 1e12
_MIB = 2**20


@dataclass(frozen=True)
class HardwareSpec:
    """One accelerator and the link between accelerators of one host.

    ``link_bandwidth`` is per direction (bytes/s) between two GPUs, which is what a ring
    all-reduce step uses; ``link_latency`` is the fixed cost of one ring step (seconds);
    ``collective_overhead`` the fixed cost of one collective call whatever its size and
    group (kernel launch and the ranks' rendezvous), which dominates small decode batches.
    ``peak_flops_fp8`` equals the bf16 peak on chips without FP8 tensor cores (A100):
    FP8 weights are then dequantized and only the memory traffic shrinks.
    """

    name: str
    peak_flops_bf16: float
    peak_flops_fp8: float
    hbm_bandwidth: float
    memory_bytes: int
    interconnect: str  # "nvlink" or "pcie"
    link_bandwidth: float
    link_latency: float
    collective_overhead: float = 8e-6
    flops_efficiency: float = 0.8
    bandwidth_efficiency: float = 0.9
    link_efficiency: float = 0.8

    def __post_init__(self) -> None:
        if self.interconnect not in ("nvlink", "pcie"):
            raise ValueError(f"HardwareSpec.interconnect must be 'nvlink' or 'pcie', got {self.interconnect!r}")
        for name in ("peak_flops_bf16", "peak_flops_fp8", "hbm_bandwidth", "memory_bytes", "link_bandwidth"):
            if getattr(self, name) <= 0:
                raise ValueError(f"HardwareSpec.{name} must be > 0, got {getattr(self, name)!r}")
        for name in ("flops_efficiency", "bandwidth_efficiency", "link_efficiency"):
            v = getattr(self, name)
            if not 0.0 < v <= 1.0:
                raise ValueError(f"HardwareSpec.{name} must be in (0, 1], got {v!r}")
        for name in ("link_latency", "collective_overhead"):
            if getattr(self, name) < 0:
                raise ValueError(f"HardwareSpec.{name} must be >= 0, got {getattr(self, name)!r}")

    def achievable_flops(self, fp8: bool = False) -> float:
        """FLOP/s a well-tuned GEMM reaches: peak x ``flops_efficiency``."""
        return (self.peak_flops_fp8 if fp8 else self.peak_flops_bf16) * self.flops_efficiency

    @property
    def achievable_bandwidth(self) -> float:
        """HBM bytes/s a streaming kernel reaches: peak x ``bandwidth_efficiency``."""
        return self.hbm_bandwidth * self.bandwidth_efficiency

    @property
    def achievable_link_bandwidth(self) -> float:
        """Per-direction GPU-to-GPU bytes/s a collective reaches."""
        return self.link_bandwidth * self.link_efficiency


# Fixed cost of one ring step: an 8-GPU all-reduce (14 steps) of a small message then costs
# ~21 us over NVLink, the order NCCL reaches; PCIe goes through the host bridge. On top, each
# collective call pays ``collective_overhead`` (default 8 us): a 2-GPU all-reduce of a few KB
# then costs 11 us. Measured: NCCL's small-message all-reduce on 2 H100s with CUDA graphs is
# ~6 us (nccl-tests, NVIDIA/nccl#1259); our TP=2 decode steps on 2 H200s (NVLS multicast
# off) imply 10.8-16.1 us per all-reduce (docs/parallel.md), against 3 us without this term.
_NVLINK_STEP_LATENCY = 1.5e-6
_PCIE_STEP_LATENCY = 10e-6

HARDWARE: dict[str, HardwareSpec] = {
    spec.name: spec
    for spec in (
        HardwareSpec(
            name="A100-80GB-SXM", peak_flops_bf16=312 * _TFLOP, peak_flops_fp8=312 * _TFLOP,
            hbm_bandwidth=2.039 * _TB, memory_bytes=81920 * _MIB, interconnect="nvlink",
            link_bandwidth=300 * _GB, link_latency=_NVLINK_STEP_LATENCY,
        ),
        HardwareSpec(
            name="H100-SXM", peak_flops_bf16=989.4 * _TFLOP, peak_flops_fp8=1978.9 * _TFLOP,
            hbm_bandwidth=3.35 * _TB, memory_bytes=81559 * _MIB, interconnect="nvlink",
            link_bandwidth=450 * _GB, link_latency=_NVLINK_STEP_LATENCY,
        ),
        # Our H100 SXM as measured: the peaks *are* the measured rates (device-to-device copy
        # 3.02 TB/s counting read + write; bf16 GEMM 788 TFLOP/s), so their efficiencies
        # are 1.0. FP8 was not measured: it keeps the data-sheet 2x ratio to bf16. The link
        # was not measured either: data-sheet NVLink with the default link efficiency.
        HardwareSpec(
            name="H100-measured", peak_flops_bf16=788 * _TFLOP, peak_flops_fp8=2 * 788 * _TFLOP,
            hbm_bandwidth=3.02 * _TB, memory_bytes=81559 * _MIB, interconnect="nvlink",
            link_bandwidth=450 * _GB, link_latency=_NVLINK_STEP_LATENCY,
            flops_efficiency=1.0, bandwidth_efficiency=1.0,
        ),
        HardwareSpec(
            name="H200", peak_flops_bf16=989.4 * _TFLOP, peak_flops_fp8=1978.9 * _TFLOP,
            hbm_bandwidth=4.8 * _TB, memory_bytes=143771 * _MIB, interconnect="nvlink",
            link_bandwidth=450 * _GB, link_latency=_NVLINK_STEP_LATENCY,
        ),
        HardwareSpec(
            name="B200", peak_flops_bf16=2250 * _TFLOP, peak_flops_fp8=4500 * _TFLOP,
            hbm_bandwidth=8.0 * _TB, memory_bytes=183359 * _MIB, interconnect="nvlink",
            link_bandwidth=900 * _GB, link_latency=_NVLINK_STEP_LATENCY,
        ),
        HardwareSpec(
            name="L40S", peak_flops_bf16=362.05 * _TFLOP, peak_flops_fp8=733 * _TFLOP,
            hbm_bandwidth=0.864 * _TB, memory_bytes=46068 * _MIB, interconnect="pcie",
            link_bandwidth=32 * _GB, link_latency=_PCIE_STEP_LATENCY,
        ),
    )
}

_ALIASES: dict[str, str] = {
    "a100": "A100-80GB-SXM", "a100-80gb": "A100-80GB-SXM", "a100-sxm": "A100-80GB-SXM",
    "h100": "H100-SXM", "h100-80gb": "H100-SXM",
    "h200-sxm": "H200", "h200-141gb": "H200",
    "b200-sxm": "B200",
}


def _key(name: str) -> str:
    return name.strip().lower().replace("_", "-").replace(" ", "-")


_LOOKUP: dict[str, str] = {_key(n): n for n in HARDWARE} | {_key(a): n for a, n in _ALIASES.items()}


def get_hardware(name: str) -> HardwareSpec:
    """Catalog entry by name or alias, ignoring case, ``_`` vs ``-`` and spaces."""
    try:
        return HARDWARE[_LOOKUP[_key(name)]]
    except KeyError:
        raise ValueError(f"unknown hardware {name!r}; known: {', '.join(HARDWARE)} "
                         f"(aliases: {', '.join(sorted(_ALIASES))})") from None
