"""Model families: the contract (contract.py), what they share about schedules (schedules.py), and one
module per family. Adding a family is one new module and one line in FAMILIES."""

from diffusers import DiffusionPipeline

from ..errors import ModelLoadError, SettingsError
from .contract import Embedding, Level, ModelFamily, SamplingJob, Text
from .deepfloyd_if import DeepFloydIFFamily
from .flux import FluxFamily
from .qwen_image import QwenImageFamily
from .schedules import SCHEDULER_ALIASES, FlowMatchingSchedule, draw_timesteps, make_scheduler, training_target
from .sd3 import StableDiffusion3Family
from .sdxl import StableDiffusionXLFamily
from .stable_diffusion import StableDiffusionFamily

# The pipeline class each family adapts, in the order they are tried (a subclass before its base).
FAMILIES: tuple[tuple[str, type], ...] = (
    ("StableDiffusionXLPipeline", StableDiffusionXLFamily),
    ("StableDiffusionPipeline", StableDiffusionFamily),
    ("IFPipeline", DeepFloydIFFamily),
    ("StableDiffusion3Pipeline", StableDiffusion3Family),
    ("FluxPipeline", FluxFamily),
    ("QwenImagePipeline", QwenImageFamily),
)
CASCADES = (DeepFloydIFFamily,)  # the families that take a super-resolution stage

__all__ = ["Embedding", "FAMILIES", "FlowMatchingSchedule", "Level", "ModelFamily", "SCHEDULER_ALIASES", "SamplingJob",
           "Text", "draw_timesteps", "family_class", "family_named", "family_for", "make_scheduler", "training_target"]


def family_class(pipeline_class_name: str) -> type | None:
    """The family of a pipeline class, by the name a model folder's model_index.json gives it."""
    return next((family for name, family in FAMILIES if name == pipeline_class_name), None)


def family_named(name: str) -> type | None:
    """The family an edit state names (its `name`), or None."""
    return next((family for _, family in FAMILIES if family.name == name), None)


def family_for(pipe: DiffusionPipeline, super_resolution: DiffusionPipeline | None = None) -> ModelFamily:
    """The adapter for a loaded pipeline (and a cascade's super-resolution stage), or a clear error for one not
    supported yet."""
    import diffusers

    for name, family in FAMILIES:
        pipeline_class = getattr(diffusers, name, None)  # None: a pipeline this diffusers does not have
        if pipeline_class is not None and isinstance(pipe, pipeline_class):
            if family in CASCADES:
                return family(pipe, super_resolution)
            if super_resolution is not None:
                raise SettingsError(f"{type(pipe).__name__} has no super-resolution stage: a super-resolution model "
                                    "is for a cascade such as DeepFloyd IF (stage II)")
            return family(pipe)
    supported = ", ".join(name for name, _ in FAMILIES)
    raise ModelLoadError(f"{type(pipe).__name__} is not supported yet; supported pipelines: {supported}")
