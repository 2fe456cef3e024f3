"""The contract a model family implements: the few things Imagic needs to know about a text-to-image model.

A family says how to encode text into the embedding that Imagic optimises, how to put the image in
the denoiser's space, how to call the denoiser, how to invert and sample with a given embedding, and
which settings its models use when the user gives none. Everything else (the three stages, state
files, the CLI, the web app) is written against this contract and knows no family by name.
"""

from typing import Callable, ClassVar, Protocol

import torch
from PIL import Image

from ..defaults import ModelDefaults

Embedding = dict[str, torch.Tensor]  # what stage 1 optimises and stage 3 interpolates, by the family's names


class ModelFamily(Protocol):
    """A loaded pipeline of one family, seen through what Imagic needs of it."""

    name: ClassVar[str]  # recorded in edit states: a state of another family is refused
    defaults: ClassVar[ModelDefaults]  # the family's own, where neither the user nor the model folder says
    noise_scheduler: object  # the training schedule (a diffusers scheduler with add_noise)

    @property
    def denoiser(self) -> torch.nn.Module: ...

    @property
    def device(self) -> torch.device: ...

    def native_resolution(self) -> tuple[int, int]: ...

    def resolution_multiple(self) -> int: ...

    def encode_text(self, text: str, allow_empty: bool = False) -> Embedding: ...

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels in [-1, 1], [1, 3, H, W] -> what the denoiser denoises, fp32."""
        ...

    def predict(self, denoiser: torch.nn.Module, x_t: torch.Tensor, t: torch.Tensor, embedding: Embedding
                ) -> torch.Tensor: ...

    def invert(self, denoiser: torch.nn.Module, x0: torch.Tensor, embedding: Embedding,
               num_inference_steps: int) -> torch.Tensor: ...

    def sample(self, denoiser: torch.nn.Module, embedding: Embedding, negative_embedding: Embedding,
               generators: list[torch.Generator], *, height: int, width: int, num_inference_steps: int,
               guidance_scale: float, guidance_rescale: float, scheduler_name: str | None, progress: bool,
               callback_on_step_end: Callable | None = None, image: Image.Image | None = None,
               strength: float = 1.0, latents: torch.Tensor | None = None) -> list[Image.Image]: ...
