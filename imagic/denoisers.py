"""Copies of the user's denoiser to train and sample with, so the loaded model is never modified.

- `frozen_view`: new modules and Parameter objects over the same storage, none trainable:
  free in memory, and gradient checkpointing or a LoRA can be switched on in it alone.
- `full_copy`: an fp32 copy of every weight, the master weights of full fine-tuning.
- `add_lora`: LoRA layers (peft) injected into a frozen view.
- `merge_lora`: a view's LoRA folded into new weights of its layers, for sampling.
- `offloaded`: the user's denoiser moved out of memory while full fine-tuning trains its copy.
- `compiled`: a training copy run through torch.compile.
"""

import contextlib
import copy
import functools
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Callable

import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from safetensors import safe_open
from safetensors.torch import save_file

from .errors import SettingsError, StateMismatchError

LORA_ADAPTER = "imagic"
COMPILE_BACKEND = "inductor"  # torch's default: C++ kernels on the CPU, Triton on CUDA

def frozen_view(model: torch.nn.Module) -> torch.nn.Module:
    """A structural copy of `model` sharing its tensors; its own parameters do not require grad."""
    memo = {id(p): torch.nn.Parameter(p.detach(), requires_grad=False) for p in model.parameters()}
    memo.update({id(b): b for b in model.buffers()})
    return copy.deepcopy(model, memo)


def full_copy(model: torch.nn.Module) -> torch.nn.Module:
    """An independent fp32 copy of `model`, every parameter trainable."""
    clone = copy.deepcopy(model).float()
    clone.requires_grad_(True)
    return clone


def add_lora(view: torch.nn.Module, rank: int, alpha: float, seed: int, *, targets: tuple[str, ...]
             ) -> torch.nn.Module:
    """Inject fp32 LoRA layers into a frozen view's `targets` (the level's lora_targets); the initialisation is
    drawn from `seed`."""
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets), init_lora_weights="gaussian")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        inject_adapter_in_model(config, view, adapter_name=LORA_ADAPTER)
    for name, param in view.named_parameters():
        if "lora_" in name:
            param.data = param.data.float()
            param.requires_grad_(True)
        else:
            param.requires_grad_(False)
    return view


def merge_lora(view: torch.nn.Module) -> torch.nn.Module:
    """Replace each LoRA layer of a frozen view by its base layer holding a new weight W + scale * B @ A (summed
    in fp32, stored in W's dtype). The shared base tensors are not written to: the loaded model stays as it was,
    and the view holds one new tensor per adapted layer. Sampling then runs plain layers: on a GPU at batch 2
    an unmerged LoRA's extra small kernels made SDXL's sampling steps 3.3x slower (docs/benchmarks.md)."""
    for name, module in list(view.named_modules()):
        if isinstance(module, LoraLayer):
            layer = module.get_base_layer()
            module.lora_A.float(), module.lora_B.float()  # B @ A in fp32, whatever dtype the LoRA was cast to
            merged = layer.weight.float() + module.get_delta_weight(LORA_ADAPTER)
            layer.weight = torch.nn.Parameter(merged.to(layer.weight.dtype), requires_grad=False)
            parent, _, child = name.rpartition(".")
            setattr(view.get_submodule(parent), child, layer)
    return view


def worth_merging(model: torch.nn.Module) -> bool:
    """Whether to sample a LoRA on `model` merged: on a CUDA GPU with room for a second copy of the model's weights
    (and some to spare), where the unmerged layers' small kernels dominate a sampling step. On the CPU they cost
    1-5% of a step and the copy would cost a model's memory; on a full GPU the copy would not fit."""
    device = next(model.parameters()).device
    if device.type != "cuda":
        return False
    free, _ = torch.cuda.mem_get_info(device)
    return free > 1.5 * sum(p.numel() * p.element_size() for p in model.parameters())


@contextlib.contextmanager
def offloaded(model: torch.nn.Module) -> Iterator[Callable[[str], torch.Tensor]]:
    """While the block runs, `model`'s weights are out of memory: in a temporary file when they are on the CPU,
    in CPU memory when on a GPU. However the block ends, the same Parameter and buffer objects get their values
    back, bit for bit. Full fine-tuning trains an fp32 copy and needs nothing of the loaded model meanwhile:
    holding both made its peak 17.0 GiB on SD 1.5's UNet at 256 px on the CPU, against 14.0 GiB for a
    pipeline that trains the model itself (docs/benchmarks.md). The file is written a piece at a time, each piece
    freed once written: serialising the whole model at once held a second copy of it (SDXL's UNet: a 20.5 GiB
    peak for 10.3 GB of weights). Yields `read(name)`: a tensor of the state dict
    as it was, read back on its own (on the CPU), for a copy built one layer at a time (memory.quantized_copy)."""
    named = model.state_dict(keep_vars=True)
    tensors = {id(t): (name, t) for name, t in named.items()}  # tied ones once
    if not tensors:
        yield lambda name: named[name].detach()
        return
    device = next(iter(tensors.values()))[1].device
    if device.type != "cpu":
        for _, tensor in tensors.values():
            tensor.data = tensor.data.to("cpu")
        try:
            yield lambda name: named[name].detach()
        finally:
            for _, tensor in tensors.values():
                tensor.data = tensor.data.to(device)
        return
    with tempfile.TemporaryDirectory(prefix="imagic-offload-") as folder:
        files: dict[str, Path] = {}  # each tensor's (saved) name -> the piece it was written to
        try:
            for number, piece in enumerate(_pieces(list(tensors.values()))):
                path = Path(folder) / f"piece-{number}.safetensors"
                save_file({name: tensor.detach().contiguous() for name, tensor in piece}, path)
                for name, tensor in piece:  # out of memory as soon as it is on disk
                    files[name] = path
                    tensor.data = torch.empty(0, dtype=tensor.dtype)
            failure = None
        except OSError as error:  # e.g. a full disk: train with the model in memory, as before
            _read_back([t for t in tensors.values() if t[0] in files], files)
            failure = error
        if failure is not None:
            warnings.warn(f"could not move the loaded model to {folder} while fine-tuning ({failure}); it stays in "
                          "memory", stacklevel=3)
            yield lambda name: named[name].detach()
            return
        names = {name: tensors[id(tensor)][0] for name, tensor in named.items()}  # a tied name: the saved one

        def read(name: str) -> torch.Tensor:
            # The file is opened for each tensor: a mapping held open would keep every page read in memory.
            with safe_open(str(files[names[name]]), framework="pt") as saved:
                return saved.get_tensor(names[name]).clone()

        try:
            yield read
        finally:
            _read_back(list(tensors.values()), files)


OFFLOAD_PIECE_BYTES = 256 << 20  # serialised a piece at a time: never a second whole copy of the model in memory


def _pieces(named: list[tuple[str, torch.Tensor]]) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """The tensors in order, in pieces of at most OFFLOAD_PIECE_BYTES (a larger tensor is a piece of its own)."""
    piece, size = [], 0
    for name, tensor in named:
        nbytes = tensor.numel() * tensor.element_size()
        if piece and size + nbytes > OFFLOAD_PIECE_BYTES:
            yield piece
            piece, size = [], 0
        piece.append((name, tensor))
        size += nbytes
    if piece:
        yield piece


def _read_back(named: list[tuple[str, torch.Tensor]], files: dict[str, Path]) -> None:
    """Each tensor's values back from the piece it was written to, into memory of its own (not the file's)."""
    for path in dict.fromkeys(files[name] for name, _ in named):
        with safe_open(str(path), framework="pt") as saved:
            for name, tensor in named:
                if files[name] == path:
                    tensor.data = saved.get_tensor(name).clone()


@functools.cache
def compile_failure(backend: str) -> str | None:
    """Why torch.compile cannot run with `backend` here (inductor on the CPU needs a C++ compiler), or None: tried
    once, on a tiny function, before a model's first step would fail deep inside its compilation."""
    try:
        torch.compile(lambda x: x * 2 + 1, backend=backend)(torch.ones(4))
    except Exception as error:  # the backends fail in many types (missing compiler, missing Triton, ...)
        lines = str(error).strip().splitlines()
        return lines[0][:300] if lines else type(error).__name__
    return None


def compiled(model: torch.nn.Module) -> torch.nn.Module:
    """`model` (a training copy or view, never the loaded model) compiled in place with torch.compile: its first calls
    compile, later ones run the compiled graph. Refused in one line where the backend cannot run."""
    failure = compile_failure(COMPILE_BACKEND)
    if failure is not None:
        raise SettingsError(f"--compile: torch.compile ({COMPILE_BACKEND}) does not work here: {failure}; train "
                            "without --compile")
    model.compile(backend=COMPILE_BACKEND)
    return model


def trained_weights(denoiser: torch.nn.Module, method: str) -> dict[str, torch.Tensor]:
    """The weights an edit changed: the LoRA matrices, or the whole state dict for full fine-tuning."""
    if method == "lora":
        return {name: p.detach() for name, p in denoiser.named_parameters() if "lora_" in name}
    return {name: t.detach() for name, t in denoiser.state_dict().items()}


def edited_denoiser(
    base: torch.nn.Module, method: str, weights: dict[str, torch.Tensor], rank: int, alpha: float,
    forgotten: Callable[[str], bool] | None = None, *, targets: tuple[str, ...], merge: bool = False,
) -> torch.nn.Module:
    """Rebuild a trained denoiser from `weights` (as `trained_weights` returned them; none: the base as loaded),
    in the base's dtype, with the weights that `forgotten` names (a level's forgetting group) set back to the
    base's. `targets`: the LoRA's target modules; `merge`: fold the LoRA into the layers' weights (`merge_lora`)."""
    if method == "none" or not weights:
        return frozen_view(base).eval()
    forgotten = forgotten or (lambda name: False)
    if method == "lora":
        model = add_lora(frozen_view(base), rank, alpha, seed=0, targets=targets)
        _check_weights({name: p for name, p in model.named_parameters() if "lora_" in name}, weights)
        # A LoRA left unloaded keeps its zero-initialised B: the layer computes the base's output.
        model.load_state_dict({k: v for k, v in weights.items() if not forgotten(k)}, strict=False)
        if merge:
            model = merge_lora(model)
    else:
        _check_weights(base.state_dict(), weights)  # before the copy: a state's mismatch costs no memory
        model = copy.deepcopy(base)
        model.load_state_dict({k: v for k, v in weights.items() if not forgotten(k)}, strict=False)
    return cast_for_sampling(model, base.dtype)


def _check_weights(expected: dict[str, torch.Tensor], weights: dict[str, torch.Tensor]) -> None:
    """An edit state's weights must be exactly the model's: same names, same shapes."""
    names = sorted(set(expected) ^ set(weights))
    if names:
        where = "missing" if names[0] in expected else "unknown"
        raise StateMismatchError(f"the edit state's weights do not match this model's layers ({where}: '{names[0]}')")
    for name, tensor in weights.items():
        if tensor.shape != expected[name].shape:
            raise StateMismatchError(f"the edit state's weight '{name}' is {list(tensor.shape)}, "
                                     f"this model's is {list(expected[name].shape)}")
    if not all(torch.isfinite(t).all() for t in weights.values()):
        raise StateMismatchError("the edit state's weights hold NaN or infinite values: train it again")


def cast_for_sampling(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """Freeze and cast to the base model's dtype: sampling after training and after loading agree exactly."""
    model.requires_grad_(False)
    for param in model.parameters():
        if param.dtype != dtype:  # per tensor: the shared base tensors are left as they are
            param.data = param.data.to(dtype)
    return model.eval()
