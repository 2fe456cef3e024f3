"""Settings of an edit: one small dataclass per Imagic stage, plus the run-wide ones."""

import math
import numbers
from dataclasses import asdict, dataclass, field, replace

from .errors import SettingsError
from .image_io import RESIZE_MODES

OPTIMIZERS = ("adam", "adamw", "adamw8bit", "sgd")
FINE_TUNE_METHODS = ("full", "lora")
PRECISIONS = ("auto", "fp32", "fp16", "bf16")
# Bounds on what a setting (or a hand-edited state file) may ask for, before anything is allocated.
MAX_STEPS = 1_000_000  # every step's loss is kept in the state's header
SEED_MAX = 2**64 - 1  # what torch.Generator.manual_seed takes
TRAIN_SEED_MAX = 2**63 - 1  # stage k draws from seed 2 * seed + k, which must stay within SEED_MAX
# The widest layer of Stable Diffusion 1.x/2.x: a rank above a layer's width adds memory, not expressiveness.
MAX_LORA_RANK = 1280
MAX_BATCH_SIZE = 256
MAX_SIDE = 16384  # any model's bound is far lower (ImagicEditor.resolution); this one only keeps numbers sane


@dataclass
class StageSettings:
    """One optimisation stage: how long, how fast, with what."""

    steps: int
    learning_rate: float
    optimizer: str = "adam"
    weight_decay: float = 0.0

    def validate(self, stage: str) -> None:
        check_int(f"{stage} steps", self.steps, 0, MAX_STEPS)
        check_real(f"{stage} learning rate", self.learning_rate, positive=True)
        check_choice(f"{stage} optimizer", self.optimizer, OPTIMIZERS)
        check_real(f"{stage} weight decay", self.weight_decay, low=0.0)


def check_choice(what: str, value: str, choices: tuple[str, ...]) -> None:
    if not isinstance(value, str) or value not in choices:
        raise SettingsError(f"{what} must be one of {', '.join(choices)}; got {value!r}")


def check_int(what: str, value, low: int, high: int) -> int:
    """An integer (not a bool, not a float) from low to high."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not low <= value <= high:
        raise SettingsError(f"{what} must be a whole number from {low} to {high:,}; got {value!r}")
    return value


def check_real(what: str, value, low: float | None = None, high: float | None = None, positive: bool = False) -> float:
    """A finite number, optionally within [low, high] or above 0: NaN or inf would give black images."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (low is None or value >= low) and (high is None or value <= high) and (not positive or value > 0)
    if not ok:
        if positive:
            bounds = " above 0"
        elif low is not None and high is not None:
            bounds = f" from {low:g} to {high:g}"
        else:
            bounds = f" of at least {low:g}" if low is not None else ""
        raise SettingsError(f"{what} must be a finite number{bounds}; got {value!r}")
    return float(value)


def check_sampling(
    etas, seeds, guidance_scale: float, guidance_rescale: float, num_inference_steps: int, batch_size: int
) -> None:
    """Stage 3's settings, checked before any work (the model-dependent ones: ImagicEditor.check_sampling)."""
    if not etas or not seeds:
        raise SettingsError("give at least one eta and one seed")
    for eta in etas:
        check_real("eta", eta)
    for seed in seeds:
        check_int("seed", seed, 0, SEED_MAX)
    check_real("guidance scale", guidance_scale)
    if not (isinstance(guidance_rescale, numbers.Real) and 0.0 <= guidance_rescale <= 1.0):  # NaN fails too
        shown = f"{guidance_rescale:g}" if isinstance(guidance_rescale, numbers.Real) else repr(guidance_rescale)
        raise SettingsError(f"guidance_rescale is {shown}; give a value from 0 (off) to 1, e.g. 0.7")
    check_int("inference steps", num_inference_steps, 1, MAX_STEPS)
    check_int("batch size", batch_size, 1, MAX_BATCH_SIZE)


def default_fine_tune(method: str) -> StageSettings:
    # Full fine-tuning moves every weight, so it needs a far smaller step than a LoRA's few.
    if method == "lora":
        return StageSettings(steps=500, learning_rate=1e-4)
    return StageSettings(steps=1000, learning_rate=2e-6)


@dataclass
class TrainSettings:
    """Everything that shapes a trained edit; saved in the edit state.

    The step counts and learning rates are the ones commonly used for Imagic on
    Stable Diffusion 1.x (embedding: Adam, 1e-3, 500 steps; full fine-tuning: Adam,
    2e-6, 1000 steps).
    """

    embedding: StageSettings = field(default_factory=lambda: StageSettings(steps=500, learning_rate=1e-3))
    fine_tune: StageSettings | None = None  # None: the method's default
    method: str = "full"
    lora_rank: int = 16
    lora_alpha: float | None = None  # None: equal to the rank (scale 1)
    precision: str = "auto"
    gradient_checkpointing: bool = False
    resolution: int | tuple[int, int] | None = None  # None: the model's native size
    resize: str = "crop"
    seed: int = 0

    def __post_init__(self) -> None:
        check_choice("fine-tuning method", self.method, FINE_TUNE_METHODS)
        check_choice("precision", self.precision, PRECISIONS)
        check_choice("resize rule", self.resize, RESIZE_MODES)
        if self.fine_tune is None:
            self.fine_tune = default_fine_tune(self.method)
        for stage, settings in (("embedding", self.embedding), ("fine-tuning", self.fine_tune)):
            if not isinstance(settings, StageSettings):
                raise SettingsError(f"{stage} settings must be StageSettings; got {settings!r}")
            settings.validate(stage)
        check_int("LoRA rank", self.lora_rank, 1, MAX_LORA_RANK)
        if self.lora_alpha is not None:
            check_real("LoRA alpha", self.lora_alpha, positive=True)
        if not isinstance(self.gradient_checkpointing, bool):
            raise SettingsError(f"gradient checkpointing must be true or false; got {self.gradient_checkpointing!r}")
        check_int("training seed", self.seed, 0, TRAIN_SEED_MAX)
        if isinstance(self.resolution, tuple) and len(self.resolution) == 2:
            sides = self.resolution
        else:  # check_int refuses anything but one whole number
            sides = () if self.resolution is None else (self.resolution,)
        for side in sides:
            check_int("resolution", side, 1, MAX_SIDE)

    @property
    def lora_scale_alpha(self) -> float:
        return float(self.lora_alpha if self.lora_alpha is not None else self.lora_rank)

    def to_dict(self) -> dict:
        return asdict(self)

    def with_fine_tune_steps(self, steps: int) -> "TrainSettings":
        """A copy whose fine-tuning stage stops after `steps` (a checkpoint's settings)."""
        return replace(self, fine_tune=replace(self.fine_tune, steps=steps))

    @classmethod
    def from_dict(cls, data: dict) -> "TrainSettings":
        data = dict(data)  # a state's header: validated like any user's settings
        data["embedding"] = StageSettings(**data["embedding"])
        data["fine_tune"] = StageSettings(**data["fine_tune"])
        if isinstance(data.get("resolution"), list):
            data["resolution"] = tuple(data["resolution"])
        return cls(**data)
