"""Per-model defaults: what an edit uses for every setting the user leaves out.

`STABLE_DIFFUSION` is the recipe commonly used for Imagic on SD 1.x; every family's own defaults are changes
to it, written in the family's module. A model folder may carry its own in `imagic_defaults.json` (the
built-in shapes model does: the settings benchmarks/quality.py chose from its figures), which win over its
family's.
"""

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from .settings import NO_MASK, StageSettings, TrainSettings, default_fine_tune

DEFAULTS_FILE = "imagic_defaults.json"


@dataclass(frozen=True)
class ModelDefaults:
    method: str
    embedding: StageSettings
    fine_tune: dict[str, StageSettings] = field(hash=False)  # per fine-tuning method
    etas: tuple[float, ...]
    guidance_scale: float
    num_inference_steps: int
    strength: float = 1.0  # with the photo at hand, start sampling from it noised to this strength (1: noise)
    mask: str = NO_MASK  # with the photo at hand, keep it outside this edit mask ("auto": found by the model)
    mask_threshold: float = 0.5  # the automatic mask's (SampleSettings)
    mask_grow: int = 1
    gpu_dtype: str = "fp16"  # the dtype a model loads in on a GPU ("bf16": models trained in it, where supported)

    @property
    def eta(self) -> float:
        """The one eta to use when only one is wanted (`imagic batch`): the middle of `etas`."""
        return self.etas[len(self.etas) // 2]

    def but(self, **changes) -> "ModelDefaults":
        """These defaults with some settings changed: how a family writes its own."""
        return replace(self, **changes)

    def start_strength(self, with_photo: bool, invert: bool) -> float:
        """The strength for a sampling start left out: this model's where the photo is at hand and not inverted,
        else 1 (pure noise, or the inversion's full strength)."""
        return self.strength if with_photo and not invert else 1.0

    def start_mask(self, with_photo: bool) -> str:
        """The edit mask for a mask left out: this model's where the photo is at hand (the mask keeps it), else
        none."""
        return self.mask if with_photo else NO_MASK

    def train_settings(self, method: str | None = None, **overrides) -> TrainSettings:
        """TrainSettings with this model's stage settings for `method` (default: the model's method)."""
        method = method or self.method
        return TrainSettings(embedding=replace(self.embedding), fine_tune=replace(self.fine_tune[method]),
                             method=method, **overrides)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "ModelDefaults":
        data = {key: value for key, value in data.items() if key in cls.__dataclass_fields__}
        return cls(**{**data, "embedding": StageSettings(**data["embedding"]), "etas": tuple(data["etas"]),
                      "fine_tune": {method: StageSettings(**stage) for method, stage in data["fine_tune"].items()}})


STABLE_DIFFUSION = ModelDefaults(
    method="full",
    embedding=TrainSettings().embedding,
    fine_tune={m: default_fine_tune(m) for m in ("full", "lora")},
    etas=(0.6, 0.7, 0.8),
    guidance_scale=7.5,
    num_inference_steps=50,
)


def folder_defaults(folder: str | Path) -> ModelDefaults | None:
    """The defaults a model folder carries in DEFAULTS_FILE, or None where it carries none."""
    path = Path(folder) / DEFAULTS_FILE
    if not path.is_file():
        return None
    return ModelDefaults.from_dict(json.loads(path.read_text()))
