"""Who an edit's base model is: its family and, per pipeline component, a hash of its config and a probe of
every weight. An edit state records it; sampling a state with a model whose identity differs is refused,
naming the component that differs.
"""

import functools
import hashlib
import json
import math

import numpy as np
import torch

from .errors import StateMismatchError

# Config entries that differ between loads of the same model (dtype, versions, where it came from).
_VOLATILE_CONFIG = {"torch_dtype", "dtype", "transformers_version", "architectures"}  # save_pretrained sets the last


def _config_digest(config: dict) -> str:
    kept = {k: v for k, v in config.items() if not k.startswith("_") and k not in _VOLATILE_CONFIG}
    return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()


def _component_config(component) -> dict:
    if hasattr(component, "get_vocab"):  # a tokenizer: its vocabulary is what the edit depends on
        return {"vocab": sorted(component.get_vocab().items()), "max_length": component.model_max_length}
    config = getattr(component, "config", None)
    if config is None and hasattr(component, "to_dict"):  # an image processor
        return component.to_dict()
    return config.to_dict() if hasattr(config, "to_dict") else dict(config or {})


# The probe's signed sums: PATTERNS fixed patterns of signs, repeating every PERIOD elements (a prime, so no shift
# that a permutation of rows or halves makes is a multiple of it: those are products of the tensor's small sides).
PATTERNS, PERIOD = 8, 65521
PROBE_LENGTHS = (4, 4 + PATTERNS)  # states before version 5 have the first 4 statistics only


@functools.lru_cache(maxsize=4)
def _signs(device: torch.device) -> torch.Tensor:
    """[PERIOD, PATTERNS] of +-1: the bits of splitmix64 of each position, the same on every machine and version."""
    z = np.arange(PERIOD, dtype=np.uint64) + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z = z ^ (z >> np.uint64(31))
    bits = (z[:, None] >> np.arange(PATTERNS, dtype=np.uint64)) & np.uint64(1)
    return torch.from_numpy(1.0 - 2.0 * bits.astype(np.float64)).to(device)


@torch.no_grad()
def _tensor_probe(tensor: torch.Tensor) -> list[float]:
    """[mean, rms, alternating mean, count, PATTERNS signed sums] over every element, in float64.

    Every weight counts (a change anywhere moves the statistics), and the values survive loading the same
    weights in fp16, bf16 or fp32 (see _probes_match). The signed sums (each weight times a sign that depends on
    its position, over the square root of the count) move when weights change places: rows reversed or halves
    swapped leave the first three statistics as they were.
    """
    flat = tensor.detach().reshape(-1)
    if not flat.is_floating_point():
        flat = flat.double()
    count = flat.numel()
    if count == 0:
        return [0.0] * PROBE_LENGTHS[-1]
    total = flat.sum(dtype=torch.float64).item()
    rms = torch.linalg.vector_norm(flat, dtype=torch.float64).item() / math.sqrt(count)
    alternating = (flat[0::2].sum(dtype=torch.float64) - flat[1::2].sum(dtype=torch.float64)).item()
    rows, rest = divmod(count, PERIOD)
    columns = torch.zeros(PERIOD, dtype=torch.float64, device=flat.device)
    if rows:
        columns += flat[: rows * PERIOD].view(rows, PERIOD).sum(0, dtype=torch.float64)
    columns[:rest] += flat[rows * PERIOD :].double()
    signed = (columns @ _signs(flat.device)) / math.sqrt(count)
    return [total / count, rms, alternating / count, float(count), *signed.tolist()]


def _probes_match(trained: list[list[float]], current: list[list[float]]) -> int | None:
    """The index of the first tensor that differs, or None.

    bf16 rounds each weight by at most 2^-9 of itself, so each statistic moves by at most that much of
    the rms, and for n random roundings by about 2^-9 / sqrt(n): the tolerance allows 8 times that.
    A signed sum is a sum of n roundings (each within 2^-8 of its weight in bf16) times signs that no weight's
    rounding follows, over sqrt(n): for either load it is within 8 * 2^-8 = 1/32 of the rms in all but 1 in
    10^13 cases (Hoeffding), so two loads' sums differ by at most 1/16 of the rms. Weights that changed places
    move a sum by about the rms: 8 sums all miss that about once in 10^12. A probe without sums (a state before
    version 5) is checked by the rest.
    """
    for index, (a, b) in enumerate(zip(trained, current)):
        if a[3] != b[3]:
            return index
        scale = max(a[1], b[1]) * (2**-6 / math.sqrt(max(a[3], 1.0)) + 2**-12) + 1e-12
        if any(abs(x - y) > scale for x, y in zip(a[:3], b[:3])):
            return index
        if any(abs(x - y) > max(a[1], b[1]) / 16 + 1e-12 for x, y in zip(a[4:], b[4:])):
            return index
    return None


def model_identity(family) -> dict:
    """Who the base model is: its family, and per pipeline component (denoiser, VAE, text encoder,
    tokenizer, scheduler, ...) a hash of its config and, for networks, a probe of every weight."""
    denoiser = family.base.denoiser
    components = {}
    for name, component in sorted(family.components.items()):
        if component is None:
            continue
        probe = []
        if isinstance(component, torch.nn.Module):
            probe = [_tensor_probe(t) for t in component.state_dict().values()]
        components[name] = {"config_sha256": _config_digest(_component_config(component)), "probe": probe}
    config = {k: v for k, v in dict(denoiser.config).items() if not k.startswith("_")}
    return {
        "family": family.name,
        "name": str(getattr(family.pipe, "name_or_path", "") or ""),  # the base pipeline's
        "denoiser_config": json.loads(json.dumps(config, default=str)),
        "components": components,
    }


def check_same_model(expected: dict, identity: dict, tensor_names: dict[str, list[str]] | None = None) -> None:
    """Refuse an edit state trained on another base model (`expected`, the state's `base_model`), naming the
    component that differs."""
    trained_on = expected.get("name") or "another model"
    if expected["family"] != identity["family"] or expected["denoiser_config"] != identity["denoiser_config"]:
        raise StateMismatchError(
            f"this edit state was trained on a different model architecture ({trained_on}): load that model to sample it"
        )
    trained, current = expected["components"], identity["components"]
    for name in sorted(set(trained) | set(current)):
        if name not in trained or name not in current or trained[name]["config_sha256"] != current[name]["config_sha256"]:
            raise StateMismatchError(
                f"this edit state was trained on a model with another {name} ({trained_on}): load that model to sample it"
            )
        a, b = trained[name]["probe"], current[name]["probe"]
        differs = 0 if len(a) != len(b) else _probes_match(a, b)
        if differs is not None:
            names = (tensor_names or {}).get(name, [])
            where = f" at {names[differs]}" if differs < len(names) else ""
            raise StateMismatchError(
                f"this edit state was trained on different weights ({trained_on}: its {name} differs{where}): "
                "load that model to sample it"
            )
