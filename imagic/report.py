"""Figures about a run: peak memory and the software it ran on, for summaries and benchmarks."""

import platform
import resource
import sys
from importlib.metadata import version

import torch


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak: on the GPU torch's counter; on Linux the process's peak resident set (VmHWM)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")  # 5 resets the peak resident set size to the current one (Linux 4.0+)
    except OSError:
        pass  # elsewhere the peak is the process's whole life


def peak_memory_bytes(device: torch.device) -> int:
    """GPU: peak bytes allocated by torch. CPU: the process's peak resident set size since the last reset."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    try:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(peak if sys.platform == "darwin" else peak * 1024)  # macOS reports bytes, Linux KiB


def _cpu_name() -> str:
    """The processor's model name (platform.processor() is empty on Linux), with the threads torch uses."""
    name = platform.processor()
    try:
        with open("/proc/cpuinfo") as info:
            name = next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), name)
    except OSError:
        pass
    return f"{name or 'unknown'}, {torch.get_num_threads()} threads"


def environment(device: torch.device) -> dict:
    """The device and library versions a figure was measured with."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name()
    packages = ("torch", "diffusers", "transformers", "peft", "accelerate")
    return {"device": f"{device.type}: {name}", "python": platform.python_version(),
            **{p: version(p) for p in packages}}
