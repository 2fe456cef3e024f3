"""Whether a training step on several noised copies of the photo fits in memory, checked before it allocates.

Every copy is a batch row through the denoiser: its activations, kept for the backward pass, grow with the
copies times the latent's size, and at 256 copies of a 256 px photo they outgrow most machines. The step's
forward pass is run once on a single copy with torch's saved-tensor hooks counting (not keeping) what autograd
saves, the kept activations that scale with the copies; the gradients and optimiser state of the trained
weights come on top. A step that would need more than the memory free to this process (the machine's, or a
limit set on the process or its container; on a GPU, its free memory) is refused in one line saying how many
copies fit.
"""

import resource
from pathlib import Path
from typing import Callable

import psutil
import torch

from . import sharding
from .errors import SettingsError

# A step's peak over the activations it saves (the backward pass's gradients, the attention's workspace, the
# optimiser's update): 2.75x to 2.9x, measured on the built-in model at 64 to 256 px with 16 copies (LoRA, CPU).
HEADROOM = 3.0
GIB = 1 << 30


def check_step_fits(loss: Callable[[int, torch.Generator], torch.Tensor], copies: int, denoiser: torch.nn.Module,
                    optimizer: torch.optim.Optimizer, x0: torch.Tensor) -> None:
    """Refuse `copies` noised copies per step when the step they make would not fit in the memory free now.
    `loss(count, generator)` is the step's forward pass on `count` copies."""
    free = free_bytes(x0.device)
    if free is None or sharding.active():  # sharded weights, gathered a block at a time, would count as activations
        return
    weights = [p for group in optimizer.param_groups for p in group["params"] if p.requires_grad]
    states = 0 if isinstance(optimizer, torch.optim.SGD) else 2  # Adam's two moments
    fixed = sum(p.numel() * 4 for p in weights) * (1 + states)  # fp32 gradients and optimiser state
    per_copy = HEADROOM * _saved_bytes(lambda: loss(1, torch.Generator().manual_seed(0)), denoiser)
    needed = fixed + copies * per_copy
    if needed <= free:
        return
    fitting = max(0, int((free - fixed) // per_copy)) if per_copy else copies
    side = "x".join(str(n) for n in x0.shape[-2:])
    advice = f"at most {fitting} fit (--copies {fitting})" if fitting else "lower --resolution"
    raise SettingsError(f"{copies} noised copies per step of a {side} latent need about {needed / GIB:.1f} GiB, and "
                        f"{free / GIB:.1f} GiB is free: {advice}")


def _saved_bytes(forward: Callable[[], torch.Tensor], denoiser: torch.nn.Module) -> int:
    """The bytes autograd saves for the backward pass of `forward()` (the weights themselves left out), each
    tensor's memory counted once; nothing is kept, so the pass holds little more than one layer at a time."""
    # A quantized weight (memory.quantized_copy) is a tensor subclass without a storage of its own: not counted.
    weights = {t.untyped_storage().data_ptr() for t in (*denoiser.parameters(), *denoiser.buffers())
               if type(t.data) is torch.Tensor}
    seen: set[int] = set()
    total = 0

    def pack(tensor: torch.Tensor) -> None:
        nonlocal total
        if type(tensor.data) is not torch.Tensor:  # a quantized weight, saved as it is held
            return
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in seen and storage.data_ptr() not in weights:
            seen.add(storage.data_ptr())
            total += storage.nbytes()

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda _: None):
        forward()
    return total


def free_bytes(device: torch.device) -> int | None:
    """The memory this process can still allocate on `device`: a GPU's free memory (and what torch holds unused),
    else the least of the machine's available memory, the address-space limit's room and the container's."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    if device.type != "cpu":
        return None
    limits = [psutil.virtual_memory().available]
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft != resource.RLIM_INFINITY:  # prlimit --as, ulimit -v: counted in address space, not in use
        limits.append(soft - psutil.Process().memory_info().vms)
    container = _cgroup_room()
    if container is not None:
        limits.append(container)
    return max(0, min(limits))


def _cgroup_room() -> int | None:
    """The room under this process's cgroup (v2) memory limit, where one is set."""
    try:
        group = Path("/proc/self/cgroup").read_text().strip().split("::", 1)[1]
        folder = Path("/sys/fs/cgroup") / group.lstrip("/")
        limit = (folder / "memory.max").read_text().strip()
        if limit == "max":
            return None
        return int(limit) - int((folder / "memory.current").read_text())
    except (OSError, IndexError, ValueError):
        return None
