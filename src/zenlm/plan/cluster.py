"""The machine a plan is for: GPU count, memory, peak FLOP/s, GPUs per node, link speeds.

Named GPUs carry their memory, HBM bandwidth and NVLink bandwidth; their dense peak FLOP/s
comes from zenlm.metrics.throughput's device table (the one MFU is computed against), looked up
by the name torch reports for the device. Link speeds are per GPU and per direction:

- intra-node: NVLink (H100 / H200 SXM: 450 GB/s, half of the 900 GB/s bidirectional figure;
  A100 SXM: 300 GB/s; H100 PCIe: PCIe Gen5 x16, 64 GB/s, no NVSwitch);
- inter-node: one 400 Gb/s NIC per GPU (NDR InfiniBand, rail-optimised) = 50 GB/s by default.

These are nominal numbers; collectives reach less (the cost model applies an efficiency).
"""

from __future__ import annotations

from dataclasses import dataclass

from zenlm.config.load import ConfigError
from zenlm.metrics.throughput import lookup_peak_tflops, math_mode

GIB = 1024**3


@dataclass(frozen=True)
class GpuSpec:
    """One accelerator model."""

    name: str
    device_name: str
    """As torch.cuda.get_device_name() reports it (how the peak is looked up)."""
    memory_bytes: int
    """Device memory as nvidia-smi reports it (MiB x 2**20)."""
    hbm_gb_s: float
    """Memory bandwidth, GB/s (the optimizer step is bound by it)."""
    nvlink_gb_s: float
    """Intra-node bandwidth per GPU and direction, GB/s."""

    def peak_tflops(self, precision: str) -> float:
        """Dense peak for the matmul math of `precision` (fp32 without TF32, as torch's default)."""
        value, _ = lookup_peak_tflops(self.device_name, math_mode(precision, False))
        return value


GPUS: dict[str, GpuSpec] = {
    g.name: g
    for g in (
        GpuSpec("h100-sxm", "NVIDIA H100 80GB HBM3", 81559 * 2**20, 3350.0, 450.0),
        GpuSpec("h100-pcie", "NVIDIA H100 PCIe", 81559 * 2**20, 2000.0, 64.0),
        GpuSpec("h200", "NVIDIA H200", 143771 * 2**20, 4800.0, 450.0),
        GpuSpec("a100-80g", "NVIDIA A100-SXM4-80GB", 81920 * 2**20, 2039.0, 300.0),
    )
}


@dataclass(frozen=True)
class Cluster:
    """num_gpus GPUs of one kind, gpus_per_node to a node."""

    gpu: GpuSpec
    num_gpus: int
    gpus_per_node: int
    inter_node_gb_s: float = 50.0
    """Per GPU and direction between nodes, GB/s."""
    reserve_bytes: int = 4 * GIB
    """Kept free per GPU for the CUDA context, NCCL buffers and allocator fragmentation."""
    peak_tflops_override: float | None = None
    """Dense peak TFLOP/s to use instead of the device table's."""

    def __post_init__(self) -> None:
        if self.num_gpus < 1:
            raise ConfigError(f"--gpus must be >= 1, got {self.num_gpus}")
        if self.gpus_per_node < 1:
            raise ConfigError(f"--gpus-per-node must be >= 1, got {self.gpus_per_node}")
        if self.num_gpus > self.gpus_per_node and self.num_gpus % self.gpus_per_node:
            raise ConfigError(
                f"--gpus ({self.num_gpus}) is not a multiple of --gpus-per-node "
                f"({self.gpus_per_node}): nodes hold the same number of GPUs"
            )
        if self.inter_node_gb_s <= 0 or self.gpu.nvlink_gb_s <= 0:
            raise ConfigError("link speeds must be > 0 GB/s")
        if self.peak_tflops_override is not None and self.peak_tflops_override <= 0:
            raise ConfigError(f"--peak-tflops must be > 0, got {self.peak_tflops_override}")
        if not 0 <= self.reserve_bytes < self.gpu.memory_bytes:
            raise ConfigError(
                f"--reserve-gib must be in [0, {self.gpu.memory_bytes / GIB:.1f}) GiB "
                f"(the GPU's memory), got {self.reserve_bytes / GIB:g}"
            )

    def peak_tflops(self, precision: str) -> float:
        return self.peak_tflops_override or self.gpu.peak_tflops(precision)

    @property
    def usable_bytes(self) -> int:
        return self.gpu.memory_bytes - self.reserve_bytes

    def link_gb_s(self, span_gpus: int) -> float:
        """Bandwidth of a group whose ranks lie within `span_gpus` consecutive GPUs: NVLink
        when that fits one node, else the inter-node NIC (a ring runs at its slowest link)."""
        return self.gpu.nvlink_gb_s if span_gpus <= self.gpus_per_node else self.inter_node_gb_s


def gpu_spec(
    name: str, memory_gib: float | None = None, nvlink_gb_s: float | None = None
) -> GpuSpec:
    """A named GPU, optionally with its memory or NVLink bandwidth overridden."""
    if name not in GPUS:
        raise ConfigError(f"--gpu {name!r} is not known; choose one of {', '.join(GPUS)}")
    g = GPUS[name]
    if memory_gib is not None:
        if memory_gib <= 0:
            raise ConfigError(f"--memory-gib must be > 0, got {memory_gib}")
        g = GpuSpec(g.name, g.device_name, int(memory_gib * GIB), g.hbm_gb_s, g.nvlink_gb_s)
    if nvlink_gb_s is not None:
        if nvlink_gb_s <= 0:
            raise ConfigError(f"--nvlink-gb-s must be > 0, got {nvlink_gb_s}")
        g = GpuSpec(g.name, g.device_name, g.memory_bytes, g.hbm_gb_s, nvlink_gb_s)
    return g
