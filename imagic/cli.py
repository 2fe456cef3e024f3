"""The `imagic` command: a thin layer over ImagicEditor.

    imagic edit IMAGE "target text" --model M --out DIR   train, sample, write everything
    imagic train IMAGE "target text" --model M --state S  train only, save the edit state
    imagic sample S --eta 0.6 0.7 --seed 0 1 --out DIR    sample a saved state again
"""

import os

# Import-time notices from transformers (e.g. about torchvision) are not for the CLI's users.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import diffusers
import torch
import transformers

from . import __version__
from .editor import ImagicEditor, SampleOutput
from .errors import ImagicError, TrainingDivergedError, TrainingInterrupted
from .families import SCHEDULER_ALIASES
from .image_io import RESIZE_MODES, check_outputs_free, save_image
from .loading import BUILTIN_NAME
from .report import environment, peak_memory_bytes, reset_peak_memory
from .settings import FINE_TUNE_METHODS, OPTIMIZERS, PRECISIONS, StageSettings, TrainSettings, default_fine_tune
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
    group.add_argument("--allow-pickle", action="store_true", help="allow pickled .ckpt/.bin checkpoints")
    group.add_argument("--device", help="cuda, cuda:1, cpu, ... (default: cuda if available)")
    group.add_argument("--dtype", choices=DTYPES, help="weights dtype (default: fp16 on GPU, fp32 on CPU)")
    group.add_argument("--quiet", action="store_true", help="no progress bars")


def _add_train_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("training (stages 1 and 2)")
    group.add_argument("--method", choices=FINE_TUNE_METHODS, default="full", help="fine-tune all weights or a LoRA")
    group.add_argument("--embedding-steps", type=int, default=500, help="stage 1 optimiser steps")
    group.add_argument("--embedding-lr", type=float, default=1e-3, help="stage 1 learning rate")
    group.add_argument("--finetune-steps", type=int, help="stage 2 optimiser steps (default: 1000 full, 500 lora)")
    group.add_argument("--finetune-lr", type=float, help="stage 2 learning rate (default: 2e-6 full, 1e-4 lora)")
    group.add_argument("--optimizer", choices=OPTIMIZERS, default="adam", help="for both stages")
    group.add_argument("--lora-rank", type=int, default=16, help="LoRA rank (with --method lora)")
    group.add_argument("--lora-alpha", type=float, help="LoRA alpha (default: the rank, scale 1)")
    group.add_argument("--precision", choices=PRECISIONS, default="auto",
                       help="autocast dtype; auto: the model's half dtype, bf16/fp16 on GPU, fp32 on CPU")
    group.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations in the backward pass: less memory, slower")
    group.add_argument("--resolution", type=_resolution, help="N or HxW (default: the model's native size)")
    group.add_argument("--resize", choices=RESIZE_MODES, default="crop",
                       help="fit the image: crop (cover, then centre-crop), pad, or stretch")
    group.add_argument("--train-seed", type=int, default=0, help="seed for training noise and timesteps")


def _add_sample_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("sampling (stage 3)")
    group.add_argument("--eta", type=float, nargs="+", default=[0.6, 0.7, 0.8], help="one or more etas")
    group.add_argument("--seed", type=int, nargs="+", default=[0], help="one or more sampling seeds")
    group.add_argument("--guidance-scale", type=float, default=7.5, help="classifier-free guidance")
    group.add_argument("--negative-prompt", help="text to steer away from")
    group.add_argument("--steps", type=int, default=50, help="inference steps")
    group.add_argument("--scheduler", help=f"{', '.join(SCHEDULER_ALIASES)} or a diffusers class name")
    group.add_argument("--batch-size", type=int, default=4, help="etas sampled together")
    group.add_argument("--out", default="outputs", help="output folder")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="imagic", description="Edit a real photo from one sentence (Imagic).")
    parser.add_argument("--version", action="version", version=f"imagic {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    formatter = _DefaultsInHelp
    edit = commands.add_parser("edit", formatter_class=formatter, help="train and sample an edit; write images, grid, state and summary")
    edit.add_argument("image", help="the photo to edit")
    edit.add_argument("target_text", help="the edited photo described, e.g. \"a photo of a sitting dog\"")
    train = commands.add_parser("train", formatter_class=formatter, help="train an edit and save its state")
    train.add_argument("image", help="the photo to edit")
    train.add_argument("target_text", help="the edited photo described")
    train.add_argument("--state", required=True, help="where to write the edit state (.safetensors)")
    sample = commands.add_parser("sample", formatter_class=formatter, help="sample a saved edit state at other etas and seeds")
    sample.add_argument("state", help="an edit state written by 'imagic train' or 'imagic edit'")
    for command in (edit, train, sample):
        _add_model_options(command)
        command.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    for command in (edit, train):
        _add_train_options(command)
    for command in (edit, sample):
        _add_sample_options(command)
    return parser


def _train_settings(args: argparse.Namespace) -> TrainSettings:
    fine_tune = default_fine_tune(args.method)
    fine_tune.steps = args.finetune_steps if args.finetune_steps is not None else fine_tune.steps
    fine_tune.learning_rate = args.finetune_lr if args.finetune_lr is not None else fine_tune.learning_rate
    fine_tune.optimizer = args.optimizer
    return TrainSettings(
        embedding=StageSettings(args.embedding_steps, args.embedding_lr, args.optimizer),
        fine_tune=fine_tune, method=args.method, lora_rank=args.lora_rank, lora_alpha=args.lora_alpha,
        precision=args.precision, gradient_checkpointing=args.gradient_checkpointing,
        resolution=args.resolution, resize=args.resize, seed=args.train_seed,
    )


def _load_editor(args: argparse.Namespace, state: EditState | None = None) -> ImagicEditor:
    model = args.model or (state.base_model.get("name") if state else None) or BUILTIN_NAME
    return ImagicEditor.from_pretrained(
        model, device=args.device, torch_dtype=DTYPES.get(args.dtype), config=args.config,
        allow_pickle=args.allow_pickle,
    )


def _sample_outputs(args: argparse.Namespace) -> dict[str, Path]:
    out = Path(args.out)
    paths = {f"eta{eta:g}_seed{seed}": out / f"eta{eta:g}_seed{seed}.png" for seed in args.seed for eta in args.eta}
    return {**paths, "grid": out / "grid.png", "summary": out / "summary.json"}


def _train(editor: ImagicEditor, args: argparse.Namespace, state_path: Path) -> EditState:
    try:
        state = editor.train(args.image, args.target_text, _train_settings(args), progress=not args.quiet)
    except (TrainingDivergedError, TrainingInterrupted) as error:
        error.partial_state.save(state_path)
        raise type(error)(f"{error}; saved what finished to '{state_path}'") from None
    state.save(state_path)
    return state


def _write_samples(editor, state: EditState, args, paths: dict[str, Path], summary: dict) -> None:
    start = time.perf_counter()
    output: SampleOutput = editor.sample(
        state, args.eta, args.seed, guidance_scale=args.guidance_scale, negative_prompt=args.negative_prompt,
        num_inference_steps=args.steps, scheduler=args.scheduler, batch_size=args.batch_size,
        progress=not args.quiet,
    )
    sampling_seconds = time.perf_counter() - start
    for (eta, seed), image in output.images.items():
        save_image(image, paths[f"eta{eta:g}_seed{seed}"], overwrite=args.overwrite)
    save_image(output.grid(), paths["grid"], overwrite=args.overwrite)
    summary["sampling"] = {
        "etas": args.eta, "seeds": args.seed, "guidance_scale": args.guidance_scale,
        "negative_prompt": args.negative_prompt, "num_inference_steps": args.steps, "scheduler": args.scheduler,
        "seconds": sampling_seconds,
    }
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


def run(args: argparse.Namespace) -> None:
    if args.quiet:
        diffusers.utils.logging.disable_progress_bar()
        transformers.utils.logging.disable_progress_bar()
    if args.command == "train":
        state_path = Path(args.state)
        check_outputs_free([state_path], args.overwrite)
        editor = _load_editor(args)
        state = _train(editor, args, state_path)
        print(f"saved the edit state to '{state_path}'; sample it with: imagic sample {state_path} --eta 0.7")
        return

    paths = _sample_outputs(args)
    if args.command == "edit":
        state_path = Path(args.out) / "state.safetensors"
        check_outputs_free([*paths.values(), state_path], args.overwrite)
        editor = _load_editor(args)
        device = editor.family.device
        reset_peak_memory(device)
        state = _train(editor, args, state_path)
    else:
        check_outputs_free(paths.values(), args.overwrite)
        state = EditState.load(args.state)
        editor = _load_editor(args, state)
        device = editor.family.device
        reset_peak_memory(device)
    summary = _summary(state, device)
    _write_samples(editor, state, args, paths, summary)
    summary["peak_memory_bytes"] = peak_memory_bytes(device)
    paths["summary"].write_text(json.dumps(summary, indent=2))
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
