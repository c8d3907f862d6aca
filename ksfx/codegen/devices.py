"""Ceilings to count a kernel's floor with: bytes over bandwidth, FLOPs over the rate of its unit.

Each number names where it comes from; measured beats datasheet beats assumption, and a
number marked as an assumption is there only until a GPU run measures it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Rate:
    flops: float  # FLOP/s
    source: str


@dataclass(frozen=True)
class Device:
    name: str
    capability: int  # sm_<capability>
    sms: int
    bandwidth: float  # bytes/s, read + written (device-to-device copy)
    bandwidth_source: str
    rates: dict[str, Rate]  # by unit: see unit_of


_HOPPER_RATES = {
    "wgmma16": Rate(780e12, "bf16 8192^3 matmul measured on an H200 (H100 chip), device tool KINDS.md 2026-11-04"),
    "wgmma_tf32": Rate(390e12, "half the 16-bit wgmma rate (the datasheet's ratio); not measured"),
    "mma16": Rate(390e12, "assumption: mma.sync at half the wgmma rate on Hopper; not measured"),
    "mma_tf32": Rate(195e12, "assumption: half the 16-bit mma.sync rate; not measured"),
    "ffma": Rate(67e12, "fp32 FMA, H100/H200 SXM datasheet"),
}

DEVICES = {
    "H100": Device(
        "H100",
        90,
        132,
        2.95e12,
        "device copy measured by benchmarks/gpu_kernel_check.py, results/gpu_kernel_check_h100_2026-11-23.json",
        _HOPPER_RATES,
    ),
    "H200": Device("H200", 90, 132, 4.3e12, "device copy measured, device tool KINDS.md 2026-11-04", _HOPPER_RATES),
}


def named(gpu: str) -> Device:
    """The ceilings to plan with on the GPU ``torch.cuda.get_device_name`` calls ``gpu``:
    H200's where the name says H200, else H100's (the part the kernels are checked for)."""
    return DEVICES["H200"] if "H200" in gpu.upper() else DEVICES["H100"]


#: Most shared memory one block may use (bytes, opted in), by compute capability: the CUDA C++
#: Programming Guide's technical specifications per compute capability. A kernel over it
#: fails to launch (Triton's ``OutOfResources``), though it compiles.
SHARED_PER_BLOCK = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}


def unit_of(hgmma: int, hmma: int, dtype: str) -> str:
    """The unit a kernel's products run on, from its SASS: wgmma, mma.sync or fp32 FMA."""
    wide = "16" if dtype in ("float16", "bfloat16") else "_tf32"
    if hgmma:
        return "wgmma" + wide
    if hmma:
        return "mma" + wide
    return "ffma"


def roofline_seconds(device: Device, bytes_moved: int, flops: int, unit: str) -> float:
    """``max(bytes / bandwidth, FLOPs / rate)``: the least time the kernel can take."""
    return max(bytes_moved / device.bandwidth, flops / device.rates[unit].flops)
