"""What stage 3 keeps between calls: the last edit's denoisers (rebuilt from a state, or trained here) and its last
edit mask, so that sampling one edit at many etas, seeds and starts builds each once."""

import torch
from PIL import Image

from . import denoisers, stages
from .families import ModelFamily
from .settings import SampleSettings
from .state import EditState


class SamplingCache:
    """The denoisers of one state (and one forgetting group), and one edit mask of it."""

    def __init__(self, family: ModelFamily):
        self.family = family
        self._models: tuple[EditState, str, dict[str, torch.nn.Module]] | None = None
        self._mask: tuple | None = None

    def clear(self) -> None:
        """Let the kept copies go (full fine-tuning's are a whole denoiser each)."""
        self._models = self._mask = None

    def keep(self, state: EditState, trained: dict[str, torch.nn.Module]) -> None:
        """The copies training just made, ready to sample `state` (levels left as loaded are sampled as they are)."""
        self._models = (state, "none", {level.name: trained[level.name] if level.name in trained
                                         else denoisers.frozen_view(level.denoiser).eval() for level in self.family.levels})

    def denoisers(self, state: EditState, forget: str = "none") -> dict[str, torch.nn.Module]:
        """The state's denoiser per level (`forget` applies to the base's), built from its weights unless kept."""
        if self._models is None or self._models[0] is not state or self._models[1] != forget:
            self.clear()  # full copies are freed before the next are built
            settings, models = state.settings, {}
            for level in self.family.levels:
                weights = {k: v.to(self.family.device) for k, v in state.weights.get(level.name, {}).items()}
                forgotten = level.forget_groups[forget] if level is self.family.base and forget != "none" else None
                models[level.name] = denoisers.edited_denoiser(
                    level.denoiser, state.method, weights, settings.lora_rank, settings.lora_scale_alpha, forgotten,
                    targets=level.lora_targets, merge=denoisers.worth_merging(level.denoiser))
            self._models = (state, forget, models)
        return self._models[2]

    def mask(self, state: EditState, settings: SampleSettings, photo: Image.Image,
             models: dict[str, torch.nn.Module]) -> tuple[torch.Tensor, torch.Tensor]:
        """The edit mask and the photo's latents (stages.edit_mask), found once per state and request."""
        asked = (settings.mask, settings.mask_threshold, settings.mask_grow, settings.forget, photo.tobytes())
        if self._mask is None or self._mask[0] is not state or self._mask[1] != asked:
            self._mask = (state, asked, stages.edit_mask(self.family, models, state, settings, photo))
        return self._mask[2]
