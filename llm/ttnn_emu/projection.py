"""Projected step time on Wormhole N150 / N300 from per-chip DRAM bytes and FLOPs.

This is a roofline *projection*, not a measurement: time = max(bytes / DRAM bandwidth,
FLOPs / math rate), per chip (every chip of a mesh runs its own shard of each op).
"""

from __future__ import annotations

from dataclasses import dataclass

from .accounting import StepCost


@dataclass(frozen=True)
class SystemSpec:
    """Per-chip rates of one Tenstorrent board."""

    name: str
    chips: int
    dram_peak_bytes_per_s: float
    dram_achievable_bytes_per_s: float
    flops_per_s: float


# Peak DRAM bandwidth and FP16 math rate per board: docs.tenstorrent.com/aibs/wormhole/
# specifications.html (n150: 288 GB/s, 74 TFLOPS FP16, 1 chip; n300: 576 GB/s, 131 TFLOPS FP16,
# 2 chips, so 288 GB/s and 65.5 TFLOPS per chip). Achievable DRAM bandwidth: the tech report
# (reference/llms-in-ttnn.md, section 4.7 "Data movement") measures ~240 GB/s for DRAM-sharded
# matmuls on a Wormhole chip (~190 GB/s interleaved).
N150 = SystemSpec("N150", 1, 288e9, 240e9, 74e12)
N300 = SystemSpec("N300", 2, 288e9, 240e9, 131e12 / 2)
SYSTEMS = {"N150": N150, "N300": N300}


@dataclass(frozen=True)
class Projection:
    """A projected step time, with its inputs; str() is a labelled one-line summary."""

    system: str
    seconds: float
    dram_seconds: float
    math_seconds: float
    bound: str
    dram_bytes: int
    flops: int
    bandwidth: float
    math_rate: float

    @property
    def label(self) -> str:
        """Human-readable line, explicitly marked as a projection."""
        return (
            f"PROJECTED (not measured) {self.system} step time: {self.seconds * 1e3:.3f} ms "
            f"({self.bound}-bound; {self.dram_bytes / 1e6:.2f} MB DRAM/chip at "
            f"{self.bandwidth / 1e9:.0f} GB/s, {self.flops / 1e9:.3f} GFLOP/chip at "
            f"{self.math_rate / 1e12:.1f} TFLOP/s)"
        )

    def __str__(self):
        return self.label


def project_step_time(cost: StepCost, system="N150", *, achievable: bool = True) -> Projection:
    """Project one step's time on `system` ("N150", "N300" or a SystemSpec) from its cost.

    `achievable=True` uses the tech report's measured DRAM-sharded bandwidth, else the peak.
    """
    spec = SYSTEMS[system] if isinstance(system, str) else system
    bw = spec.dram_achievable_bytes_per_s if achievable else spec.dram_peak_bytes_per_s
    dram_s = cost.dram_bytes / bw
    math_s = cost.flops / spec.flops_per_s
    return Projection(
        system=spec.name, seconds=max(dram_s, math_s), dram_seconds=dram_s, math_seconds=math_s,
        bound="DRAM" if dram_s >= math_s else "math", dram_bytes=cost.dram_bytes,
        flops=cost.flops, bandwidth=bw, math_rate=spec.flops_per_s,
    )
