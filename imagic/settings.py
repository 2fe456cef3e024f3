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
NO_MASK = "none"  # SampleSettings.mask: sample without an edit mask
MAX_SIDE = 16384  # any model's bound is far lower (ImagicEditor.resolution); this one only keeps numbers sane
# Sampling's numbers, bounded so that nothing they scale overflows in fp16 or fp32 (the output is still checked).
MAX_ETA = 100.0  # the paper's etas lie in 0 to 1 (past 1 the text is extrapolated); at 100 the edit is long lost
MAX_GUIDANCE = 100.0  # 1 to 20 in practice; 100 times a prediction difference of a few units stays within fp16
MAX_LORA_SCALE = 64.0  # alpha over rank: 0.5 to 2 are usual; past 64 a LoRA's update dwarfs the weights it adapts
UPPER_CONDITIONS = ("e_tgt", "e_opt")  # what a cascade's super-resolution levels are fine-tuned and sampled with


@dataclass
class StageSettings:
    """One optimisation stage: how long, how fast, with what.

    `copies`: noised copies of the photo per step, each with its own timestep and noise (Forgedit uses
    several). `stop_ratio`: stop early once the reconstruction check (optimisation.reconstruction_loss, run every
    `check_every` steps) is down to this share of its value before the first step; None runs every step.
    """

    steps: int
    learning_rate: float
    optimizer: str = "adam"
    weight_decay: float = 0.0
    copies: int = 1
    stop_ratio: float | None = None
    check_every: int = 10

    def validate(self, stage: str) -> None:
        check_int(f"{stage} steps", self.steps, 0, MAX_STEPS)
        check_real(f"{stage} learning rate", self.learning_rate, positive=True)
        check_choice(f"{stage} optimizer", self.optimizer, OPTIMIZERS)
        check_real(f"{stage} weight decay", self.weight_decay, low=0.0)
        check_int(f"{stage} copies of the photo per step", self.copies, 1, MAX_BATCH_SIZE)
        if self.stop_ratio is not None and not (check_real(f"{stage} stop ratio", self.stop_ratio, positive=True) < 1):
            raise SettingsError(f"{stage} stop ratio must be below 1 (0.5: stop once the reconstruction loss has "
                                f"halved); got {self.stop_ratio!r}")
        check_int(f"{stage} check interval", self.check_every, 1, MAX_STEPS)


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


@dataclass(frozen=True)
class SampleSettings:
    """Stage 3: how a trained edit is sampled, beside the etas and seeds. Fields left None take the model's
    defaults (ImagicEditor.defaults); ImagicEditor.check_sampling fills them and checks what needs the model.

    Where sampling starts: pure noise (the paper), the photo noised to `strength` < 1 (as SDEdit starts), or
    a DDIM inversion of the photo (`invert`). A strength left None is the model's default where the photo is
    given and not inverted (the built-in model starts from the photo), else 1. Beyond the paper (Forgedit):
    `mix` "project" instead of interpolating, and `forget` to set part of the trained weights back to the base
    model's. Beyond the paper (masks.py): `mask`, "auto" or a picture's path (white: edit), keeps the photo
    outside it ("none": no mask; None: the model's default where the photo is at hand); an automatic one is where
    the fine-tuned model's predictions under e_tgt and e_opt differ by at least `mask_threshold` of their largest
    difference, grown by `mask_grow` latent pixels.
    """

    guidance_scale: float | None = None
    guidance_rescale: float = 0.0  # Lin et al. (2023): 0 is off, 0.7 their value for zero-terminal-SNR models
    negative_prompt: str | None = None
    num_inference_steps: int | None = None
    scheduler: str | None = None  # None: the model's own
    batch_size: int = 4  # etas sampled together
    strength: float | None = None  # None: the model's default where the photo is given, else 1 (noise)
    invert: bool = False
    mix: str = "interpolate"
    forget: str = "none"
    mask: str | None = None  # "none", "auto" or a picture's path; None: the model's default
    mask_threshold: float | None = None
    mask_grow: int | None = None

    @property
    def from_photo(self) -> bool:
        return (self.strength is not None and self.strength < 1.0) or self.invert

    @property
    def needs_photo(self) -> bool:
        """A start from the photo, or a mask outside which the photo is kept."""
        return self.from_photo or self.masked

    @property
    def masked(self) -> bool:
        """An edit mask is asked for: "auto" or a picture (neither "none" nor left to the model)."""
        return self.mask not in (None, NO_MASK)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def as_recorded(cls, recorded: dict) -> "SampleSettings":
        """The settings an edit state recorded. They were complete when written, so a mask recorded as None (by
        an imagic whose models had no default mask) is no mask; an empty record (before state version 4) leaves
        every setting to the model."""
        return cls(**{**recorded, "mask": recorded.get("mask") or NO_MASK}) if recorded else cls()

    def overridden(self, given: dict) -> "SampleSettings":
        """These settings with the fields in `given` over them; a start given (a strength or invert) replaces the
        start recorded here whole, so a recorded strength never clashes with an inversion asked for."""
        start = {"strength": None, "invert": False} if given.keys() & {"strength", "invert"} else {}
        return replace(self, **{**start, **given})


def check_sampling(etas, seeds, settings: SampleSettings) -> None:
    """Stage 3's settings that need no model, checked before any work (the rest: ImagicEditor.check_sampling);
    fields still None are the model's defaults and checked there."""
    if not etas or not seeds:
        raise SettingsError("give at least one eta and one seed")
    for eta in etas:
        check_real("eta", eta, -MAX_ETA, MAX_ETA)
    for seed in seeds:
        check_int("seed", seed, 0, SEED_MAX)
    if settings.guidance_scale is not None:
        check_real("guidance scale", settings.guidance_scale, 0.0, MAX_GUIDANCE)
    rescale = settings.guidance_rescale
    if not (isinstance(rescale, numbers.Real) and 0.0 <= rescale <= 1.0):  # NaN fails too
        shown = f"{rescale:g}" if isinstance(rescale, numbers.Real) else repr(rescale)
        raise SettingsError(f"guidance_rescale is {shown}; give a value from 0 (off) to 1, e.g. 0.7")
    if settings.num_inference_steps is not None:
        check_int("inference steps", settings.num_inference_steps, 1, MAX_STEPS)
    check_int("batch size", settings.batch_size, 1, MAX_BATCH_SIZE)
    strength = settings.strength
    if strength is not None and not (isinstance(strength, numbers.Real) and 0.0 < strength <= 1.0):
        raise SettingsError(f"strength is {strength!r}; give a value above 0 and at most 1 (1: start from noise)")
    if not isinstance(settings.invert, bool):
        raise SettingsError(f"invert must be true or false; got {settings.invert!r}")
    if settings.mask is not None and not (isinstance(settings.mask, str) and settings.mask.strip()):
        raise SettingsError(f"mask must be 'none', 'auto' or a picture's path; got {settings.mask!r}")
    if settings.mask_threshold is not None:
        check_real("mask threshold", settings.mask_threshold, positive=True)
        if settings.mask_threshold > 1:
            raise SettingsError(f"mask threshold is {settings.mask_threshold:g}: give a share of the largest "
                                "difference, above 0 and at most 1, e.g. 0.5")
    if settings.mask_grow is not None:
        check_int("mask growth", settings.mask_grow, 0, 64)
    if settings.invert and strength is not None and strength < 1.0:
        raise SettingsError("give either invert or a strength below 1: the inversion starts from full strength")


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
    compile: bool = False  # torch.compile the denoiser for training (stages.prepared_for_training)
    resolution: int | tuple[int, int] | None = None  # None: the model's native size
    resize: str = "crop"
    seed: int = 0
    joint: bool = False  # stage 2 trains e_opt too, at the embedding's learning rate (Forgedit)
    # A cascade's levels above the base (DeepFloyd IF's stage II): their fine-tuning by level name (a level not
    # named is fine-tuned as the base is; 0 steps leaves it as loaded), and the embedding they are fine-tuned and
    # sampled with: e_tgt as the paper does (they barely react to the embedding), or e_opt to compare.
    upper_fine_tune: dict[str, StageSettings] = field(default_factory=dict)
    upper_condition: str = "e_tgt"

    def __post_init__(self) -> None:
        check_choice("fine-tuning method", self.method, FINE_TUNE_METHODS)
        check_choice("precision", self.precision, PRECISIONS)
        check_choice("resize rule", self.resize, RESIZE_MODES)
        check_choice("upper levels' condition", self.upper_condition, UPPER_CONDITIONS)
        if self.fine_tune is None:
            self.fine_tune = default_fine_tune(self.method)
        if not isinstance(self.upper_fine_tune, dict):
            raise SettingsError(f"upper_fine_tune must map level names to StageSettings; got {self.upper_fine_tune!r}")
        for name in self.upper_fine_tune:
            if not (isinstance(name, str) and name.isidentifier()):
                raise SettingsError(f"upper_fine_tune: {name!r} is not a level name (letters, digits, underscores)")
        upper = [(f"{name} fine-tuning", stage) for name, stage in self.upper_fine_tune.items()]
        for stage, settings in (("embedding", self.embedding), ("fine-tuning", self.fine_tune), *upper):
            if not isinstance(settings, StageSettings):
                raise SettingsError(f"{stage} settings must be StageSettings; got {settings!r}")
            settings.validate(stage)
        check_int("LoRA rank", self.lora_rank, 1, MAX_LORA_RANK)
        if self.lora_alpha is not None:
            check_real("LoRA alpha", self.lora_alpha, positive=True)
            if self.lora_alpha > MAX_LORA_SCALE * self.lora_rank:
                raise SettingsError(f"LoRA alpha {self.lora_alpha:g} over rank {self.lora_rank} scales the LoRA by more "
                                    f"than {MAX_LORA_SCALE:g}: give an alpha of at most {MAX_LORA_SCALE * self.lora_rank:g}")
        for what, flag in (("gradient checkpointing", self.gradient_checkpointing), ("joint", self.joint),
                           ("compile", self.compile)):
            if not isinstance(flag, bool):
                raise SettingsError(f"{what} must be true or false; got {flag!r}")
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

    def fine_tune_of(self, level: str, base: bool) -> StageSettings:
        """A level's fine-tuning: the base's `fine_tune`, an upper level's own entry or else the base's."""
        return self.fine_tune if base else self.upper_fine_tune.get(level, self.fine_tune)

    @classmethod
    def from_dict(cls, data: dict) -> "TrainSettings":
        data = dict(data)  # a state's header: validated like any user's settings
        data["embedding"] = StageSettings(**data["embedding"])
        data["fine_tune"] = StageSettings(**data["fine_tune"])
        data["upper_fine_tune"] = {name: StageSettings(**stage) for name, stage in data.get("upper_fine_tune", {}).items()}
        if isinstance(data.get("resolution"), list):
            data["resolution"] = tuple(data["resolution"])
        return cls(**data)
