"""The `imagic` command's options, parsed once into what the commands run on: a `Request` holding the training
and sampling settings (TrainSettings, SampleSettings), how to load the model, and the paths.

An option left out takes the default of the dataclass it fills, or of the model the command will load (its
folder's or its family's: `defaults_before_loading`); the help shows those of that model (`imagic edit
--model FOLDER --help`).
"""

import argparse
import math
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

from .batch import LIST_FILE
from .defaults import ModelDefaults
from .errors import SettingsError
from .families import SCHEDULER_ALIASES
from .image_io import RESIZE_MODES
from .loading import BUILTIN_NAME, defaults_before_loading
from .memory import QUANTIZE_CHOICES, MemorySettings
from .settings import FINE_TUNE_METHODS, OPTIMIZERS, PRECISIONS, UPPER_CONDITIONS, SampleSettings, StageSettings, TrainSettings
from .stages import MIXES

DTYPES = ("fp32", "fp16", "bf16")


@dataclass(frozen=True)
class Loading:
    """How the command loads its model (ImagicEditor.from_pretrained's options)."""

    model: str | None = None  # None: the state's model for sample and export, else the built-in one
    config: str | None = None
    super_resolution: str | None = None
    allow_pickle: bool = False
    device: str | None = None
    dtype: str | None = None


@dataclass
class Request:
    """What one command line asks for. `train` and `sample` are None for commands that do not train or sample
    (`sample`: the settings given, over SampleSettings' defaults); `etas` and `seeds` are stage 3's; `paths` holds
    the command's files and folders by their option names."""

    command: str
    loading: Loading = field(default_factory=Loading)
    train: TrainSettings | None = None
    memory: MemorySettings = field(default_factory=MemorySettings)  # training's memory levers (not recorded)
    sample: SampleSettings | None = None
    etas: list[float] = field(default_factory=list)
    seeds: list[int] = field(default_factory=lambda: [0])
    super_resolution_steps: int | None = None
    sample_given: dict = field(default_factory=dict)  # the sampling settings given on the command line
    paths: dict[str, Path] = field(default_factory=dict)
    target_text: str | None = None
    overwrite: bool = False
    quiet: bool = False
    options: dict = field(default_factory=dict)  # the rest, by option name: batch's --ray, ui's --host, export's --eta


def _default(cls: type, name: str):
    """A dataclass field's default: what an option left out becomes."""
    return next(f.default for f in fields(cls) if f.name == name)


def _resolution(text: str) -> int | tuple[int, int]:
    try:
        if "x" in text:
            height, width = text.lower().split("x")
            return int(height), int(width)
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"resolution must be N or HxW, e.g. 512 or 512x768; got {text!r}")


def _within(low: float, high: float, low_open: bool = False):
    """argparse type: a float in [low, high] (or (low, high]), refused before any training starts."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan  # refused below, with the same message
        if not (low < value <= high if low_open else low <= value <= high):
            raise argparse.ArgumentTypeError(f"'{text}' is not a number {'above' if low_open else 'from'} {low:g} "
                                             f"{'and at most' if low_open else 'to'} {high:g}")
        return value
    return parse


def _listed(values) -> str:
    return " ".join(f"{v:g}" for v in values)


def _per_method(defaults: ModelDefaults, key: str) -> str:
    return ", ".join(f"{getattr(stage, key):g} {method}" for method, stage in defaults.fine_tune.items())


def _add_model_options(parser: argparse.ArgumentParser, defaults: ModelDefaults) -> None:
    group = parser.add_argument_group("model")
    group.add_argument("--model", help="a diffusers folder, a hub id, a single .safetensors checkpoint, or "
                       f"'{BUILTIN_NAME}', the built-in model (default: the state's model for sample, else {BUILTIN_NAME})")
    group.add_argument("--config", help="for a single-file checkpoint: a diffusers folder with the model's configs")
    group.add_argument("--super-resolution", metavar="MODEL", help="a cascade's super-resolution stage, fine-tuned "
                       "on the photo and sampled after the model: DeepFloyd IF's stage II (folder or hub id, e.g. "
                       "DeepFloyd/IF-II-L-v1.0); without it IF edits are 64 px")
    group.add_argument("--allow-pickle", action="store_true", help="allow pickled .ckpt/.bin checkpoints")
    group.add_argument("--device", help="cuda, cuda:1, cpu, ... (default: cuda if available)")
    group.add_argument("--dtype", choices=DTYPES, help=f"weights dtype (default: this model's {defaults.gpu_dtype} on a "
                       "GPU, fp32 on the CPU)")
    group.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--overwrite", action="store_true", help="replace existing outputs")


def _add_train_options(parser: argparse.ArgumentParser, defaults: ModelDefaults) -> None:
    group = parser.add_argument_group("training (stages 1 and 2), defaults of the model it loads")
    group.add_argument("--method", choices=FINE_TUNE_METHODS, help=f"fine-tune all weights or a LoRA (default: "
                       f"{defaults.method})")
    group.add_argument("--embedding-steps", type=int, help=f"stage 1 optimiser steps (default: {defaults.embedding.steps})")
    group.add_argument("--embedding-lr", type=float, help="stage 1 learning rate (default: "
                       f"{defaults.embedding.learning_rate:g})")
    group.add_argument("--finetune-steps", type=int, help=f"stage 2 optimiser steps (default: {_per_method(defaults, 'steps')})")
    group.add_argument("--finetune-lr", type=float, help="stage 2 learning rate (default: "
                       f"{_per_method(defaults, 'learning_rate')})")
    group.add_argument("--optimizer", choices=OPTIMIZERS, help="for both stages (default: "
                       f"{_default(StageSettings, 'optimizer')})")
    group.add_argument("--lora-rank", type=int, help=f"LoRA rank (default: {_default(TrainSettings, 'lora_rank')})")
    group.add_argument("--lora-alpha", type=float, help="LoRA alpha (default: the rank, scale 1)")
    group.add_argument("--precision", choices=PRECISIONS, help="autocast dtype; auto: the model's half dtype, bf16/fp16 "
                       f"on GPU, fp32 on CPU (default: {_default(TrainSettings, 'precision')})")
    group.add_argument("--gradient-checkpointing", action="store_true", default=None,
                       help="recompute activations in the backward pass: less memory, slower")
    group.add_argument("--compile", action="store_true", default=None, help="torch.compile the denoiser for training: "
                       "the first steps compile (tens of seconds), the rest may run faster; needs a C++ compiler on the "
                       "CPU")
    group.add_argument("--resolution", type=_resolution, help="N or HxW (default: the model's native size)")
    group.add_argument("--resize", choices=RESIZE_MODES, help="fit the image: crop (cover, then centre-crop), pad, or "
                       f"stretch (default: {_default(TrainSettings, 'resize')})")
    group.add_argument("--train-seed", type=int, help="seed for training noise and timesteps (default: "
                       f"{_default(TrainSettings, 'seed')})")
    cascade = parser.add_argument_group("cascades (with --super-resolution)")
    cascade.add_argument("--super-resolution-embedding", choices=UPPER_CONDITIONS, help="the embedding the "
                         "super-resolution stage is fine-tuned and sampled with: e_tgt as the paper does, or e_opt "
                         f"(default: {_default(TrainSettings, 'upper_condition')})")
    cascade.add_argument("--super-resolution-steps", type=int, metavar="N", help="its stage 2 optimiser steps, at the "
                         "stage 2 learning rate; 0 leaves it as loaded (default: --finetune-steps)")
    memory = parser.add_argument_group("memory levers (not recorded in the edit state)")
    memory.add_argument("--offload-encoders", action="store_true", default=None, help="the text encoders and the "
                        "VAE leave memory once the text and the photo are encoded, until sampling")
    memory.add_argument("--quantize-base", choices=QUANTIZE_CHOICES[1:], help="LoRA: train over the denoiser's "
                        "linear layers quantized to 8 or 4 bits (optimum-quanto: pip install \"imagic[quant]\")")
    memory.add_argument("--max-memory", metavar="AMOUNT", help="e.g. 24GiB: switch on the cheapest levers (these, "
                        "--gradient-checkpointing, 8-bit Adam) that the model family's measured peak says fit")
    forgedit = parser.add_argument_group("training beyond the paper (Forgedit, Zhang et al. 2023)")
    forgedit.add_argument("--copies", type=int, help="noised copies of the photo per step, both stages (default: "
                          f"{_default(StageSettings, 'copies')})")
    forgedit.add_argument("--joint", action="store_true", default=None, help="stage 2 trains the embedding too, at "
                          "the embedding learning rate (with --embedding-steps 0: Forgedit's one joint stage)")
    check_every = _default(StageSettings, "check_every")
    forgedit.add_argument("--finetune-stop", type=float, metavar="RATIO", help="end stage 2 early once its "
                          f"reconstruction loss (checked every {check_every} steps, --check-every) is down to RATIO of "
                          "where it began, e.g. 0.5; the step it stopped at is in the summary")
    forgedit.add_argument("--embedding-stop", type=float, metavar="RATIO", help="the same for stage 1")
    forgedit.add_argument("--check-every", type=int, metavar="N", help="steps between the reconstruction checks of "
                          f"--finetune-stop and --embedding-stop (default: {check_every})")


def _add_sample_options(parser: argparse.ArgumentParser, defaults: ModelDefaults) -> None:
    group = parser.add_argument_group("sampling (stage 3), defaults of the model it loads")
    group.add_argument("--eta", type=float, nargs="+", help=f"one or more etas (default: {_listed(defaults.etas)}; "
                       f"batch: {defaults.eta:g})")
    group.add_argument("--seed", type=int, nargs="+", help="one or more sampling seeds (default: 0)")
    group.add_argument("--guidance-scale", type=float, help="classifier-free guidance (default: "
                       f"{defaults.guidance_scale:g})")
    rescale, batch = _default(SampleSettings, "guidance_rescale"), _default(SampleSettings, "batch_size")
    group.add_argument("--guidance-rescale", type=_within(0, 1), help="rescale guided predictions, 0 (off) to 1; 0.7 "
                       f"for zero-terminal-SNR models (Lin et al. 2023) (default: {rescale:g})")
    group.add_argument("--negative-prompt", help="text to steer away from")
    group.add_argument("--steps", type=int, help=f"inference steps (default: {defaults.num_inference_steps})")
    group.add_argument("--scheduler", help=f"{', '.join(SCHEDULER_ALIASES)} or a diffusers class name (default: the "
                       "model's)")
    group.add_argument("--batch-size", type=int, help=f"etas sampled together (default: {batch})")
    group.add_argument("--strength", type=_within(0, 1, low_open=True), help="start from the photo noised to this "
                       f"strength, as SDEdit does (default: {defaults.strength:g} where the photo is at hand: edit, "
                       "batch, or sample with --image; else 1, pure noise as in the paper)")
    group.add_argument("--invert", action="store_true", default=None,
                       help="start from a DDIM inversion of the photo under e_opt instead of noise (deterministic)")
    group.add_argument("--mix", choices=tuple(MIXES), help="how e_tgt and e_opt combine at an eta: the paper's "
                       f"interpolation, or Forgedit's vector projection (default: {_default(SampleSettings, 'mix')})")
    group.add_argument("--forget", metavar="GROUP", help="set this group of trained weights back to the base model's "
                       "when sampling (Forgedit), one of its family's groups. A UNet's: encoder, decoder, "
                       "all-but-encoder-kv (all but the encoder's cross-attention keys and values); a transformer's: "
                       f"all-but-text-kv (default: {_default(SampleSettings, 'forget')})")
    group.add_argument("--mask", metavar="none|auto|PICTURE", help="keep the photo outside an edit mask (beyond the "
                       "paper): auto, where the fine-tuned model's predictions under the text and under e_opt differ, "
                       "or a picture of the photo's shape, white where the edit may change it; written as mask.png "
                       "(needs the photo: sample takes --image; batch takes auto) (default: "
                       f"{defaults.mask} where the photo is at hand, else none)")
    group.add_argument("--mask-threshold", type=_within(0, 1, low_open=True), help="auto mask: the share of the largest "
                       f"difference that marks a pixel (default: {defaults.mask_threshold:g})")
    group.add_argument("--mask-grow", type=int, help="auto mask: latent pixels it is grown by on every side (default: "
                       f"{defaults.mask_grow})")
    group.add_argument("--out", type=str, help="output folder (default: outputs; batch: outputs/batch)")


def build_parser(defaults: ModelDefaults) -> argparse.ArgumentParser:
    """The command line, its help showing `defaults`: those of the model it will load."""
    from . import __version__

    parser = argparse.ArgumentParser(prog="imagic", description="Edit a real photo from one sentence (Imagic).")
    parser.add_argument("--version", action="version", version=f"imagic {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    edit = commands.add_parser("edit", help="train and sample an edit; write images, grid, state and summary")
    edit.add_argument("image", type=str, help="the photo to edit")
    edit.add_argument("target_text", help="the edited photo described, e.g. \"a photo of a sitting dog\"")
    train = commands.add_parser("train", help="train an edit and save its state")
    train.add_argument("image", type=str, help="the photo to edit")
    train.add_argument("target_text", help="the edited photo described")
    train.add_argument("--state", type=str, required=True, help="where to write the edit state (.safetensors)")
    sample = commands.add_parser("sample", help="sample a saved edit state at other etas and seeds")
    sample.add_argument("state", type=str, help="an edit state written by 'imagic train' or 'imagic edit'")
    sample.add_argument("--image", type=str, help="the photo the edit was trained on (for --strength or --invert)")
    batch = commands.add_parser("batch", help="edit every pair of a TEdBench-style folder (resumes); score with CLIP")
    batch.add_argument("folder", type=str, help=f"a folder with {LIST_FILE} and the images (or an originals/ folder "
                       "of them)")
    batch.add_argument("--list", type=str, help=f"the JSON list of {{\"img_name\", \"target_text\"}} (default: "
                       f"FOLDER/{LIST_FILE})")
    batch.add_argument("--clip", type=str, help="a local CLIP model folder: score every output against its text and "
                       "its input")
    batch.add_argument("--ray", nargs="?", const="local", metavar="ADDRESS", help="run the pairs as Ray tasks, one "
                       "edit each, a GPU each where there are GPUs: on a new local Ray, or the cluster at ADDRESS "
                       "(e.g. auto, or HEAD:6379) with this machine's Ray token (RAY_AUTH_TOKEN, or ~/.ray/auth_token); "
                       "needs pip install \"imagic[ray]\"")
    batch.add_argument("--reference", type=str, help="a folder of another method's outputs named as TEdBench names "
                       "them (e.g. tedbench/imagic/, the paper's): side-by-sides under OUT/compare/, and with --clip "
                       "their scores")
    for command in (edit, train, sample, batch):
        _add_model_options(command, defaults)
    for command in (edit, train, batch):
        _add_train_options(command, defaults)
    for command in (edit, sample, batch):
        _add_sample_options(command, defaults)
    ui = commands.add_parser("ui", help="the web app: upload, train, drag eta (needs pip install \"imagic[ui]\")")
    ui.add_argument("--model", action="append", help="a model to offer, as for edit; repeat for several "
                    f"(default: {BUILTIN_NAME}); each is checked before the server starts")
    ui.add_argument("--super-resolution", metavar="MODEL", help="a cascade's super-resolution stage to offer with "
                    "its first stage: DeepFloyd IF's stage II (folder or hub id), selectable in the page")
    ui.add_argument("--host", default="127.0.0.1", help="the address to serve on, 0.0.0.0 for every interface "
                    "(default: 127.0.0.1)")
    ui.add_argument("--port", type=int, default=7860, help="the port to serve on (default: 7860)")
    ui.add_argument("--device", help="cuda, cuda:1, cpu, ... (default: cuda if available)")
    export = commands.add_parser("export", help="write an edit state's LoRA (diffusers' and kohya's formats) or "
                                 "fine-tuned denoiser and its embeddings, for plain diffusers, ComfyUI and the web UIs")
    export.add_argument("state", type=str, help="an edit state written by 'imagic train' or 'imagic edit'")
    export.add_argument("out", type=str, help="the folder to write into")
    export.add_argument("--eta", type=float, help="the interpolated embedding's eta (default: the model's, the middle "
                        "of its etas)")
    export.add_argument("--model", help="check first that the edit belongs to this model, as sampling does (a folder "
                        "or hub id; no model is needed to export)")
    export.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    export.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def _model_named(argv: list[str]) -> str | None:
    """The model a command line will load, read before parsing it whole (for the help's defaults): --model, else a
    sampled state's model."""
    early = argparse.ArgumentParser(add_help=False)
    early.add_argument("--model")
    known, rest = early.parse_known_args(argv)
    if known.model or len(rest) < 2 or rest[0] != "sample":
        return known.model
    from .state import model_of_state_file

    return model_of_state_file(rest[1])


def _path(name: str, text: str) -> Path:
    """A path given on the command line; an empty one would be the current folder, silently."""
    if not text:
        raise SettingsError(f"the {name} path is empty: give a file or folder name (. for the current folder)")
    if "\0" in text:
        raise SettingsError(f"the {name} path holds a NUL character")
    return Path(text)


def _given(args: argparse.Namespace, names: dict[str, str]) -> dict:
    """The options given on the command line (not None), under their dataclass field names."""
    return {name: getattr(args, option) for option, name in names.items() if getattr(args, option) is not None}


def _train_settings(args: argparse.Namespace, defaults: ModelDefaults) -> TrainSettings:
    """The training settings given, over the model's defaults for the chosen method, over TrainSettings'."""
    method = args.method or defaults.method
    stage = _given(args, {"optimizer": "optimizer", "copies": "copies", "check_every": "check_every"})
    embedding = replace(defaults.embedding, **stage, **_given(args, {
        "embedding_steps": "steps", "embedding_lr": "learning_rate", "embedding_stop": "stop_ratio"}))
    fine_tune = replace(defaults.fine_tune[method], **stage, **_given(args, {
        "finetune_steps": "steps", "finetune_lr": "learning_rate", "finetune_stop": "stop_ratio"}))
    return TrainSettings(embedding=embedding, fine_tune=fine_tune, method=method, **_given(args, {
        "lora_rank": "lora_rank", "lora_alpha": "lora_alpha", "precision": "precision",
        "gradient_checkpointing": "gradient_checkpointing", "compile": "compile", "resolution": "resolution",
        "resize": "resize",
        "train_seed": "seed", "joint": "joint", "super_resolution_embedding": "upper_condition"}))


def _sample_given(args: argparse.Namespace) -> dict:
    """The sampling settings given, by SampleSettings field; the rest are the model's defaults, filled in once it
    loads, or for `sample` how the state was shown."""
    return _given(args, {
        "guidance_scale": "guidance_scale", "guidance_rescale": "guidance_rescale", "negative_prompt": "negative_prompt",
        "steps": "num_inference_steps", "scheduler": "scheduler", "batch_size": "batch_size", "strength": "strength",
        "invert": "invert", "mix": "mix", "forget": "forget", "mask": "mask", "mask_threshold": "mask_threshold",
        "mask_grow": "mask_grow"})


def parse(argv: list[str]) -> Request:
    """The command line as a Request; argparse exits with a usage line on a malformed one. Settings are built
    (and so checked) here, before any model loads or folder is claimed."""
    defaults = defaults_before_loading(_model_named(argv))
    args = build_parser(defaults).parse_args(argv)
    request = Request(args.command, overwrite=getattr(args, "overwrite", False), quiet=getattr(args, "quiet", False))
    paths = {name: _path(name, getattr(args, name)) for name in ("image", "state", "out", "folder", "list", "clip",
                                                                 "reference") if getattr(args, name, None) is not None}
    request.paths = paths
    if args.command == "ui":
        request.options = {"models": args.model or [BUILTIN_NAME], "host": args.host, "port": args.port,
                           "device": args.device, "super_resolution": args.super_resolution}
        return request
    if getattr(args, "model", None) == "":
        raise SettingsError("the model is empty: give a folder, a file, a hub id, or leave --model out")
    request.loading = Loading(args.model, getattr(args, "config", None), getattr(args, "super_resolution", None),
                              getattr(args, "allow_pickle", False), getattr(args, "device", None),
                              getattr(args, "dtype", None))
    if args.command == "export":
        request.options = {"eta": args.eta}
        return request
    request.target_text = getattr(args, "target_text", None)
    if args.command != "sample":
        request.train = _train_settings(args, defaults)
        request.memory = MemorySettings(**_given(args, {"offload_encoders": "offload_encoders",
                                                        "quantize_base": "quantize_base", "max_memory": "max_memory"}))
        request.super_resolution_steps = args.super_resolution_steps
    if args.command != "train":
        request.sample_given = _sample_given(args)
        request.sample = SampleSettings(**request.sample_given)
        request.etas = args.eta or ([defaults.eta] if args.command == "batch" else list(defaults.etas))
        request.seeds = args.seed or [0]
        request.paths.setdefault("out", Path("outputs/batch" if args.command == "batch" else "outputs"))
    if args.command == "batch":
        request.options = {"ray": args.ray}
    return request
