"""The `imagic` command: a thin layer over ImagicEditor. Each command is a function of the parsed Request
(cli_options.py).

    imagic edit IMAGE "target text" --model M --out DIR   train, sample, write everything
    imagic train IMAGE "target text" --model M --state S  train only, save the edit state
    imagic sample S --eta 0.6 0.7 --seed 0 1 --out DIR    sample a saved state again
    imagic batch FOLDER --model M --out DIR [--clip C]    edit a TEdBench-style folder, resumable
    imagic export S OUT                                   the edit as files plain diffusers and other tools load
    imagic ui                                             the web app

Under a launcher (`torchrun --nproc-per-node N -m imagic.cli edit ...`), edit and train shard stage 2 over the
N processes (sharding.py); the main process alone writes and speaks.
"""

import os

# Import-time notices from transformers (e.g. about torchvision) are not for the CLI's users.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import json
import sys
import time
import warnings
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path

import diffusers
import torch
import transformers

from . import masks, sharding
from .batch import Summary, edit_pairs, pair_record, plan_pairs, read_pairs, score_pairs, write_comparisons
from .cli_options import Request, parse
from .clip_score import ClipScorer
from .editor import ImagicEditor, SampleOutput
from .errors import BatchIncomplete, ImageInputError, ImagicError, SettingsError, TrainingDivergedError, TrainingInterrupted
from .export import RECIPE_FILE, export_edit
from .image_io import save_image
from .inputs import check_regular
from .loading import BUILTIN_NAME, check_device
from .masks import AUTO, MASK_FILE
from .outputs import write_atomic
from .report import environment, peak_memory_bytes, reset_peak_memory
from .settings import SampleSettings, TrainSettings, check_sampling
from .staging import SUMMARY_NAME, Run, claimed
from .state import EditState

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
STATE_NAME = "state.safetensors"  # edit's state, beside its images


def _load_editor(request: Request, state: EditState | None = None) -> ImagicEditor:
    """The model the command names, else the state's (with the super-resolution model it was trained with)."""
    loading = request.loading
    model = loading.model or (state.base_model.get("name") if state else None) or BUILTIN_NAME
    upper = loading.super_resolution or (state.super_resolution if state else None) or None
    return ImagicEditor.from_pretrained(model, device=sharding.local_device(loading.device),
                                        torch_dtype=DTYPES.get(loading.dtype), config=loading.config,
                                        allow_pickle=loading.allow_pickle, super_resolution=upper)


def _checked_with_model(editor: ImagicEditor, request: Request, state: EditState | None = None
                        ) -> tuple[TrainSettings | None, SampleSettings | None]:
    """What only the loaded model can tell (size, scheduler, steps, levels), checked before any training; returns
    the training settings with the super-resolution levels' fine-tuning filled in, and the sampling settings
    complete: those given, over how the state was shown (sample) or the model's defaults."""
    settings, sampling = request.train, None
    if settings is not None:
        editor.resolution(settings)
        upper = editor.family.levels[1:]
        if request.super_resolution_steps is not None:
            if not upper:
                raise SettingsError("--super-resolution-steps needs a super-resolution stage: pass --super-resolution")
            steps = replace(settings.fine_tune, steps=request.super_resolution_steps)
            settings = replace(settings, upper_fine_tune={level.name: steps for level in upper})  # checked anew
    if request.sample is not None:
        shown = SampleSettings.as_recorded(state.sampling if state is not None else {})
        photo = request.command != "sample" or "image" in request.paths or bool(state and state.photo)
        sampling = editor.check_sampling(request.etas, request.seeds, shown.overridden(request.sample_given),
                                         with_photo=photo)
        if sampling.needs_photo and not photo:
            raise SettingsError("starting from the photo (--strength below 1, or --invert) or a --mask needs it, and "
                                "this edit state carries none: add --image PHOTO, the photo it was trained on")
        if settings is not None and sampling.masked and sampling.mask != AUTO:  # its shape, before any training
            masks.from_picture(sampling.mask, *editor.resolution(settings))
    return settings, sampling


def _train(editor: ImagicEditor, request: Request, settings: TrainSettings, run: Run, name: str,
           sampling: SampleSettings | None = None, outputs: tuple[str, ...] = ()) -> EditState:
    """Train and stage the state as `name` (with what finished, if training stopped), with how its edit is shown
    (`sampling`). `outputs`: every file the run writes, for the rule on what finished."""
    try:
        state = editor.train(request.paths["image"], request.target_text, settings, progress=not request.quiet,
                             memory=request.memory)
    except (TrainingDivergedError, TrainingInterrupted) as error:
        raise type(error)(f"{error}; {_keep_what_finished(error.partial_state, run, name, outputs)}") from None
    if sampling is not None:  # a mask picture by its full path: a relative one is read beside the state
        picture = sampling.masked and sampling.mask != AUTO
        state.sampling = replace(sampling, mask=os.path.abspath(sampling.mask) if picture else sampling.mask).to_dict()
    state.save(run.path(name))
    return state


def _keep_what_finished(state: EditState, run: Run, name: str, outputs: tuple[str, ...]) -> str:
    """A stopped training's state is saved where it replaces nothing; a complete run's outputs in the folder are
    kept as they were, which only another complete run replaces."""
    if not run.fresh((name, *outputs)):
        return f"kept the earlier outputs in '{run.folder}' (what finished is not saved over them)"
    state.save(run.path(name))
    run.commit([name], overwrite=False)
    return f"saved what finished to '{run.folder / name}'"


def _sample_names(request: Request) -> list[str]:
    """The files sampling may write, by name: mask.png only where the edit is masked (asked for, recorded in the
    state or the model's default), which is known once the model is, so it is kept free whatever the model."""
    names = [f"eta{eta:g}_seed{seed}.png" for seed in request.seeds for eta in request.etas]
    return [*names, "grid.png", MASK_FILE, SUMMARY_NAME]


def check_names_apart(etas: list[float]) -> None:
    """Two etas that print alike would be written to one file: refused before any work."""
    seen: dict[str, float] = {}
    for eta in etas:
        other = seen.setdefault(f"{eta:g}", eta)
        if other != eta or etas.count(eta) > 1:
            raise SettingsError(f"etas {other!r} and {eta!r} would both be written as 'eta{eta:g}_seed*.png': give "
                                "etas that differ within 6 significant digits, each once")


def _write_samples(editor: ImagicEditor, state: EditState, request: Request, settings: SampleSettings,
                   summary: dict, run: Run) -> list[str]:
    """Sample and stage the images, grid and mask; returns the names written."""
    start = time.perf_counter()
    output: SampleOutput = editor.sample(state, request.etas, request.seeds, settings, progress=not request.quiet,
                                         image=request.paths.get("image"))
    seconds = time.perf_counter() - start
    pictures = {f"eta{eta:g}_seed{seed}.png": edited for (eta, seed), edited in output.images.items()}
    pictures["grid.png"] = output.grid()
    if output.mask is not None:
        pictures[MASK_FILE] = output.mask
    for name, picture in pictures.items():
        save_image(picture, run.path(name), overwrite=True)
    summary["sampling"] = {"etas": request.etas, "seeds": request.seeds, **settings.to_dict(), "seconds": seconds}
    return list(pictures)


def _summary(state: EditState, device: torch.device, command: str) -> dict:
    return {
        "command": command, "target_text": state.target_text, "model": state.base_model.get("name"),
        "method": state.method, "settings": state.settings.to_dict(), "stages": state.stages,
        "stopped_early": state.stopped_early, "training_seconds": state.timings,
        "losses": {stage: {"first": v[0] if v else None, "last": v[-1] if v else None, "per_step": v}
                   for stage, v in state.losses.items()},
        "image_sha256": state.image_sha256, "size": [state.height, state.width],
        "environment": environment(device), "processes": sharding.world_size(),
    }


def _write_json(path: Path, data: dict, overwrite: bool) -> None:
    write_atomic(path, lambda temporary: temporary.write_text(json.dumps(data, indent=2)), overwrite)


def run_edit(request: Request) -> None:
    """Train, sample, and write images, grid, state and summary into --out, all at once at the end."""
    if not sharding.is_main():
        return _train_beside_main(request)
    with claimed(request.paths["out"]) as run:
        names = (*_sample_names(request), STATE_NAME)
        run.check_free(names, request.overwrite)
        editor = _load_editor(request)
        settings, sampling = _checked_with_model(editor, request)
        reset_peak_memory(editor.family.device)
        state = _train(editor, request, settings, run, STATE_NAME, sampling, names)
        _finish_samples(editor, state, request, sampling, run, [STATE_NAME])


def run_sample(request: Request) -> None:
    """Sample a saved state again into --out: as it was shown, unless settings are given."""
    state_path = request.paths["state"]
    state = EditState.load(state_path)
    with claimed(request.paths["out"]) as run:
        run.check_free(_sample_names(request), request.overwrite)
        editor = _load_editor(request, state)
        _, sampling = _checked_with_model(editor, request, state)
        reset_peak_memory(editor.family.device)
        inside = state_path.resolve().parent == run.folder.resolve()
        _finish_samples(editor, state, request, sampling, run, keep=[state_path.name] if inside else [])


def _finish_samples(editor: ImagicEditor, state: EditState, request: Request, sampling: SampleSettings, run: Run,
                    written: list[str] = (), keep: list[str] = ()) -> None:
    """Sample, write the summary, and commit this run's files (`written` before, with them) into the folder."""
    device = editor.family.device
    summary = _summary(state, device, request.command)
    names = [*_write_samples(editor, state, request, sampling, summary, run), *written, SUMMARY_NAME]
    summary["outputs"] = [*names, *keep]
    summary["peak_memory_bytes"] = peak_memory_bytes(device)
    _write_json(run.path(SUMMARY_NAME), summary, overwrite=True)
    run.commit(names, request.overwrite, keep=keep)
    count = len(request.etas) * len(request.seeds)
    print(f"wrote {count} edited image(s), grid.png and summary.json to '{request.paths['out']}'")


def run_train(request: Request) -> None:
    """Train only and save the edit state; its folder is claimed as an output folder is."""
    if not sharding.is_main():
        return _train_beside_main(request)
    state_path = request.paths["state"]
    with claimed(state_path.parent) as run:
        run.check_free([state_path.name], request.overwrite)
        editor = _load_editor(request)
        settings, _ = _checked_with_model(editor, request)
        _train(editor, request, settings, run, state_path.name)
        run.commit([state_path.name], request.overwrite)
        etas = " ".join(f"{eta:g}" for eta in editor.defaults.etas)
    print(f"saved the edit state to '{state_path}'; sample it with: imagic sample {state_path} --eta {etas}")


def _train_beside_main(request: Request) -> None:
    """A launcher's other processes: train beside the main process (stage 2 sharded across all), touch no output."""
    editor = _load_editor(request)
    settings, _ = _checked_with_model(editor, request)
    editor.train(request.paths["image"], request.target_text, settings, progress=False)


def _ray_batch():
    try:
        import ray  # noqa: F401
    except ImportError:
        raise SettingsError('batch --ray needs Ray: pip install "imagic[ray]"') from None
    from . import ray_batch, ray_cluster

    return ray_batch, ray_cluster


def run_batch(request: Request) -> None:
    """Edit every pair of a TEdBench-style folder into --out, resumable; score with CLIP, compare with a reference."""
    if len(request.etas) != 1 or len(request.seeds) != 1:
        raise SettingsError("batch writes one output per edit: give one --eta and one --seed")
    folder, out, reference = request.paths["folder"], request.paths["out"], request.paths.get("reference")
    pairs = read_pairs(folder, request.paths.get("list"))
    scorer = ClipScorer(request.paths["clip"]) if "clip" in request.paths else None  # a bad CLIP folder fails first
    address = request.options["ray"]
    spread, cluster = _ray_batch() if address is not None else (None, None)  # before any work: Ray may be missing
    if reference is not None and not reference.is_dir():
        raise SettingsError(f"--reference '{reference}' is not a folder: give the folder of the reference outputs")
    # Ray joined before the model loads, so that a bad address or token is said at once.
    with claimed(out) as run, (cluster.joined(None if address == "local" else address) if cluster else nullcontext()):
        summary = Summary.read(out, request.overwrite)
        editor = _load_editor(request)
        settings, sampling = _checked_with_model(editor, request)
        made_by = _batch_settings(request, settings, sampling)
        todo, kept, redone = plan_pairs(pairs, folder, out, summary, made_by, request.overwrite)
        if redone:
            print(f"{redone} output(s) in '{out}' were made with other settings: editing them again")
        options = dict(eta=request.etas[0], seed=request.seeds[0], sample_settings=sampling,
                       progress=not request.quiet, memory=request.memory,
                       edited=lambda pair: summary.commit(run, pair, pair_record(pair, folder, made_by)))
        if spread is None:
            records = edit_pairs(editor, todo, folder, run.staging, settings, **options)
        else:
            del editor  # the workers load their own
            loading = request.loading
            model = dict(model=loading.model or BUILTIN_NAME, torch_dtype=DTYPES.get(loading.dtype),
                         config=loading.config, allow_pickle=loading.allow_pickle,
                         super_resolution=loading.super_resolution)
            records = spread.edit_pairs_on_ray(model, todo, folder, run.staging, settings, **options)
        records += [{"status": "kept"}] * kept
        counts = {status: sum(r["status"] == status for r in records) for status in ("edited", "kept", "failed")}
        print(f"{counts['edited']} edited, {counts['kept']} already in '{out}', {counts['failed']} failed")
        if reference is not None:
            written = write_comparisons(pairs, folder, out, reference)
            print(f"{written} side-by-side(s) of input, reference and imagic in '{out / 'compare'}'")
        if scorer is not None:
            _score(scorer, pairs, folder, out, reference, request.paths["clip"])
    if counts["failed"]:
        raise BatchIncomplete(f"{counts['failed']} of {len(records)} edits failed (each named above); "
                              "run the same command again to retry them")


def _batch_settings(request: Request, settings: TrainSettings, sampling: SampleSettings) -> dict:
    """What a batch's outputs are made with, as its summary records it per output. Of the memory levers, those that
    can change an output are recorded where set, so that outputs made before levers existed still match a run
    without them."""
    loading = request.loading
    levers = request.memory.changing_outputs()
    return {"model": loading.model or BUILTIN_NAME, "super_resolution": loading.super_resolution,
            "dtype": loading.dtype, "train": settings.to_dict(), "sampling": sampling.to_dict(),
            "eta": request.etas[0], "seed": request.seeds[0], **({"memory": levers} if levers else {})}


def _score(scorer: ClipScorer, pairs, folder: Path, out: Path, reference: Path | None, clip: Path) -> None:
    scores = score_pairs(scorer, pairs, folder, out, reference)
    _write_json(out / "scores.json", {"clip": str(clip), **scores}, overwrite=True)
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


def run_export(request: Request) -> None:
    """The edit as files other tools load (export.py)."""
    state, out = EditState.load(request.paths["state"]), request.paths["out"]
    editor = _load_editor(request) if request.loading.model else None
    paths = export_edit(state, out, eta=request.options["eta"], overwrite=request.overwrite, editor=editor)
    print(f"wrote {len(paths)} files to '{out}'; its {RECIPE_FILE} shows how plain diffusers loads them")


def run_ui(request: Request) -> None:
    try:
        from . import webapp
    except ImportError as error:
        if (error.name or "").split(".")[0] != "gradio":
            raise
        raise SettingsError('the web app needs Gradio: pip install "imagic[ui]"') from None
    webapp.launch(**request.options)


COMMANDS = {"edit": run_edit, "train": run_train, "sample": run_sample, "batch": run_batch, "export": run_export,
            "ui": run_ui}


def _check_start(request: Request) -> None:
    """A start from the photo needs the photo, and the inversion starts at full strength."""
    settings = request.sample
    if settings.invert and settings.strength is not None and settings.strength < 1.0:
        raise SettingsError("give either --invert or a --strength below 1: the inversion starts from full strength")
    if settings.masked and settings.mask != AUTO:
        if request.command == "batch":
            raise SettingsError("batch takes --mask auto: one picture cannot fit every photo of the list")
        if not os.path.lexists(settings.mask):
            raise SettingsError(f"no mask picture at '{settings.mask}': give --mask auto or a picture's path")
        check_regular(settings.mask, "mask picture", SettingsError)


def run(request: Request) -> None:
    if sharding.launched() and request.command not in sharding.LAUNCHED_COMMANDS:
        raise SettingsError(f"{request.command} runs in one process; under a launcher (torchrun, accelerate launch) "
                            f"run {' or '.join(sharding.LAUNCHED_COMMANDS)}")
    if request.quiet or not sharding.is_main():
        diffusers.utils.logging.disable_progress_bar()
        transformers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.set_verbosity_error()  # its notices (a scheduler's config adjusted, ...) are not errors
    if request.sample is not None:  # what needs no model, checked before any file is read or folder claimed
        _check_start(request)
        check_sampling(request.etas, request.seeds, request.sample)
        check_names_apart(request.etas)
    if "image" in request.paths:  # not a FIFO or a folder: that would hang or fail after the folder is claimed
        check_regular(request.paths["image"], "image", ImageInputError)
    if request.command != "ui":
        check_device(request.loading.device)
    COMMANDS[request.command](request)


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"imagic: warning: {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """Run a command; under a launcher, in one process of several, of which the main one alone speaks and writes."""
    with sharding.processes():
        say = _say if sharding.is_main() else lambda message: None
        warnings.showwarning = _one_line_warning if sharding.is_main() else lambda *args, **kwargs: None
        try:
            run(parse(sys.argv[1:] if argv is None else argv))
        except TrainingInterrupted as error:
            say(f"stopped: {error}")
            return 130
        except KeyboardInterrupt:
            say("interrupted")
            return 130
        except ImagicError as error:
            say(f"error: {error}")
            return 1
    return 0


def _say(message: str) -> None:
    print(f"imagic: {message}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
