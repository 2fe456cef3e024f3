"""The contract a model family implements: the few things Imagic needs to know about a text-to-image model.

A family is a set of **levels**: each trainable denoiser is one (Stable Diffusion: its UNet; a cascade
such as DeepFloyd IF: the base model and its super-resolution stages). A level says how to put the
photo in its denoiser's space at its own size, which extra inputs its denoiser takes, how to call it
for the training loss, what LoRA adapts in it, and which of its trained tensors Forgedit's forgetting
sets back. The family says how to encode text (into the embedding Imagic optimises, and what travels
beside it unchanged), how to invert and sample, which settings its models use when the user gives
none, how a single-file checkpoint of it is recognised, and how to build a tiny pipeline of it for
tests. Everything else (the three stages, state files, the CLI, the web app) is written against this
contract and knows no family by name.
"""

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ClassVar, Protocol

import torch
from PIL import Image

from ..defaults import ModelDefaults
from ..settings import SampleSettings
from .forgetting import ForgetGroups

Embedding = dict[str, torch.Tensor]  # what stage 1 optimises and stage 3 interpolates, by the family's names


@dataclass
class Text:
    """An encoded text: the `embedding` Imagic optimises and interpolates (fp32), and `extras` that travel beside
    it unchanged (a text attention mask, ids), under the names the family's denoiser and pipeline take."""

    embedding: Embedding
    extras: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class SamplingJob:
    """One batch of stage 3 for a family's `sample`: an image per row of `embedding` (the base level's
    conditioning, with the target text's `extras`), each from its own generator; a cascade's upper levels are
    conditioned on `upper_embedding` (one row, repeated). `settings` is complete (the model's defaults filled
    in). Where it starts: from noise, from `latents` (an inversion), or with `photo` (the fitted photo trained on)
    and a strength below 1 from the photo noised to that strength. `trained_levels`: the levels whose weights
    the edit changed. With a `mask` (1: edit, 0: keep, at the base level's latent size) the base level's loop
    keeps the photo (`x0`, its latents there) outside it (masks.py)."""

    denoisers: dict[str, torch.nn.Module]
    embedding: Embedding
    extras: dict[str, torch.Tensor]
    upper_embedding: Embedding
    negative: Text
    generators: list[torch.Generator]
    settings: SampleSettings
    height: int
    width: int
    photo: Image.Image | None = None
    latents: torch.Tensor | None = None
    trained_levels: frozenset[str] = frozenset()
    progress: bool = True
    callback_on_step_end: Callable | None = None
    mask: torch.Tensor | None = None
    x0: torch.Tensor | None = None

    @property
    def from_photo(self) -> bool:
        return self.photo is not None and self.settings.strength < 1.0

    @property
    def batch(self) -> int:
        return len(self.generators)


class Level(Protocol):
    """One trainable denoiser of a family. The first of a family's levels is its base: stage 1 optimises the
    embedding there, and stage 2 fine-tunes it with e_opt; later levels are fine-tuned with e_tgt (the paper's
    choice for Imagen's super-resolution models) unless the settings say otherwise."""

    name: str  # the key of its weights in edit states: letters, digits and underscores
    scale: int  # its side over the base level's (1 for the base; IF's stage II: 4)
    noise_scheduler: object  # the training schedule (a diffusers scheduler with add_noise)
    lora_targets: tuple[str, ...]  # the module names LoRA adapts
    forget_groups: ForgetGroups  # Forgedit's forgetting at sampling, by group name: which trained tensors go back

    @property
    def denoiser(self) -> torch.nn.Module: ...

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels in [-1, 1], [1, 3, H, W] at this level's size -> what its denoiser denoises, fp32."""
        ...

    def pipeline_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents as `encode_image` gives them, [B, C, h, w], in the layout the pipeline's denoising loop holds
        them (e.g. FLUX's 2x2 packing): where a mask blends the photo in."""
        ...

    def conditions(self, photo: torch.Tensor, count: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """The denoiser's inputs beside x_t, t and the text for `count` noised copies, drawn from `generator`
        where they are random; `photo` is the photo's pixels at the base level's size. Empty for a base level. On
        the CPU: the trainer moves them to where it trains (optimisation.Batch)."""
        ...

    def predict(self, denoiser: torch.nn.Module, x_t: torch.Tensor, t: torch.Tensor, embedding: Embedding,
                conditions: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """What the loss compares with the training target: the prediction channels (a learned variance's
        channels are left out). `conditions` holds the level's own inputs and the text's extras."""
        ...


class ModelFamily(Protocol):
    """A loaded pipeline (or cascade of pipelines) of one family, seen through what Imagic needs of it."""

    name: ClassVar[str]  # recorded in edit states: a state of another family is refused
    defaults: ClassVar[ModelDefaults]  # the family's own, where neither the user nor the model folder says
    inverts: ClassVar[bool]  # whether `invert` gives a start that `sample` takes as `latents`
    takes_negative_prompt: ClassVar[bool]  # False: guidance without a negative pass (FLUX's distilled guidance)
    # A part of a tensor name that only this family's original single-file checkpoints have (None: none, or the
    # family that single files fall back to).
    single_file_marker: ClassVar[str | None]
    # Tiny pipelines of the family built from configs with random weights, by kind ("sd1", ...): for tests.
    tiny_pipelines: ClassVar[dict[str, Callable[[Path], object]]]
    levels: tuple[Level, ...]  # the base first

    @property
    def base(self) -> Level: ...

    @property
    def device(self) -> torch.device: ...

    @property
    def components(self) -> dict[str, object]:
        """Every pipeline component by a unique name: what an edit state's model identity covers."""
        ...

    def native_resolution(self) -> tuple[int, int]: ...

    def resolution_multiple(self) -> int: ...

    def encode_text(self, text: str, allow_empty: bool = False) -> Text: ...

    def invert(self, denoiser: torch.nn.Module, x0: torch.Tensor, embedding: Embedding,
               num_inference_steps: int) -> torch.Tensor: ...

    def sample(self, job: SamplingJob) -> list[Image.Image]:
        """One image per row of `job.embedding`, as the job says (SamplingJob)."""
        ...
