"""The contract a model family implements: the few things Imagic needs to know about a text-to-image model.

A family is a set of **levels**: each trainable denoiser is one (Stable Diffusion: its UNet; a cascade
such as DeepFloyd IF: the base model and its super-resolution stages). A level says how to put the
photo in its denoiser's space at its own size, which extra inputs its denoiser takes, and how to call
it for the training loss. The family says how to encode text into the embedding that Imagic
optimises, how to invert and sample with given embeddings, and which settings its models use when the
user gives none. Everything else (the three stages, state files, the CLI, the web app) is written
against this contract and knows no family by name.
"""

from typing import Callable, ClassVar, Protocol

import torch
from PIL import Image

from ..defaults import ModelDefaults
from .forgetting import ForgetGroups

Embedding = dict[str, torch.Tensor]  # what stage 1 optimises and stage 3 interpolates, by the family's names


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

    def conditions(self, photo: torch.Tensor, count: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """The denoiser's inputs beside x_t, t and the text for `count` noised copies, drawn from `generator`
        where they are random; `photo` is the photo's pixels at the base level's size. Empty for a base level."""
        ...

    def predict(self, denoiser: torch.nn.Module, x_t: torch.Tensor, t: torch.Tensor, embedding: Embedding,
                conditions: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """What the loss compares with the training target: the prediction channels (a learned variance's
        channels are left out)."""
        ...


class ModelFamily(Protocol):
    """A loaded pipeline (or cascade of pipelines) of one family, seen through what Imagic needs of it."""

    name: ClassVar[str]  # recorded in edit states: a state of another family is refused
    defaults: ClassVar[ModelDefaults]  # the family's own, where neither the user nor the model folder says
    inverts: ClassVar[bool]  # whether `invert` gives a start that `sample` takes as `latents`
    takes_negative_prompt: ClassVar[bool]  # False: guidance without a negative pass (FLUX's distilled guidance)
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

    def encode_text(self, text: str, allow_empty: bool = False) -> Embedding: ...

    def invert(self, denoiser: torch.nn.Module, x0: torch.Tensor, embedding: Embedding,
               num_inference_steps: int) -> torch.Tensor: ...

    def sample(self, denoisers: dict[str, torch.nn.Module], embedding: Embedding, upper_embedding: Embedding,
               negative_embedding: Embedding, generators: list[torch.Generator], *, height: int, width: int,
               num_inference_steps: int, guidance_scale: float, guidance_rescale: float, scheduler_name: str | None,
               progress: bool, callback_on_step_end: Callable | None = None, image: Image.Image | None = None,
               strength: float = 1.0, latents: torch.Tensor | None = None,
               trained_levels: frozenset[str] = frozenset()) -> list[Image.Image]:
        """One image per row of `embedding` (the base level's conditioning), each from its own generator; the
        later levels are conditioned on `upper_embedding` (one row, repeated). `denoisers` by level name;
        `trained_levels`: those whose weights an edit changed."""
        ...
