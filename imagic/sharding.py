"""Stage 2 sharded over the processes of a launcher (`torchrun` or `accelerate launch`), for a full fine-tuning
that fits no single GPU.

    torchrun --nproc-per-node 2 -m imagic.cli edit photo.png "a photo of a sitting dog" --method full

Every process loads the model and runs the same stages on the same noise draws (each draws from the
training seed, as one process would). Stage 1, a few tensors, runs replicated and its e_opt is taken from
the main process. Stage 2's trained copy is sharded with FSDP2 (torch's `fully_shard`): each process holds
1/N of the fp32 master weights, of their gradients and of Adam's moments, gathers a block's weights for its
forward and backward, and the gradients are averaged across processes. Since the processes compute the same
loss, the average is the one process's gradient and the run follows the single-process run. At the end the
trained weights are gathered, and the fine-tuned denoiser is rebuilt from them as a loaded edit state is.
The command line writes outputs from the main process alone (cli.py).

Torch's API is used directly: accelerate 1.15 applies its FSDP plugin only to GPU (and other accelerator)
processes, so under it the CPU run that tests this would not be sharded (docs/benchmarks.md).
"""

import contextlib
import os
from collections.abc import Callable, Iterator

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from .errors import SettingsError

LAUNCHED_COMMANDS = ("edit", "train")  # what runs under a launcher: the commands that fine-tune


def launched() -> bool:
    """Whether a launcher started this process as one of several (it sets WORLD_SIZE)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def active() -> bool:
    """Whether stage 2 is sharded: a process group of several processes is up (a launcher's, or the caller's)."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    """How many processes train: those of the process group, or this one alone."""
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    """The process that writes: rank 0, or the only one."""
    return not active() or dist.get_rank() == 0


def local_device(device: str | None) -> str | None:
    """Under a launcher each process has a GPU of its own: 'cuda' (or no device, where CUDA is present) is
    cuda:LOCAL_RANK; any other device is kept."""
    if not launched() or not torch.cuda.is_available() or device not in (None, "cuda"):
        return device
    return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"


@contextlib.contextmanager
def processes() -> Iterator[None]:
    """Join the launcher's process group for the block (nothing when not launched): NCCL between GPUs, gloo for
    tensors on the CPU."""
    if not launched() or dist.is_initialized():
        yield
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo")
    try:
        yield
    finally:
        dist.destroy_process_group()


def check_settings(method: str) -> None:
    """Sharding serves full fine-tuning; a LoRA trains few weights over a base that every process holds whole,
    so splitting it would save nothing."""
    if active() and method != "full":
        raise SettingsError(f"several processes shard full fine-tuning only, not {method}: pass --method full, or "
                            "run a LoRA in one process")


def sharded_copy(model: torch.nn.Module) -> torch.nn.Module:
    """An fp32 copy of `model`, every weight trainable and sharded across the processes: each block (every entry of
    the outermost ModuleLists: a UNet's down and up blocks, a transformer's blocks) is its own FSDP2 unit, the
    rest is the root's. Built block by block from a view of `model` (which is not written to), so that no process
    ever holds the whole fp32 copy."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from .denoisers import frozen_view

    clone = frozen_view(model)
    clone.requires_grad_(True)
    mesh = init_device_mesh(next(model.parameters()).device.type, (dist.get_world_size(),))
    for block in _blocks(clone):
        fully_shard(block.float(), mesh=mesh)
    return fully_shard(clone.float(), mesh=mesh)


def _blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    blocks = []
    for child in model.children():
        blocks.extend(child if isinstance(child, torch.nn.ModuleList) else _blocks(child))
    return blocks


def full(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Sharded tensors gathered whole on every process (a collective: every process calls it), others as they are."""
    return {name: value.full_tensor() if isinstance(value, DTensor) else value for name, value in tensors.items()}


def from_main(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The main process's values of `tensors` on every process, so that all train on the very same e_opt."""
    if active():
        for value in tensors.values():
            dist.broadcast(value, src=0)
    return tensors


def averaged_gradients(tensors: list[torch.Tensor]) -> None:
    """Replicated trainable tensors (a joint stage 2's embedding) get the processes' mean gradient before each step,
    as the sharded weights do, so that they stay alike on every process."""
    def average(tensor: torch.Tensor) -> None:
        dist.all_reduce(tensor.grad)
        tensor.grad /= dist.get_world_size()

    if active():
        for tensor in tensors:
            tensor.register_post_accumulate_grad_hook(average)


def agreed(should_stop: Callable[[], bool]) -> Callable[[], bool]:
    """A stop request that holds in every process once it holds in any: a Ctrl-C or a caller's request may reach one
    process a step before another. Training asks it before every step, in every process alike, so all stop before
    the same step."""
    if not active():
        return should_stop

    def stop() -> bool:
        flag = torch.tensor([float(should_stop())])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    return stop
