"""Settings of an edit: one small dataclass per Imagic stage, plus the run-wide ones."""

from dataclasses import asdict, dataclass, field, replace

from .errors import SettingsError
from .image_io import RESIZE_MODES

OPTIMIZERS = ("adam", "adamw", "adamw8bit", "sgd")
FINE_TUNE_METHODS = ("full", "lora")
PRECISIONS = ("auto", "fp32", "fp16", "bf16")


@dataclass
class StageSettings:
    """One optimisation stage: how long, how fast, with what."""

    steps: int
    learning_rate: float
    optimizer: str = "adam"
    weight_decay: float = 0.0

    def validate(self, stage: str) -> None:
        if self.steps < 0:
            raise SettingsError(f"{stage} steps must be 0 or more, got {self.steps}")
        if not self.learning_rate > 0:
            raise SettingsError(f"{stage} learning rate must be positive, got {self.learning_rate}")
        _check_choice(f"{stage} optimizer", self.optimizer, OPTIMIZERS)


def _check_choice(what: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise SettingsError(f"{what} must be one of {', '.join(choices)}; got {value!r}")


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
        _check_choice("fine-tuning method", self.method, FINE_TUNE_METHODS)
        _check_choice("precision", self.precision, PRECISIONS)
        _check_choice("resize rule", self.resize, RESIZE_MODES)
        if self.fine_tune is None:
            self.fine_tune = default_fine_tune(self.method)
        self.embedding.validate("embedding")
        self.fine_tune.validate("fine-tuning")
        if self.lora_rank < 1:
            raise SettingsError(f"LoRA rank must be at least 1, got {self.lora_rank}")

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
        data = dict(data)
        data["embedding"] = StageSettings(**data["embedding"])
        data["fine_tune"] = StageSettings(**data["fine_tune"])
        if isinstance(data.get("resolution"), list):
            data["resolution"] = tuple(data["resolution"])
        return cls(**data)
