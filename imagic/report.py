"""Figures about a run: peak memory and the software it ran on, for summaries and benchmarks."""

import platform
import resource
import sys
from importlib.metadata import version

import torch


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_bytes(device: torch.device) -> int:
    """GPU: peak bytes allocated by torch. CPU: the process's peak resident set size."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
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
