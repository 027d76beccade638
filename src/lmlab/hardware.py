"""What the device can do: native bfloat16 on the CPU, and peak FLOPs per second.

Peak FLOPs (dense matrix multiplication, per second) for model FLOPs utilisation:

- CUDA: looked up by the device's name in :data:`GPU_PEAK_FLOPS` (the vendors'
  datasheet figures, dense, no sparsity) for the precision the matmuls run in:
  bfloat16/float16 on the tensor cores, or plain float32 (torch's default matmul
  precision, no TF32).
- CPU: cores x clock x FLOPs per cycle per core, from ``/proc/cpuinfo`` (Linux):
  the cores are the physical cores behind the threads torch uses; the clock is
  the nominal one in the model name ("@ 2.50GHz"), else the kernel's maximum
  (``cpufreq/cpuinfo_max_freq``), else the "cpu MHz" it reports; FLOPs per cycle
  come from the widest vector instructions the flags list (:data:`CPU_FLOPS_PER_CYCLE`),
  assuming two FMA units per core, so the figure is an upper bound on parts with one.
- Anything else (or a CPU whose flags or clock cannot be read): unknown; the caller
  reports no MFU and asks for ``--peak-flops``.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

# name fragment (matched in order, case-insensitive) -> (bfloat16/float16 FLOP/s, float32 FLOP/s)
GPU_PEAK_FLOPS: tuple[tuple[str, float, float], ...] = (
    ("H100 PCIe", 756e12, 51e12),
    ("H100", 989e12, 67e12),      # SXM
    ("H200", 989e12, 67e12),
    ("A100", 312e12, 19.5e12),
    ("L40S", 362e12, 91.6e12),
    ("L4", 121e12, 30.3e12),
    ("A10", 125e12, 31.2e12),
    ("RTX 4090", 165.2e12, 82.6e12),
    ("RTX 3090", 71e12, 35.6e12),
    ("V100", 125e12, 15.7e12),    # float16 only (no bfloat16 tensor cores)
    ("T4", 65e12, 8.1e12),        # float16 only
)

# float32 FLOPs per cycle per core: 2 (multiply-add) x vector lanes x 2 FMA units
CPU_FLOPS_PER_CYCLE: tuple[tuple[str, int], ...] = (
    ("avx512f", 64),   # 16 lanes (AMD Zen 4 runs them on 256-bit units: 32)
    ("avx2+fma", 32),  # 8 lanes
    ("avx", 16),       # 8 lanes, separate multiply and add
)
# bfloat16 matmul FLOPs per cycle per core
CPU_BF16_FLOPS_PER_CYCLE: tuple[tuple[str, int], ...] = (
    ("amx_bf16", 1024),    # one AMX tile multiply unit
    ("avx512_bf16", 128),  # VDPBF16PS: twice the float32 rate
)


@dataclass(frozen=True)
class PeakFlops:
    """Peak FLOPs per second of a device (None: unknown) and how the figure was found."""

    flops: float | None
    source: str


def cpu_info() -> str:
    """The text of /proc/cpuinfo ('' where there is none)."""
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def cpu_flags(info: str | None = None) -> set[str]:
    """The instruction-set flags of the first CPU in /proc/cpuinfo (``info``: its text)."""
    info = cpu_info() if info is None else info
    match = re.search(r"^(?:flags|Features)\s*:\s*(.*)$", info, re.M)
    return set(match.group(1).split()) if match else set()


def native_bfloat16(flags: set[str] | None = None) -> str | None:
    """The CPU instructions that compute in bfloat16 natively ('amx_bf16' or 'avx512_bf16'),
    or None where the CPU has neither (autocast to bfloat16 would then be emulated, slower
    than float32)."""
    flags = cpu_flags() if flags is None else flags
    for name in ("amx_bf16", "avx512_bf16"):
        if name in flags:
            return name
    return None


def _vector_unit(flags: set[str], bfloat16: bool) -> tuple[str, int] | None:
    if bfloat16:
        for name, per_cycle in CPU_BF16_FLOPS_PER_CYCLE:
            if name in flags:
                return name, per_cycle
        return None
    for name, per_cycle in CPU_FLOPS_PER_CYCLE:
        if all(part in flags for part in name.split("+")):
            return name, per_cycle
    return None


def cpu_clock_ghz(info: str) -> float | None:
    """The nominal clock: the model name's "@ 2.50GHz", else cpuinfo_max_freq, else "cpu MHz"."""
    match = re.search(r"^model name\s*:.*@\s*([0-9.]+)\s*GHz", info, re.M)
    if match:
        return float(match.group(1))
    try:
        return int(Path("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq").read_text()) / 1e6
    except (OSError, ValueError):
        pass
    match = re.search(r"^cpu MHz\s*:\s*([0-9.]+)", info, re.M)
    return float(match.group(1)) / 1000 if match else None


def cpu_physical_cores(info: str, threads: int) -> int:
    """Physical cores behind ``threads`` threads (hyper-threads share a core's vector units)."""
    siblings = re.search(r"^siblings\s*:\s*(\d+)", info, re.M)
    cores = re.search(r"^cpu cores\s*:\s*(\d+)", info, re.M)
    per_core = 1
    if siblings and cores and int(cores.group(1)) > 0:
        per_core = max(1, int(siblings.group(1)) // int(cores.group(1)))
    return max(1, -(-threads // per_core))


def cpu_peak_flops(bfloat16: bool, threads: int | None = None, info: str | None = None) -> PeakFlops:
    """Peak FLOP/s of the CPU cores behind ``threads`` torch threads (default: torch's),
    float32 or ``bfloat16`` (see the module's docstring for the formula)."""
    info = cpu_info() if info is None else info
    if threads is None:
        available = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        threads = min(torch.get_num_threads(), available)
    precision = "bfloat16" if bfloat16 else "float32"
    unit = _vector_unit(cpu_flags(info), bfloat16)
    clock = cpu_clock_ghz(info)
    if unit is None or clock is None:
        missing = f"no {precision} vector unit in the CPU flags" if unit is None else "no clock in /proc/cpuinfo"
        return PeakFlops(None, f"unknown ({missing}): pass --peak-flops")
    cores = cpu_physical_cores(info, threads)
    name, per_cycle = unit
    return PeakFlops(cores * clock * 1e9 * per_cycle,
                     f"cpu: {cores} cores x {clock:g} GHz x {per_cycle} FLOP/cycle ({name}, {precision})")


def gpu_peak_flops(name: str, half: bool) -> PeakFlops:
    """Peak FLOP/s of the GPU called ``name`` from :data:`GPU_PEAK_FLOPS`, half precision or float32."""
    for fragment, half_flops, float32_flops in GPU_PEAK_FLOPS:
        if fragment.lower() in name.lower():
            flops = half_flops if half else float32_flops
            return PeakFlops(flops, f"table: {fragment}, {'bfloat16/float16' if half else 'float32'}")
    return PeakFlops(None, f"unknown GPU {name!r} (not in lmlab.hardware.GPU_PEAK_FLOPS): pass --peak-flops")


def peak_flops(device: torch.device, dtype: torch.dtype, given: float | None = None) -> PeakFlops:
    """Peak FLOP/s of ``device`` for matmuls in ``dtype``; ``given`` (--peak-flops) wins."""
    if given is not None:
        if not given > 0:
            raise ValueError(f"peak_flops={given} must be a positive number of FLOPs per second, e.g. 1.5e11")
        return PeakFlops(float(given), "given (--peak-flops)")
    half = dtype in (torch.bfloat16, torch.float16)
    if device.type == "cuda":
        return gpu_peak_flops(torch.cuda.get_device_name(device), half)
    if device.type == "cpu":
        return cpu_peak_flops(bfloat16=half)
    return PeakFlops(None, f"unknown for device {str(device)!r}: pass --peak-flops")


def autocast_dtype(requested: str, device: torch.device, flags: set[str] | None = None) -> tuple[torch.dtype, str]:
    """The dtype training autocasts its matmuls to, and why: ``requested`` is "auto",
    "float32" or "bfloat16". "auto" takes bfloat16 on CUDA, and on a CPU with native
    bfloat16 instructions (:func:`native_bfloat16`); float32 elsewhere."""
    if requested == "float32":
        return torch.float32, "float32 (asked for)"
    if requested == "bfloat16":
        return torch.bfloat16, "bfloat16 autocast (asked for)"
    if requested != "auto":
        raise ValueError(f"dtype={requested!r}; accepted: 'auto', 'float32', 'bfloat16'")
    if device.type == "cuda":
        return torch.bfloat16, "bfloat16 autocast (auto: CUDA)"
    if device.type == "cpu":
        native = native_bfloat16(flags)
        if native is not None:
            return torch.bfloat16, f"bfloat16 autocast (auto: the CPU has {native})"
        return torch.float32, "float32 (auto: the CPU has no native bfloat16, neither amx_bf16 nor avx512_bf16)"
    return torch.float32, f"float32 (auto: device {device.type})"
