"""Speed and memory of each Imagic stage, for full fine-tuning and LoRA side by side.

    python benchmarks/stages.py --arch sd15-unet --embedding-steps 3 --finetune-steps 3 --sample-steps 3
    python benchmarks/stages.py --model /models/stable-diffusion-v1-5 --device cuda --json sd15-gpu.json
    python benchmarks/stages.py --model /models/IF-I-XL-v1.0 --super-resolution /models/IF-II-L-v1.0 --device cuda

Each method runs one whole edit (train, then sample one eta and one seed) in a fresh process of its own,
so that its peak memory is its own: the process's peak RSS on the CPU, torch's peak allocation on a
GPU, from the loaded model on. The training peak is the same from the end of the first training step
to the end of the last: where the memory levers hold the loaded model out of memory, it shows. A
stage's time per step is the median interval between successive step callbacks, so its first
(warm-up) step is left out. A cascade's super-resolution stage (DeepFloyd IF's stage II) has a
fine-tuning row of its own.

With `--recipes`, each recipe is one whole edit at its real step counts, as `imagic edit` runs it: trained,
then sampled at the model's default etas, one seed, from the photo where the model starts there, side by side
with the ratio of each to the first: `paper` (the recipe commonly used on SD 1.x: 500 embedding steps at 1e-3,
full fine-tuning 1000 at 2e-6 or a LoRA 500 at 1e-4), `defaults` (the model's own, as `imagic edit` picks
them), or `E@ELR+F@FLR` (the model's defaults with these steps and learning rates):

    python benchmarks/stages.py --model shapes --methods full --recipes 100@1e-2+100@2.5e-5 defaults

`--arch sd15-unet` is the full-size Stable Diffusion 1.5 UNet with random weights (speed does not
depend on the weights) behind a small VAE and a one-layer CLIP text encoder of SD 1.5's width:
the UNet's share of the time is the real one, the rest is smaller than in SD 1.5. `--arch sdxl-unet`
is SDXL's UNet (2.6B parameters) the same way, behind one-layer text encoders of SDXL's widths (768
and 1280, pooled 1280). `--arch sd35-medium` and `--arch flux` are SD 3.5 Medium's and FLUX.1-dev's
transformers the same way, behind one-layer CLIP and T5 encoders of their widths (`--block-fraction` builds
part of their blocks). `--arch if-sized` is DeepFloyd IF's stage I (64 px) and stage II (256 px) at
their published parameter counts (`benchmarks/architectures.py` says how they are sized), sharing a
one-layer T5 of IF's width.
torch, diffusers and the imagic editor are imported inside the functions the child processes run,
so the parent that starts them stays small.
"""

import argparse
import json
import multiprocessing
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from architectures import (  # benchmarks/architectures.py, beside this script; light: imports inside
    build_flux_pipeline,
    build_if_sized_pipelines,
    build_sd15_unet_pipeline,
    build_sd35_medium_pipeline,
    build_sdxl_unet_pipeline,
)

from imagic.errors import ImagicError  # light: no torch

if TYPE_CHECKING:
    import torch

    from imagic import ImagicEditor

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
EXAMPLE_IMAGE, TARGET_TEXT = EXAMPLES / "example.png", "a photo of a sitting dog"
# The built-in model's world knows people and shapes, not dogs: its demo's edit.
SHAPES_IMAGE, SHAPES_TEXT = EXAMPLES / "person.png", "a photo of a red person sitting"
RECIPE_FORMAT = "paper | defaults | E@ELR+F@FLR"
DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
FULL_SIZE_ARCHS = ("sd15-unet", "sdxl-unet", "sd35-medium", "flux")  # one denoiser at its real size: 256 px here
ROWS = (  # (key in a method's figures, label, factor to the label's unit)
    ("embedding_s_per_step", "embedding optimisation, s/step", 1),
    ("fine_tune_s_per_step", "fine-tuning, s/step", 1),
    ("sampling_s_per_step", "sampling, s/inference step", 1),
    ("edit_s", "whole edit, s", 1),
    ("peak_memory_bytes", "peak memory, GiB", 2**-30),
    ("training_peak_bytes", "training peak, GiB", 2**-30),
)
WHOLE_EDIT_ROWS = (  # with --recipes: what a user waits for
    ("optimiser_steps", "optimiser steps (stages 1 + 2)", 1),
    ("train_s", "training, s", 1),
    ("sample_s", "sampling the model's etas, s", 1),
)


def parse_recipe(spec: str) -> str:
    """`--recipes`' values, checked: paper, defaults, or E@ELR+F@FLR."""
    if spec not in ("paper", "defaults"):
        try:
            _stage_settings(spec)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{spec!r}: expected {RECIPE_FORMAT}, e.g. 100@1e-2+100@2.5e-5")
    return spec


def _stage_settings(spec: str) -> tuple[tuple[int, float], tuple[int, float]]:
    embedding, fine_tune = spec.split("+")
    stages = tuple((int(steps), float(lr)) for steps, lr in (part.split("@") for part in (embedding, fine_tune)))
    if min(steps for steps, _ in stages) < 2 or min(lr for _, lr in stages) <= 0:
        raise ValueError(spec)  # every stage needs 2 steps: the first is a warm-up and is not timed
    return stages


def recipe_settings(editor: "ImagicEditor", recipe: str | None, method: str, args: argparse.Namespace):
    """The TrainSettings of a recipe (None: the paper's learning rates with --embedding-steps and --finetune-steps)."""
    from imagic import TrainSettings

    settings = TrainSettings(method=method) if recipe in (None, "paper") else editor.defaults.train_settings(method)
    if recipe not in ("paper", "defaults"):
        steps = ((args.embedding_steps, settings.embedding.learning_rate),
                 (args.finetune_steps, settings.fine_tune.learning_rate)) if recipe is None else _stage_settings(recipe)
        settings = replace(settings, embedding=replace(settings.embedding, steps=steps[0][0], learning_rate=steps[0][1]),
                           fine_tune=replace(settings.fine_tune, steps=steps[1][0], learning_rate=steps[1][1]))
    stage = {"copies": args.copies} if args.copies else {}
    return replace(settings, resolution=args.resolution, compile=args.compile,
                   embedding=replace(settings.embedding, **stage), fine_tune=replace(settings.fine_tune, **stage))


def load_editor(args: argparse.Namespace, tokenizer_folder: Path) -> "ImagicEditor":
    """The editor for `--model` or `--arch` on `--device` in `--dtype` (default: as ImagicEditor.from_pretrained)."""
    import torch

    from imagic import ImagicEditor
    from imagic.families import family_for
    from imagic.loading import default_device, default_dtype
    from imagic.toy import build_tiny_pipeline

    device = torch.device(args.device) if args.device else default_device()
    dtype = getattr(torch, DTYPES[args.dtype]) if args.dtype != "auto" else None
    if args.model:
        return ImagicEditor.from_pretrained(args.model, device=device, torch_dtype=dtype,
                                            super_resolution=args.super_resolution)
    upper = None
    if args.arch == "sd15-unet":
        pipe = build_sd15_unet_pipeline(tokenizer_folder, device)
    elif args.arch == "sdxl-unet":
        pipe = build_sdxl_unet_pipeline(tokenizer_folder, device)
    elif args.arch == "if-sized":
        pipe, upper = build_if_sized_pipelines(device)
    elif args.arch == "sd35-medium":
        pipe = build_sd35_medium_pipeline(tokenizer_folder, device, args.block_fraction)
    elif args.arch == "flux":
        pipe = build_flux_pipeline(tokenizer_folder, device, args.block_fraction)
    elif args.arch == "tiny-if":
        pipe, upper = build_tiny_pipeline("if", tokenizer_folder), build_tiny_pipeline("if-ii", tokenizer_folder)
    else:
        pipe = build_tiny_pipeline("sd1", tokenizer_folder)
    dtype = dtype or default_dtype(device, family_for(pipe).defaults)  # fp32 on the CPU; the family's on a GPU
    # Built in fp32: cast only if asked for another dtype.
    pipe, upper = (None if p is None else p.to(device) if dtype == torch.float32 else p.to(device, dtype)
                   for p in (pipe, upper))
    return ImagicEditor(pipe, upper)


def device_clock(device: "torch.device") -> float:
    """time.perf_counter() once the device's queued work has finished, so GPU times are not just launch times."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def measure(args: argparse.Namespace, method: str, recipe: str | None = None, quantize_base: str = "none") -> dict:
    """One whole edit with `method` (and `recipe`'s settings, over a base quantized to `quantize_base`): its times per
    step, total time and peak memory (in a fresh process)."""
    from imagic.loading import BUILTIN_NAME
    from imagic.memory import MemorySettings
    from imagic.report import environment, peak_memory_bytes, reset_peak_memory

    with tempfile.TemporaryDirectory() as tokenizer_folder:
        editor = load_editor(args, Path(tokenizer_folder))
    device = editor.family.device
    reset_peak_memory(device)

    def now() -> float:
        return device_clock(device)

    ticks: dict[str, list[float]] = {"embedding": [], "fine-tune": [], "sampling": []}  # upper levels add theirs
    peaks = {"before training": 0, "training": 0}

    def on_train_step(stage: str, step: int, loss: float) -> None:
        ticks.setdefault(stage, []).append(now())
        # The training peak: from the end of the first step to the end of the last (the memory levers hold their
        # layout then, and the loaded model is held beside it, or not, as they say).
        if not peaks["training"]:
            peaks["before training"] = peak_memory_bytes(device)
            reset_peak_memory(device)
        peaks["training"] = peak_memory_bytes(device)

    def on_sample_step(pipe, step: int, timestep, callback_kwargs: dict) -> dict:
        ticks["sampling"].append(now())
        return callback_kwargs

    settings = recipe_settings(editor, recipe, method, args)
    image, text = (SHAPES_IMAGE, SHAPES_TEXT) if args.model == BUILTIN_NAME else (EXAMPLE_IMAGE, TARGET_TEXT)
    start = now()
    state = editor.train(image, text, settings, progress=False, callback=on_train_step,
                         memory=MemorySettings(quantize_base=quantize_base))
    trained = now()
    if recipe is None:
        editor.sample(state, etas=[0.7], seeds=[0], num_inference_steps=args.sample_steps, progress=False,
                      callback_on_step_end=on_sample_step)
    else:  # as `imagic edit` samples it: the model's etas and sampling settings, from the photo the state carries
        steps = {"num_inference_steps": args.sample_steps} if args.sample_steps else {}
        editor.sample(state, seeds=[0], progress=False, callback_on_step_end=on_sample_step, **steps)
    edit_s = now() - start

    step_s = {stage: [b - a for a, b in zip(times, times[1:])] for stage, times in ticks.items()}
    return {
        "embedding_s_per_step": statistics.median(step_s["embedding"]),
        "fine_tune_s_per_step": statistics.median(step_s["fine-tune"]),
        "sampling_s_per_step": statistics.median(step_s["sampling"]),
        # an upper level's stage 2 ("fine-tune stage_2"): its own row
        **{f"{stage}_s_per_step": statistics.median(times) for stage, times in step_s.items()
           if stage.startswith("fine-tune ")},
        "edit_s": edit_s,
        "train_s": trained - start,
        "sample_s": edit_s - (trained - start),
        "optimiser_steps": sum(len(losses) for losses in state.losses.values()),
        "stopped_early": state.stopped_early,
        "settings": state.settings.to_dict(),
        "peak_memory_bytes": max(peaks["before training"], peak_memory_bytes(device)),
        "training_peak_bytes": peaks["training"],
        "step_s": step_s,  # each step after the first, per stage
        "stage_timings_s": state.timings,  # the editor's own: whole stages, warm-up included
        "resolution": [state.height, state.width],
        "parameters": {level.name: sum(p.numel() for p in level.denoiser.parameters()) for level in editor.family.levels},
        "dtype": str(editor.family.base.denoiser.dtype).removeprefix("torch."),
        "environment": environment(device),
    }


def in_fresh_process(args: argparse.Namespace, method: str, recipe: str | None = None, quantize_base: str = "none"
                     ) -> dict:
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(measure, args, method, recipe, quantize_base).result()


def format_table(results: dict[str, dict]) -> str:
    """A column per run (a method, a method and a recipe, or "lora int8": LoRA over a quantized base), each later
    run's ratio to the first, and a quantized base's to its plain LoRA."""
    names = list(results)
    width = max(10, *(len(n) + 2 for n in names))
    pairs = [(n, names[0]) for n in names[1:]]
    pairs += [(n, results[n]["plain"]) for n in names if results[n].get("plain") not in (None, names[0])]
    ratios = [f"{a}/{b}" for a, b in pairs]
    lines = [f"{'':32}" + "".join(f"{n:>{width}}" for n in names) + "".join(f"{r:>{len(r) + 2}}" for r in ratios)]
    upper = [(key, f"{key.removesuffix('_s_per_step')}, s/step", 1) for key in results[names[0]]
             if key.startswith("fine-tune ")]
    whole = WHOLE_EDIT_ROWS if "recipe" in results[names[0]] else ()
    for key, label, scale in (*ROWS[:2], *upper, *ROWS[2:4], *whole, *ROWS[4:]):
        line = f"{label:32}" + "".join(f"{results[n][key] * scale:{width}.3f}" for n in names)
        line += "".join(f"{results[a][key] / results[b][key]:{len(r) + 2}.2f}" for (a, b), r in zip(pairs, ratios))
        lines.append(line)
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", metavar="PATH_OR_ID", help="a diffusers folder or hub id")
    source.add_argument("--arch", choices=(*FULL_SIZE_ARCHS, "if-sized", "tiny", "tiny-if"),
                        help="built-in random-weight pipeline: SD 1.5's or SDXL's UNet, SD 3.5 Medium's or FLUX.1's "
                        "transformer, DeepFloyd IF's stages I and II at their parameter counts, or the tiny test one "
                        "(tiny-if: IF's stages I and II)")
    parser.add_argument("--block-fraction", type=float, default=1.0,
                        help="sd35-medium and flux: build this fraction of the transformer's blocks, for a model too "
                        "big for the machine (its figures are then scaled by hand: see docs/benchmarks.md)")
    parser.add_argument("--super-resolution", metavar="PATH_OR_ID", help="with --model: a cascade's super-resolution "
                        "stage (DeepFloyd IF's stage II), fine-tuned and sampled too")
    parser.add_argument("--resolution", type=int,
                        help="training and sampling size (default: 256 for sd15-unet, sdxl-unet, sd35-medium and "
                        "flux, else the model's own)")
    parser.add_argument("--embedding-steps", type=int, default=5)
    parser.add_argument("--finetune-steps", type=int, default=5)
    parser.add_argument("--sample-steps", type=int,
                        help="at the model's default guidance (a batch of 2 with the negative pass; FLUX: 1) (default: "
                        "5; with --recipes the model's own)")
    parser.add_argument("--methods", nargs="+", choices=("full", "lora"), default=["full", "lora"])
    parser.add_argument("--recipes", nargs="+", type=parse_recipe, metavar="RECIPE", help=f"{RECIPE_FORMAT}: whole "
                        "edits at these settings' real step counts, side by side (instead of --embedding-steps and "
                        "--finetune-steps); sampled as imagic edit samples")
    parser.add_argument("--copies", type=int, help="noised copies of the photo per training step, both stages "
                        "(default: the settings')")
    parser.add_argument("--compile", action="store_true", help="torch.compile the denoiser for training")
    parser.add_argument("--quantize-base", choices=("int8", "int4"), help="also run LoRA over the base quantized to "
                        "this (imagic.memory; needs optimum-quanto), in a column of its own after the others")
    parser.add_argument("--device", help="default: cuda if present, else cpu")
    parser.add_argument("--dtype", choices=("auto", *DTYPES), default="auto",
                        help="auto: the model family's on GPUs (fp16; bf16 for SD3 and FLUX), fp32 on the CPU")
    parser.add_argument("--json", metavar="OUT", help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    if args.sample_steps is None and not args.recipes:
        args.sample_steps = 5
    if min(args.embedding_steps, args.finetune_steps, args.sample_steps or 2) < 2:
        parser.error("every stage needs at least 2 steps: the first is a warm-up and is not timed")
    if args.resolution is None and args.arch in FULL_SIZE_ARCHS:
        args.resolution = 256
    if args.quantize_base and "lora" not in args.methods:
        parser.error("--quantize-base is compared with the plain LoRA: keep lora in --methods")
    if not 0 < args.block_fraction <= 1 or (args.block_fraction != 1 and args.arch not in ("sd35-medium", "flux")):
        parser.error("--block-fraction is a fraction in (0, 1], for --arch sd35-medium or flux")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    results = {}
    recipes = args.recipes or [None]
    runs = {}  # name: (method, recipe, quantized base)
    for method in dict.fromkeys(args.methods):
        for recipe in recipes:
            runs[method if recipe is None else f"{method} {recipe}" if len(args.methods) > 1 else recipe] = (
                method, recipe, "none")
    if args.quantize_base:
        for recipe in recipes:
            runs[" ".join(filter(None, ("lora", args.quantize_base, recipe)))] = ("lora", recipe, args.quantize_base)
    plain = {run: name for name, run in runs.items()}  # a quantized base's LoRA is compared with the plain one
    for name, (method, recipe, quantize_base) in runs.items():
        print(f"measuring {name} ...", file=sys.stderr, flush=True)
        try:
            results[name] = {**in_fresh_process(args, method, recipe, quantize_base),
                             **({"recipe": recipe} if recipe else {}),
                             **({"plain": plain.get((method, recipe, "none"))} if quantize_base != "none" else {})}
        except ImagicError as error:  # a missing model, a bad resolution: one line, as in the imagic command
            sys.exit(f"error: {error}")
    first = next(iter(results.values()))
    height, width = first["resolution"]
    parameters = ", ".join(f"{name} {count / 1e9:.3f}B" for name, count in first["parameters"].items())
    steps = (f"steps: embedding {args.embedding_steps}, fine-tune {args.finetune_steps}, sampling {args.sample_steps}"
             if not args.recipes else "whole edits: " + "; ".join(
                 f"{name}: {_recipe_line(result)}" for name, result in results.items()))
    print(f"model: {args.model or args.arch} ({parameters} parameters), {height}x{width}, {first['dtype']}; {steps}")
    print(", ".join(f"{k} {v}" for k, v in first["environment"].items()))
    print(format_table(results))
    if args.json:
        Path(args.json).write_text(json.dumps({"settings": vars(args), "results": results}, indent=2) + "\n")


def _recipe_line(result: dict) -> str:
    """What a whole edit ran: each stage's steps (and where the reconstruction check stopped it) and learning rate."""
    settings, stopped = result["settings"], result["stopped_early"]
    parts = []
    for stage, key in (("embedding", "embedding"), ("fine_tune", "fine_tune")):
        steps = settings[stage]["steps"]
        ran = f"{stopped[key]} of {steps} (stopped early)" if key in stopped else f"{steps}"
        parts.append(f"{ran}@{settings[stage]['learning_rate']:g}")
    return " + ".join(parts) + (f" x{settings['fine_tune']['copies']} copies" if settings["fine_tune"]["copies"] > 1
                                else "")


if __name__ == "__main__":
    main()
