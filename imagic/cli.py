"""The `imagic` command: a thin layer over ImagicEditor.

    imagic edit IMAGE "target text" --model M --out DIR   train, sample, write everything
    imagic train IMAGE "target text" --model M --state S  train only, save the edit state
    imagic sample S --eta 0.6 0.7 --seed 0 1 --out DIR    sample a saved state again
    imagic batch FOLDER --model M --out DIR [--clip C]    edit a TEdBench-style folder, resumable
    imagic export S OUT [--eta ETA]                       write the edit as files plain diffusers and web UIs load
"""

import os

# Import-time notices from transformers (e.g. about torchvision) are not for the CLI's users.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import argparse
import hashlib
import json
import math
import sys
import time
import warnings
from dataclasses import replace
from pathlib import Path

import diffusers
import torch
import transformers

from . import __version__
from .batch import LIST_FILE, edit_pairs, read_pairs, score_pairs, write_comparisons
from .clip_score import ClipScorer
from .defaults import SHAPES, STABLE_DIFFUSION, ModelDefaults
from .editor import ImagicEditor, SampleOutput
from .errors import BatchIncomplete, ImagicError, SettingsError, TrainingDivergedError, TrainingInterrupted
from .export import RECIPE_FILE, export_edit
from .families import SCHEDULER_ALIASES
from .image_io import RESIZE_MODES, save_image
from .loading import BUILTIN_NAME, defaults_before_loading
from .outputs import check_outputs_free, claim, write_atomic
from .report import environment, peak_memory_bytes, reset_peak_memory
from .settings import (
    FINE_TUNE_METHODS,
    OPTIMIZERS,
    PRECISIONS,
    UPPER_CONDITIONS,
    SampleSettings,
    StageSettings,
    TrainSettings,
    check_sampling,
)
from .stages import MIXES
from .state import EditState

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _resolution(text: str) -> int | tuple[int, int]:
    try:
        if "x" in text:
            height, width = text.lower().split("x")
            return int(height), int(width)
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"resolution must be N or HxW, e.g. 512 or 512x768; got {text!r}")


class _DefaultsInHelp(argparse.HelpFormatter):
    """Shows each option's default unless its help already speaks of one."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        unset = action.default is None or action.default is False or action.default is argparse.SUPPRESS
        if not unset and "default" not in text:
            text += " (default: %(default)s)"
        return text


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    group.add_argument("--model", help="a diffusers folder, a hub id, a single .safetensors checkpoint, or "
                       f"'{BUILTIN_NAME}', the built-in model (default: the state's model for sample, else {BUILTIN_NAME})")
    group.add_argument("--config", help="for a single-file checkpoint: a diffusers folder with the model's configs")
    group.add_argument("--super-resolution", metavar="MODEL", help="a cascade's super-resolution stage, fine-tuned "
                       "on the photo and sampled after the model: DeepFloyd IF's stage II (folder or hub id, e.g. "
                       "DeepFloyd/IF-II-L-v1.0); without it IF edits are 64 px")
    group.add_argument("--allow-pickle", action="store_true", help="allow pickled .ckpt/.bin checkpoints")
    group.add_argument("--device", help="cuda, cuda:1, cpu, ... (default: cuda if available)")
    group.add_argument("--dtype", choices=DTYPES, help="weights dtype (default: fp16 on GPU, fp32 on CPU)")
    group.add_argument("--quiet", action="store_true", help="no progress bars")


def _add_train_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("training (stages 1 and 2)")
    sd, shapes = STABLE_DIFFUSION, SHAPES
    group.add_argument("--method", choices=FINE_TUNE_METHODS,
                       help=f"fine-tune all weights or a LoRA (default: {sd.method}; {BUILTIN_NAME}: {shapes.method})")
    group.add_argument("--embedding-steps", type=int, help="stage 1 optimiser steps "
                       f"(default: {sd.embedding.steps}; {BUILTIN_NAME}: {shapes.embedding.steps})")
    group.add_argument("--embedding-lr", type=float, help="stage 1 learning rate "
                       f"(default: {sd.embedding.learning_rate:g}; {BUILTIN_NAME}: {shapes.embedding.learning_rate:g})")
    group.add_argument("--finetune-steps", type=int, help="stage 2 optimiser steps (default: "
                       f"{_per_method(sd, 'steps')}; {BUILTIN_NAME}: {_per_method(shapes, 'steps')})")
    group.add_argument("--finetune-lr", type=float, help="stage 2 learning rate (default: "
                       f"{_per_method(sd, 'learning_rate')}; {BUILTIN_NAME}: {_per_method(shapes, 'learning_rate')})")
    group.add_argument("--optimizer", choices=OPTIMIZERS, default="adam", help="for both stages")
    group.add_argument("--lora-rank", type=int, default=16, help="LoRA rank (with --method lora)")
    group.add_argument("--lora-alpha", type=float, help="LoRA alpha (default: the rank, scale 1)")
    group.add_argument("--precision", choices=PRECISIONS, default="auto",
                       help="autocast dtype; auto: the model's half dtype, bf16/fp16 on GPU, fp32 on CPU")
    group.add_argument("--gradient-checkpointing", action="store_true",
                       help="recompute activations in the backward pass: less memory, slower")
    group.add_argument("--resolution", type=_resolution, help="N or HxW (default: the model's native size)")
    group.add_argument("--resize", choices=RESIZE_MODES, default="crop",
                       help="fit the image: crop (cover, then centre-crop), pad, or stretch")
    group.add_argument("--train-seed", type=int, default=0, help="seed for training noise and timesteps")
    cascade = parser.add_argument_group("cascades (with --super-resolution)")
    cascade.add_argument("--super-resolution-embedding", choices=UPPER_CONDITIONS, default="e_tgt",
                         help="the embedding the super-resolution stage is fine-tuned and sampled with: e_tgt as "
                         "the paper does, or e_opt")
    cascade.add_argument("--super-resolution-steps", type=int, metavar="N", help="its stage 2 optimiser steps, at the "
                         "stage 2 learning rate; 0 leaves it as loaded (default: --finetune-steps)")
    forgedit = parser.add_argument_group("training beyond the paper (Forgedit, Zhang et al. 2023)")
    forgedit.add_argument("--copies", type=int, default=1, help="noised copies of the photo per step, both stages")
    forgedit.add_argument("--joint", action="store_true", help="stage 2 trains the embedding too, at the embedding "
                          "learning rate (with --embedding-steps 0: Forgedit's one joint stage)")
    forgedit.add_argument("--finetune-stop", type=float, metavar="RATIO", help="end stage 2 early once its "
                          "reconstruction loss (checked every 10 steps) is down to RATIO of where it began, e.g. 0.5")


def _zero_to_one(text: str) -> float:
    """argparse type: a float in [0, 1], refused before any training starts."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan  # refused below, with the same message
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"'{text}' is not a number from 0 to 1")
    return value


def _strength(text: str) -> float:
    """argparse type: a float above 0 and at most 1, refused before any training starts."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan  # refused below, with the same message
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"'{text}' is not a number above 0 and at most 1")
    return value


def _check_start(args: argparse.Namespace) -> None:
    """A start from the photo needs the photo, and the inversion starts at full strength."""
    strength = 1.0 if args.strength is None else args.strength
    if args.invert and strength < 1.0:
        raise SettingsError("give either --invert or a --strength below 1: the inversion starts from full strength")
    if (args.invert or strength < 1.0) and args.command == "sample" and args.image is None:
        raise SettingsError("starting from the photo (--strength below 1, or --invert) needs it: add --image PHOTO, "
                            "the photo the edit was trained on")


def _add_sample_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("sampling (stage 3)")
    sd, shapes = STABLE_DIFFUSION, SHAPES
    group.add_argument("--eta", type=float, nargs="+", help="one or more etas "
                       f"(default: {_listed(sd.etas)}; {BUILTIN_NAME}: {_listed(shapes.etas)})")
    group.add_argument("--seed", type=int, nargs="+", default=[0], help="one or more sampling seeds")
    group.add_argument("--guidance-scale", type=float, help="classifier-free guidance "
                       f"(default: {sd.guidance_scale:g}; {BUILTIN_NAME}: {shapes.guidance_scale:g})")
    group.add_argument("--guidance-rescale", type=_zero_to_one, default=0.0,
                       help="rescale guided predictions, 0 (off) to 1; 0.7 for zero-terminal-SNR models (Lin et al. 2023)")
    group.add_argument("--negative-prompt", help="text to steer away from")
    group.add_argument("--steps", type=int, help="inference steps "
                       f"(default: {sd.num_inference_steps}; {BUILTIN_NAME}: {shapes.num_inference_steps})")
    group.add_argument("--scheduler", help=f"{', '.join(SCHEDULER_ALIASES)} or a diffusers class name")
    group.add_argument("--batch-size", type=int, default=4, help="etas sampled together")
    group.add_argument("--strength", type=_strength,
                       help="start from the photo noised to this strength, as SDEdit does (default: "
                       f"{sd.strength:g}, pure noise as in the paper; {BUILTIN_NAME}: {shapes.strength:g} where the "
                       "photo is at hand: edit, batch, or sample with --image)")
    group.add_argument("--invert", action="store_true",
                       help="start from a DDIM inversion of the photo under e_opt instead of noise (deterministic)")
    group.add_argument("--mix", choices=tuple(MIXES), default="interpolate", help="how e_tgt and e_opt combine at an "
                       "eta: the paper's interpolation, or Forgedit's vector projection")
    group.add_argument("--forget", default="none", metavar="GROUP", help="set this group of trained weights back to the "
                       "base model's when sampling (Forgedit). UNets (SD, SDXL, IF): encoder, decoder, "
                       "all-but-encoder-kv (all but the encoder's cross-attention keys and values); transformers (SD3, "
                       "FLUX): all-but-text-kv")
    group.add_argument("--out", default="outputs", help="output folder")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="imagic", description="Edit a real photo from one sentence (Imagic).")
    parser.add_argument("--version", action="version", version=f"imagic {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    formatter = _DefaultsInHelp
    edit = commands.add_parser("edit", formatter_class=formatter,
                               help="train and sample an edit; write images, grid, state and summary")
    edit.add_argument("image", help="the photo to edit")
    edit.add_argument("target_text", help="the edited photo described, e.g. \"a photo of a sitting dog\"")
    train = commands.add_parser("train", formatter_class=formatter, help="train an edit and save its state")
    train.add_argument("image", help="the photo to edit")
    train.add_argument("target_text", help="the edited photo described")
    train.add_argument("--state", required=True, help="where to write the edit state (.safetensors)")
    sample = commands.add_parser("sample", formatter_class=formatter, help="sample a saved edit state at other etas and seeds")
    sample.add_argument("state", help="an edit state written by 'imagic train' or 'imagic edit'")
    sample.add_argument("--image", help="the photo the edit was trained on (for --strength or --invert)")
    batch = commands.add_parser("batch", formatter_class=formatter,
                                help="edit every pair of a TEdBench-style folder (resumes); score with CLIP")
    batch.add_argument("folder", help=f"a folder with {LIST_FILE} and the images (or an originals/ folder of them)")
    batch.add_argument("--list", help=f"the JSON list of {{\"img_name\", \"target_text\"}} (default: FOLDER/{LIST_FILE})")
    batch.add_argument("--clip", help="a local CLIP model folder: score every output against its text and its input")
    batch.add_argument("--ray", nargs="?", const="local", metavar="ADDRESS", help="run the pairs as Ray tasks, one "
                       "edit each, a GPU each where there are GPUs: on a new local Ray, or the cluster at ADDRESS "
                       "(e.g. auto, or HEAD:6379); needs pip install \"imagic[ray]\"")
    batch.add_argument("--reference", help="a folder of another method's outputs named as TEdBench names them (e.g. "
                       "tedbench/imagic/, the paper's): side-by-sides under OUT/compare/, and with --clip their scores")
    for command in (edit, train, sample, batch):
        _add_model_options(command)
        command.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    for command in (edit, train, batch):
        _add_train_options(command)
    for command in (edit, sample, batch):
        _add_sample_options(command)
    batch.set_defaults(out="outputs/batch")
    ui = commands.add_parser("ui", formatter_class=formatter, help="the web app: upload, train, drag eta (needs "
                             "pip install \"imagic[ui]\")")
    ui.add_argument("--model", action="append", help="a model to offer, as for edit; repeat for several "
                    f"(default: {BUILTIN_NAME})")
    ui.add_argument("--host", default="127.0.0.1", help="the address to serve on (0.0.0.0: every interface)")
    ui.add_argument("--port", type=int, default=7860, help="the port to serve on")
    ui.add_argument("--device", help="cuda, cuda:1, cpu, ... (default: cuda if available)")
    export = commands.add_parser("export", formatter_class=formatter, help="write an edit state's LoRA (diffusers' "
                                 "and kohya's formats) or fine-tuned denoiser and its embeddings, for plain diffusers, "
                                 "ComfyUI and the web UIs")
    export.add_argument("state", help="an edit state written by 'imagic train' or 'imagic edit'")
    export.add_argument("out", help="the folder to write into")
    export.add_argument("--eta", type=float, help="the interpolated embedding's eta (default: the model's, the middle "
                        "of its etas)")
    export.add_argument("--model", help="check first that the edit belongs to this model, as sampling does (a folder "
                        "or hub id; no model is needed to export)")
    export.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    export.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def _ray_batch():
    try:
        import ray  # noqa: F401
    except ImportError:
        raise SettingsError('batch --ray needs Ray: pip install "imagic[ray]"') from None
    from . import ray_batch

    return ray_batch


def _run_ui(args: argparse.Namespace) -> None:
    try:
        from . import webapp
    except ImportError as error:
        if (error.name or "").split(".")[0] != "gradio":
            raise
        raise SettingsError('the web app needs Gradio: pip install "imagic[ui]"') from None
    webapp.launch(args.model or [BUILTIN_NAME], host=args.host, port=args.port, device=args.device)


def _per_method(defaults: ModelDefaults, key: str) -> str:
    return ", ".join(f"{getattr(stage, key):g} {method}" for method, stage in defaults.fine_tune.items())


def _listed(values) -> str:
    return " ".join(f"{v:g}" for v in values)


def _fill_defaults(args: argparse.Namespace, model_name: str | None) -> None:
    """Every option left out takes the model's default (the built-in model's own, else its family's)."""
    defaults = defaults_before_loading(model_name)
    if hasattr(args, "method"):
        args.method = args.method or defaults.method
        fine_tune = defaults.fine_tune[args.method]
        for option, value in (("embedding_steps", defaults.embedding.steps),
                              ("embedding_lr", defaults.embedding.learning_rate),
                              ("finetune_steps", fine_tune.steps), ("finetune_lr", fine_tune.learning_rate)):
            if getattr(args, option) is None:
                setattr(args, option, value)
    if hasattr(args, "eta"):
        batch_eta = [defaults.eta]  # batch writes one output per edit
        args.eta = args.eta or (batch_eta if args.command == "batch" else list(defaults.etas))
        args.guidance_scale = defaults.guidance_scale if args.guidance_scale is None else args.guidance_scale
        args.steps = defaults.num_inference_steps if args.steps is None else args.steps
    if hasattr(args, "strength") and args.strength is None:
        with_photo = args.command != "sample" or args.image is not None
        args.strength = defaults.start_strength(with_photo, args.invert)


def _train_settings(args: argparse.Namespace) -> TrainSettings:
    return TrainSettings(
        embedding=StageSettings(args.embedding_steps, args.embedding_lr, args.optimizer, copies=args.copies),
        fine_tune=StageSettings(args.finetune_steps, args.finetune_lr, args.optimizer, copies=args.copies,
                                stop_ratio=args.finetune_stop),
        method=args.method, lora_rank=args.lora_rank, lora_alpha=args.lora_alpha,
        precision=args.precision, gradient_checkpointing=args.gradient_checkpointing,
        resolution=args.resolution, resize=args.resize, seed=args.train_seed, joint=args.joint,
        upper_condition=args.super_resolution_embedding,
    )


def _load_editor(args: argparse.Namespace, state: EditState | None = None) -> ImagicEditor:
    model = args.model or (state.base_model.get("name") if state else None) or BUILTIN_NAME
    return ImagicEditor.from_pretrained(
        model, device=args.device, torch_dtype=DTYPES.get(args.dtype), config=args.config,
        allow_pickle=args.allow_pickle, super_resolution=args.super_resolution,
    )


def _sample_outputs(args: argparse.Namespace) -> dict[str, Path]:
    out = Path(args.out)
    paths = {f"eta{eta:g}_seed{seed}": out / f"eta{eta:g}_seed{seed}.png" for seed in args.seed for eta in args.eta}
    return {**paths, "grid": out / "grid.png", "summary": out / "summary.json"}


def _sample_settings(args: argparse.Namespace) -> SampleSettings:
    return SampleSettings(
        guidance_scale=args.guidance_scale, guidance_rescale=args.guidance_rescale,
        negative_prompt=args.negative_prompt, num_inference_steps=args.steps, scheduler=args.scheduler,
        batch_size=args.batch_size, strength=args.strength, invert=args.invert, mix=args.mix, forget=args.forget,
    )


def _check_model_settings(editor: ImagicEditor, args: argparse.Namespace,
                          settings: TrainSettings | None) -> TrainSettings | None:
    """What only the loaded model can tell (size, scheduler, steps, levels), checked before any training; returns
    the settings with the super-resolution levels' fine-tuning filled in."""
    if settings is not None:
        editor.resolution(settings)
        upper = editor.family.levels[1:]
        if args.super_resolution_steps is not None:
            if not upper:
                raise SettingsError("--super-resolution-steps needs a super-resolution stage: pass --super-resolution")
            steps = replace(settings.fine_tune, steps=args.super_resolution_steps)
            settings = replace(settings, upper_fine_tune={level.name: steps for level in upper})  # checked anew
    if hasattr(args, "eta"):
        editor.check_sampling(args.eta, args.seed, _sample_settings(args))
    return settings


def _train(editor: ImagicEditor, args: argparse.Namespace, settings: TrainSettings, state_path: Path) -> EditState:
    try:
        state = editor.train(args.image, args.target_text, settings, progress=not args.quiet)
    except (TrainingDivergedError, TrainingInterrupted) as error:
        error.partial_state.save(state_path, overwrite=args.overwrite)
        raise type(error)(f"{error}; saved what finished to '{state_path}'") from None
    state.save(state_path, overwrite=args.overwrite)
    return state


def _write_samples(editor, state: EditState, args, paths: dict[str, Path], summary: dict) -> None:
    start = time.perf_counter()
    settings = _sample_settings(args)
    output: SampleOutput = editor.sample(
        state, args.eta, args.seed, settings, progress=not args.quiet, image=args.image if settings.from_photo else None,
    )
    sampling_seconds = time.perf_counter() - start
    for (eta, seed), image in output.images.items():
        save_image(image, paths[f"eta{eta:g}_seed{seed}"], overwrite=args.overwrite)
    save_image(output.grid(), paths["grid"], overwrite=args.overwrite)
    summary["sampling"] = {"etas": args.eta, "seeds": args.seed, **settings.to_dict(), "seconds": sampling_seconds}
    summary["outputs"] = [str(p) for p in paths.values()]


def _summary(state: EditState, device: torch.device) -> dict:
    return {
        "target_text": state.target_text, "model": state.base_model.get("name"), "method": state.method,
        "settings": state.settings, "stages": state.stages, "training_seconds": state.timings,
        "losses": {stage: {"first": v[0] if v else None, "last": v[-1] if v else None, "per_step": v}
                   for stage, v in state.losses.items()},
        "image_sha256": state.image_sha256, "size": [state.height, state.width],
        "environment": environment(device),
    }


def _write_json(path: Path, data: dict, overwrite: bool) -> None:
    write_atomic(path, lambda temporary: temporary.write_text(json.dumps(data, indent=2)), overwrite)


def _run_batch(args: argparse.Namespace, settings: TrainSettings) -> None:
    if len(args.eta) != 1 or len(args.seed) != 1:
        raise SettingsError("batch writes one output per edit: give one --eta and one --seed")
    folder, out = Path(args.folder), Path(args.out)
    pairs = read_pairs(folder, args.list)
    scorer = ClipScorer(args.clip) if args.clip else None  # a bad CLIP folder fails before any edit
    spread = _ray_batch() if args.ray is not None else None  # before any work: Ray may be missing
    reference = Path(args.reference) if args.reference else None
    if reference is not None and not reference.is_dir():
        raise SettingsError(f"--reference '{reference}' is not a folder: give the folder of the reference outputs")
    with claim(out):
        if args.overwrite:
            for pair in pairs:
                (out / pair.output_name).unlink(missing_ok=True)
        editor = _load_editor(args)
        settings = _check_model_settings(editor, args, settings)
        options = dict(eta=args.eta[0], seed=args.seed[0], sample_settings=_sample_settings(args),
                       progress=not args.quiet)
        if spread is None:
            records = edit_pairs(editor, pairs, folder, out, settings, **options)
        else:
            del editor  # the workers load their own
            model = dict(model=args.model or BUILTIN_NAME, torch_dtype=DTYPES.get(args.dtype), config=args.config,
                         allow_pickle=args.allow_pickle, super_resolution=args.super_resolution)
            records = spread.edit_pairs_on_ray(None if args.ray == "local" else args.ray, model, pairs, folder, out,
                                               settings, **options)
        counts = {status: sum(r["status"] == status for r in records) for status in ("edited", "kept", "failed")}
        print(f"{counts['edited']} edited, {counts['kept']} already in '{out}', {counts['failed']} failed")
        if reference is not None:
            written = write_comparisons(pairs, folder, out, reference)
            print(f"{written} side-by-side(s) of input, reference and imagic in '{out / 'compare'}'")
        if scorer is not None:
            scores = score_pairs(scorer, pairs, folder, out, reference)
            _write_json(out / "scores.json", {"clip": args.clip, **scores}, overwrite=True)
            means = scores["means"]
            if means:
                print(f"CLIP text score {means['clip_text_score']:.2f}, CLIP fidelity {means['clip_fidelity']:.3f} "
                      f"over {scores['scored']} outputs; per output in '{out / 'scores.json'}'")
            compared = scores.get("reference", {})
            if compared.get("pairs"):
                theirs, ours = compared["means"], compared["imagic_means_on_those_pairs"]
                print(f"on the {compared['pairs']} pairs with a reference: CLIP text score {ours['clip_text_score']:.2f} "
                      f"(reference {theirs['clip_text_score']:.2f}), fidelity {ours['clip_fidelity']:.3f} "
                      f"(reference {theirs['clip_fidelity']:.3f})")
    if counts["failed"]:
        raise BatchIncomplete(f"{counts['failed']} of {len(records)} edits failed (each named above); "
                              "run the same command again to retry them")


def _run_export(args: argparse.Namespace) -> None:
    state = EditState.load(args.state)
    editor = ImagicEditor.from_pretrained(args.model) if args.model else None
    with claim(args.out):
        paths = export_edit(state, args.out, eta=args.eta, overwrite=args.overwrite, editor=editor)
    print(f"wrote {len(paths)} files to '{args.out}'; its {RECIPE_FILE} shows how plain diffusers loads them")


def run(args: argparse.Namespace) -> None:
    if args.command == "ui":
        _run_ui(args)
        return
    if args.quiet:
        diffusers.utils.logging.disable_progress_bar()
        transformers.utils.logging.disable_progress_bar()
    if args.command == "export":
        _run_export(args)
        return
    if hasattr(args, "strength"):
        _check_start(args)
    state = EditState.load(args.state) if args.command == "sample" else None
    _fill_defaults(args, args.model or (state.base_model.get("name") if state else None) or BUILTIN_NAME)
    # Every setting is checked before any folder is claimed or model loaded.
    settings = _train_settings(args) if hasattr(args, "method") else None
    if hasattr(args, "eta"):
        check_sampling(args.eta, args.seed, _sample_settings(args))
    if args.command == "batch":
        _run_batch(args, settings)
        return
    if args.command == "train":
        state_path = Path(args.state)
        lock = f".imagic-{hashlib.sha256(state_path.name.encode()).hexdigest()[:12]}.lock"
        with claim(state_path.parent, lock):
            check_outputs_free([state_path], args.overwrite)
            editor = _load_editor(args)
            settings = _check_model_settings(editor, args, settings)
            state = _train(editor, args, settings, state_path)
        etas = _listed(defaults_before_loading(args.model).etas)
        print(f"saved the edit state to '{state_path}'; sample it with: imagic sample {state_path} --eta {etas}")
        return

    paths = _sample_outputs(args)
    with claim(args.out):
        if args.command == "edit":
            state_path = Path(args.out) / "state.safetensors"
            check_outputs_free([*paths.values(), state_path], args.overwrite)
            editor = _load_editor(args)
            settings = _check_model_settings(editor, args, settings)
            device = editor.family.device
            reset_peak_memory(device)
            state = _train(editor, args, settings, state_path)
        else:
            check_outputs_free(paths.values(), args.overwrite)
            editor = _load_editor(args, state)
            _check_model_settings(editor, args, None)
            device = editor.family.device
            reset_peak_memory(device)
        summary = _summary(state, device)
        _write_samples(editor, state, args, paths, summary)
        summary["peak_memory_bytes"] = peak_memory_bytes(device)
        _write_json(paths["summary"], summary, args.overwrite)
    print(f"wrote {len(args.eta) * len(args.seed)} edited image(s), grid.png and summary.json to '{args.out}'")


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"imagic: warning: {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    warnings.showwarning = _one_line_warning
    try:
        run(args)
    except TrainingInterrupted as error:
        print(f"imagic: stopped: {error}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("imagic: interrupted", file=sys.stderr)
        return 130
    except ImagicError as error:
        print(f"imagic: error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
