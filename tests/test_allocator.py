"""Training on the CPU: glibc gives freed activations back instead of keeping them resident (imagic.allocator)."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]

# Forward and backward passes through a stack of linear layers, as a training step does, in a fresh process: the
# peak resident memory over the steps, in MiB, with glibc's threshold left to rise or fixed by imagic.
STEPS = """
import sys, torch
torch.set_num_threads(1)
if sys.argv[1] == "fixed":
    from imagic.allocator import keep_freed_memory_returned
    assert keep_freed_memory_returned()
def peak():
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:")) / 1024
torch.manual_seed(0)
layers = [m for _ in range(8) for m in (torch.nn.Linear(1024, 1024), torch.nn.GELU())]
model = torch.nn.Sequential(*layers).requires_grad_(False)
x = torch.randn(1024, 1024, requires_grad=True)
open("/proc/self/clear_refs", "w").write("5")
start = peak()
for _ in range(4):
    model(x).square().mean().backward()
print(peak() - start)
"""


def _peak_mib(mode: str) -> float:
    done = subprocess.run([sys.executable, "-c", STEPS, mode], capture_output=True, text=True, cwd=ROOT,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}, timeout=300)
    assert done.returncode == 0, done.stderr
    return float(done.stdout.split()[-1])


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists() or not sys.platform.startswith("linux"),
                    reason="measures the peak resident set through Linux's /proc")
def test_a_fixed_threshold_keeps_the_training_peak_to_what_the_steps_hold():
    risen, fixed = _peak_mib("rising"), _peak_mib("fixed")
    # Each step holds 8 layers' inputs and outputs (4 MiB each) at once: about 64 MiB, as the fixed run peaks.
    assert fixed < 100 and fixed < 0.75 * risen, (fixed, risen)


def test_a_threshold_the_user_set_is_left_alone(monkeypatch):
    from imagic import allocator

    monkeypatch.setattr(allocator, "_done", False)
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    assert allocator.keep_freed_memory_returned() is False
