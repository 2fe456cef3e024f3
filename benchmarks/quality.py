"""Edit quality on the shapes world, scored against the truth: Imagic against SDEdit and text-only.

    python benchmarks/quality.py              # 102 cases x 3 seeds, 6 screened: the table and plot in docs/benchmarks.md
    python benchmarks/quality.py --quick      # 6 cases (2 per kind, 1 screened), one seed: a check in minutes
    python benchmarks/quality.py --quick --long --out outputs/quality-long   # paper-like fine-tuning lengths
    python benchmarks/quality.py --model FOLDER --out outputs/quality-new     # a retrained shapes model
    python benchmarks/quality.py --every 5 --run full:2.5e-5:25,50 --out outputs/probe   # a probe: 21 cases, other runs
    python benchmarks/quality.py --run full:2.5e-5:100 --seeds 1 --out outputs/probe-seeds  # 1 sample per case
    python benchmarks/quality.py --kind shape --run full:2.5e-5:100:100 --etas 0,1.2,1.6 --out outputs/probe-shape
    python benchmarks/quality.py --guidance 7.5 --out outputs/quality-guidance7.5   # every method at another guidance
    python benchmarks/quality.py --starts noise --out outputs/probe-paper     # the paper's noise start only
    python benchmarks/quality.py --every 5 --run full:2.5e-5:200:0:1e-2:joint,copies=4,stop=0.5 \
        --variants paper,forget-encoder --out outputs/probe-forgedit          # Forgedit's joint stage, forgetting
    python benchmarks/quality.py --decide-starts photo --decide-variants forget-kv --out outputs/probe-decide

Every case (imagic/shapes/cases.py) is edited on the built-in model, with the same training and
sampling seeds per case, and every output is scored (imagic/shapes/scoring.py). Two tiers keep the
hour: the configurations that decide (the first run's checkpoints, sampled from DECIDE_STARTS in
DECIDE_VARIANTS) and SDEdit sample every case from 3 seeds (`--seeds`; Imagic still trains once per
case), text-only from the first; every other configuration (Sampling.tier) is screened on every
17th case (`--screen-every`) from the case's first seed, where SDEdit is compared on the same samples.
Imagic trains once per case and fine-tuning run; its checkpoints give the shorter budgets, and
each is sampled from three starts (--starts): from noise as the paper does, at every eta of ETAS (or
--etas); from the photo noised to each of PHOTO_STRENGTHS at eta PHOTO_ETA (`-photo`; or
--photo-strengths, --photo-etas); and from a DDIM inversion of the photo under e_opt at every eta
(`-inverted`). SDEdit is diffusers' img2img on
the same model at every strength of STRENGTHS; text-only samples the target text with no image.
Beyond the paper, from Forgedit (Zhang et al., 2023): a run can train the embedding in stage 2 too
(`joint`), on several noised copies of the photo per step (`copies=N`), and end stage 2 on a
reconstruction check (`stop=RATIO`); and trained edits are sampled (as Sampling.tier says) in each
of --variants (VARIANTS: the paper's interpolation, Forgedit's vector projection, and forgetting
the UNet's encoder, its decoder, or all but the encoder's cross-attention keys and values).
Every method samples with the same sampler: 20 DDIM steps at guidance GUIDANCE_SCALE (or
--guidance). Eta 0 is Imagic's "ignore the text" extreme, text-only the "ignore the image" one.

The verdict (`compare_with_sdedit`), on the deciding tier and again on the screen, holds each
Imagic configuration (a training, a checkpoint, a start and a variant, over its etas or strengths)
against SDEdit over all its strengths: its best point must edit more cases than SDEdit's best point
(success counts the subject's identity) at no less background PSNR, with an exact sign test across
cases (each case's success rate over its seeds) at p < 0.05, and the area under its success / background-PSNR curve must be
larger over the range where both edit at least half the cases. The cheapest deciding configuration
that does all three (training time, then peak memory) is the one the built-in model should ship; a
screened one that does is a candidate for --decide-starts / --decide-variants / the first --run.

Cases run in worker processes (one torch thread each); each case's scores are written to
OUT/cases/<case>.json as soon as it finishes, so a stopped run resumes where it stopped (a
case scored under other settings, or under another model, is run again). Writes OUT/summary.json,
OUT/points.csv, OUT/screen-points.csv, OUT/table.md and OUT/tradeoff.png, and per case a grid of
every output under OUT/grids/.
"""

import argparse
import csv
import hashlib
import json
import math
import multiprocessing
import os
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from pathlib import Path

from tqdm.auto import tqdm

import imagic.shapes
from imagic.shapes.cases import EDIT_KINDS, edit_cases  # light: numpy and PIL; torch loads in the workers

BUILT_IN_MODEL = Path(imagic.shapes.__file__).parent / "model"  # imagic.shapes.model would import diffusers here
ETAS = (0.0, 0.8, 1.0, 1.2, 1.4)
STRENGTHS = (0.3, 0.45, 0.6, 0.75, 0.9)
STARTS = ("noise", "photo", "inverted")  # where Imagic's sampling starts; "noise" is the paper's
# How the trained edit is sampled beyond the paper (Forgedit): the options of ImagicEditor.sample per variant.
VARIANTS = {
    "paper": {},
    "project": {"mix": "project"},
    "forget-encoder": {"forget": "encoder"},
    "forget-decoder": {"forget": "decoder"},
    "forget-kv": {"forget": "all-but-encoder-kv"},
}
# The configurations that decide (the first run's checkpoints from these starts, in these variants) are sampled
# on every case from DECIDING_SEEDS seeds; every other one is screened: every SCREEN_EVERY-th case, one seed.
# The photo start decides: on 11 cases (every 10th, one seed) it edited the most at each background PSNR that
# SDEdit reached (docs/benchmarks.md); the paper's noise start and the inversion are screened.
DECIDE_STARTS = ("photo",)
DECIDE_VARIANTS = ("paper",)
DECIDING_SEEDS = 3
SCREEN_EVERY = 17  # 6 cases, 2 per kind: what the hour leaves after 102 cases x 3 seeds
PHOTO_STRENGTHS = (0.5, 0.6, 0.7, 0.8, 0.9)
PHOTO_ETA = 1.0
GUIDANCE_SCALE = 4.0  # every method's, and the built-in model's default; docs/benchmarks.md has a run at 7.5
QUICK_CASES = (0, 1, 2, 3, 4, 5)


@dataclass(frozen=True)
class Sampling:
    """How every method samples every case: Imagic at each of `etas`, all with the same sampler settings.
    The deciding configurations (`decides`) and SDEdit sample every case from `seed_count` seeds, text-only
    from the first; the others (`tier`) sample the screened cases (`screened`) from the case's own seed."""

    etas: tuple[float, ...] = ETAS
    seed_count: int = DECIDING_SEEDS
    guidance_scale: float = GUIDANCE_SCALE
    num_inference_steps: int = 20
    starts: tuple[str, ...] = STARTS
    variants: tuple[str, ...] = tuple(VARIANTS)  # each sampled from every start
    decide_starts: tuple[str, ...] = DECIDE_STARTS
    decide_variants: tuple[str, ...] = DECIDE_VARIANTS
    screen_every: int = SCREEN_EVERY
    photo_strengths: tuple[float, ...] = PHOTO_STRENGTHS
    photo_etas: tuple[float, ...] = (PHOTO_ETA,)

    def decides(self, run_number: int, start: str, variant: str) -> bool:
        """Whether a configuration decides: the first run's, from a deciding start, in a deciding variant."""
        return run_number == 0 and start in self.decide_starts and variant in self.decide_variants

    def tier(self, run_number: int, start: str, variant: str) -> str | None:
        """"decide", "screen" or None (not sampled). Screened: every run in every variant from the deciding
        starts, and the first run from its other starts in the paper's variant."""
        if self.decides(run_number, start, variant):
            return "decide"
        if start in self.decide_starts or (run_number == 0 and variant == "paper"):
            return "screen"
        return None

    def screened(self, index: int) -> bool:
        """Whether case `index` is sampled in every configuration (every `screen_every`-th case; the kinds take
        turns, so a step not divisible by 3 keeps them balanced)."""
        return index % self.screen_every == 0

    @staticmethod
    def photo_name(name: str, eta: float) -> str:
        """A photo start's method name: `-photo` at PHOTO_ETA, `-photo-eta<eta>` at any other eta."""
        return f"{name}-photo" if eta == PHOTO_ETA else f"{name}-photo-eta{eta:g}"

    @property
    def sampler(self) -> dict:
        return {"num_inference_steps": self.num_inference_steps, "guidance_scale": self.guidance_scale}


@dataclass(frozen=True)
class ImagicRun:
    """One training per case; each checkpoint (fine-tuning steps) is a method of its own. Beyond the paper
    (Forgedit): `joint` trains the embedding in stage 2 too, `copies` noised copies of the photo per step,
    `stop_ratio` ends stage 2 on the reconstruction check (its one checkpoint is then the most steps)."""

    method: str  # "full" or "lora"
    embedding_steps: int
    embedding_lr: float
    finetune_lr: float
    checkpoints: tuple[int, ...]  # the last one is the run's length
    joint: bool = False
    copies: int = 1
    stop_ratio: float | None = None

    def name(self, steps: int) -> str:
        options = ("-joint" if self.joint else "") + (f"-x{self.copies}" if self.copies > 1 else "") + (
            f"-stop{self.stop_ratio:g}" if self.stop_ratio is not None else "")
        return f"imagic-{self.method}-{self.embedding_steps}+{steps}{options}"

    def settings(self, seed: int):
        from imagic.settings import StageSettings, TrainSettings

        return TrainSettings(
            embedding=StageSettings(self.embedding_steps, self.embedding_lr, copies=self.copies),
            fine_tune=StageSettings(self.checkpoints[-1], self.finetune_lr, copies=self.copies,
                                    stop_ratio=self.stop_ratio),
            method=self.method, seed=seed, joint=self.joint,
        )


# Stage 1 of every run: runs that share it share its result within a case. 100 steps: on world version 1, 300
# edited one case of 102 more, but on version 2 its 17 s more per case would take the benchmark past the hour.
EMBEDDING_STEPS, EMBEDDING_LR = 100, 1e-2

# Full fine-tuning at a low learning rate for many steps: on 17 pose cases 2.5e-5 x 200-400 steps kept more
# of the photo at the same edit success than 1e-4 x 25-100 did (docs/benchmarks.md); LoRA 50 was dominated.
# 300 steps after 300 embedding steps would take the run past the hour; --run full:2.5e-5:300 measures it.
# The first run decides (Sampling.decides): 100 fine-tuning steps (200 edited no more on the 11 cases and cost
# 17 s more per case). The others are screened, beyond the paper: a stage 2 ended by its reconstruction check,
# and Forgedit's one joint stage on 4 noised copies of the photo per step.
IMAGIC_RUNS = (
    ImagicRun("full", EMBEDDING_STEPS, EMBEDDING_LR, 2.5e-5, (100,)),
    ImagicRun("full", EMBEDDING_STEPS, EMBEDDING_LR, 2.5e-5, (400,), stop_ratio=0.5),
    ImagicRun("full", 0, EMBEDDING_LR, 2.5e-5, (200,), joint=True, copies=4, stop_ratio=0.5),
)
# Paper-like lengths (SD recipes fine-tune for 1000 steps) at the same learning rates, too slow for every case
# on a CPU: `--long`.
LONG_RUNS = (
    ImagicRun("full", EMBEDDING_STEPS, EMBEDDING_LR, 2.5e-5, (400, 1000)),
    ImagicRun("lora", EMBEDDING_STEPS, EMBEDDING_LR, 2e-3, (250, 500)),
)


RUN_FORMAT = "METHOD:LR:STEPS[,STEPS...][:EMBEDDING_STEPS[:EMBEDDING_LR[:OPTIONS]]]"


def _run_options(text: str) -> dict:
    """`joint,copies=4,stop=0.5`: ImagicRun's options beyond the paper."""
    options: dict = {}
    for option in filter(None, text.split(",")):
        key, _, value = option.partition("=")
        if key == "joint" and not value:
            options["joint"] = True
        elif key == "copies":
            options["copies"] = int(value)
        elif key == "stop":
            options["stop_ratio"] = float(value)
        else:
            raise ValueError(option)
    return options


def parse_run(spec: str) -> ImagicRun:
    """`--run METHOD:LR:STEPS[,STEPS...][:EMBEDDING_STEPS[:EMBEDDING_LR[:OPTIONS]]]`, e.g. `full:2.5e-5:100,200`:
    a fine-tuning run with checkpoints at each listed step count, after an embedding stage of EMBEDDING_STEPS at
    EMBEDDING_LR unless given (`full:2.5e-5:100,200:100` optimises the embedding for 100 steps). OPTIONS,
    comma-separated: `joint`, `copies=N`, `stop=RATIO` (`full:2.5e-5:200:0:1e-2:joint,copies=4,stop=0.5` is
    Forgedit's one joint stage of at most 200 steps)."""
    fields = spec.split(":")
    try:
        if not 3 <= len(fields) <= 6:
            raise ValueError
        method, learning_rate, steps = fields[:3]
        checkpoints = tuple(int(s) for s in steps.split(","))
        embedding_steps = int(fields[3]) if len(fields) > 3 else EMBEDDING_STEPS
        embedding_lr = float(fields[4]) if len(fields) > 4 else EMBEDDING_LR
        options = _run_options(fields[5]) if len(fields) > 5 else {}
        run = ImagicRun(method, embedding_steps, embedding_lr, float(learning_rate), checkpoints, **options)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{spec!r}: expected {RUN_FORMAT}, e.g. full:2.5e-5:100,200, "
                                         "full:2.5e-5:100:100 or full:2.5e-5:200:0:1e-2:joint,copies=4,stop=0.5")
    if run.stop_ratio is not None and len(checkpoints) > 1:
        raise argparse.ArgumentTypeError(f"{spec!r}: a run that stops on its reconstruction check has one step "
                                         "count, its most: a checkpoint after the stop would not exist")
    if method not in ("full", "lora"):
        raise argparse.ArgumentTypeError(f"{spec!r}: the method must be full or lora, not {method!r}")
    if list(checkpoints) != sorted(set(checkpoints)) or checkpoints[0] < 1 or run.finetune_lr <= 0:
        raise argparse.ArgumentTypeError(f"{spec!r}: the learning rate must be positive and the step counts "
                                         "increasing and at least 1")
    if embedding_steps < (0 if run.joint else 1) or embedding_lr <= 0:
        raise argparse.ArgumentTypeError(f"{spec!r}: the embedding stage needs a positive learning rate and at least "
                                         "1 step (0 with joint)")
    from imagic.errors import SettingsError

    try:
        run.settings(0)
    except SettingsError as error:  # e.g. copies or the stop ratio out of range
        raise argparse.ArgumentTypeError(f"{spec!r}: {error}") from None
    return run


def parse_etas(spec: str) -> tuple[float, ...]:
    """`--etas 0,1.2,1.6`: the interpolation weights every Imagic checkpoint is sampled at."""
    try:
        etas = tuple(float(e) for e in spec.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{spec!r}: expected comma-separated numbers, e.g. 0,1,1.2")
    if list(etas) != sorted(set(etas)):
        raise argparse.ArgumentTypeError(f"{spec!r}: the etas must be increasing")
    return etas


def parse_variants(spec: str) -> tuple[str, ...]:
    """`--variants paper,project`: how each trained edit is sampled (VARIANTS)."""
    variants = tuple(spec.split(","))
    if not variants or any(v not in VARIANTS for v in variants) or len(set(variants)) != len(variants):
        raise argparse.ArgumentTypeError(f"{spec!r}: expected some of {','.join(VARIANTS)}, each once")
    return variants


def parse_starts(spec: str) -> tuple[str, ...]:
    """`--starts noise,inverted`: where Imagic's sampling starts (STARTS)."""
    starts = tuple(spec.split(","))
    if not starts or any(start not in STARTS for start in starts) or len(set(starts)) != len(starts):
        raise argparse.ArgumentTypeError(f"{spec!r}: expected some of {','.join(STARTS)}, each once")
    return starts


def model_fingerprint(folder: Path) -> str:
    """A digest of a pipeline folder's weights and configs (not its model card)."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name not in ("README.md", "card.json")):
        digest.update(path.relative_to(folder).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def settings_fingerprint(runs: tuple[ImagicRun, ...], model: Path, sampling: Sampling = Sampling()) -> str:
    """What a case's scores depend on: a changed method, sampling setting or model reruns the case."""
    spec = {"runs": [asdict(r) for r in runs], "etas": sampling.etas, "strengths": STRENGTHS,
            "sampling": sampling.sampler, "seeds": sampling.seed_count, "model": model_fingerprint(model),
            "starts": sampling.starts, "photo": [sampling.photo_strengths, *sampling.photo_etas],
            "variants": {name: VARIANTS[name] for name in sampling.variants},
            "decide": [sampling.decide_starts, sampling.decide_variants], "screen_every": sampling.screen_every}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def sampling_seeds(index: int, count: int) -> list[int]:
    """A case's sampling seeds: its index first (so one seed is the case's training seed), then index + 1000 j,
    which no other case uses."""
    return [index + 1000 * j for j in range(count)]


# Worker side: one editor and classifier per process, loaded once.
_worker: dict = {}


def _start_worker(model: Path, threads: int = 1) -> None:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    import diffusers
    import torch

    from imagic.editor import ImagicEditor
    from imagic.shapes.classifier import load_classifier
    from imagic.shapes.model import CLASSIFIER_FILE

    torch.set_num_threads(threads)
    diffusers.utils.logging.disable_progress_bar()
    _worker["editor"] = ImagicEditor.from_pretrained(str(model), device="cpu")
    _worker["classifier"] = load_classifier(CLASSIFIER_FILE)


def _points(method: str, knob: str, values, scores: list[dict], cost: dict, steps: int, seed: int,
            tier: str = "decide") -> list[dict]:
    return [{"method": method, "knob": knob, "value": value, "seed": seed, "tier": tier, **score, **cost,
             "optimiser_steps": steps} for value, score in zip(values, scores)]


def _peak_mib() -> float:
    import torch

    from imagic.report import peak_memory_bytes

    return peak_memory_bytes(torch.device("cpu")) / 2**20


def _reset_peak() -> None:
    import torch

    from imagic.report import reset_peak_memory

    reset_peak_memory(torch.device("cpu"))


def run_case(index: int, runs: tuple[ImagicRun, ...], grid_folder: Path | None, sampling: Sampling = Sampling()) -> dict:
    """Every method on one case: its scored points (one per method, setting and seed) and, if asked, a grid of
    its first seed's outputs. The deciding configurations and SDEdit sample each of the case's seeds (an inverted
    start, deterministic, once), text-only the first; on a screened case the screened configurations
    (Sampling.tier) sample its first seed."""
    import torch
    from diffusers import StableDiffusionImg2ImgPipeline

    from imagic.shapes.scoring import score_outputs

    editor, classifier = _worker["editor"], _worker["classifier"]
    case = edit_cases()[index]
    truth = case.render()
    seeds, etas, sampler = sampling_seeds(index, sampling.seed_count), sampling.etas, sampling.sampler
    screened = sampling.screened(index)
    points, rows = [], []

    def sample_states(run_number: int, run: ImagicRun, state, peak_mib: float) -> None:
        steps = state.settings["fine_tune"]["steps"]
        for start in sampling.starts:
            for variant in sampling.variants:
                tier = sampling.tier(run_number, start, variant)
                if tier == "decide" or (tier == "screen" and screened):
                    sample_start(run, state, peak_mib, steps, start, variant, seeds if tier == "decide" else seeds[:1],
                                 tier)

    def sample_start(run: ImagicRun, state, peak_mib: float, steps: int, start: str, variant: str,
                     seeds: list[int], tier: str) -> None:
        name = run.name(steps) + ("" if variant == "paper" else f"-{variant}")
        options: dict = {"batch_size": len(etas), **VARIANTS[variant]}
        if start == "inverted":  # deterministic: every seed would give the same images
            name, options = f"{name}-inverted", {**options, "image": truth["input"], "invert": True}
            seeds = seeds[:1]
        began = time.perf_counter()
        if start == "photo":  # one strength per call: the start's noise level is the knob here; each eta a method
            strengths, photo_etas = sampling.photo_strengths, list(sampling.photo_etas)
            images_by = {}
            for strength in strengths:
                output = editor.sample(state, photo_etas, seeds, progress=False, image=truth["input"],
                                       strength=strength, batch_size=len(photo_etas), **VARIANTS[variant], **sampler)
                images_by.update({(sampling.photo_name(name, eta), strength, seed): output.images[(eta, seed)]
                                  for eta in photo_etas for seed in seeds})
            methods = [(sampling.photo_name(name, eta), "strength", strengths) for eta in photo_etas]
        else:
            output = editor.sample(state, etas, seeds, progress=False, **options, **sampler).images
            images_by = {(name, eta, seed): image for (eta, seed), image in output.items()}
            methods = [(name, "eta", etas)]
        cost = {"train_s": sum(state.timings.values()), "peak_mib": peak_mib,
                "sample_s": (time.perf_counter() - began) / (len(images_by))}
        for method, knob, values in methods:
            for seed in seeds:
                images = [images_by[(method, value, seed)] for value in values]
                points.extend(_points(method, knob, values, score_outputs(case, images, classifier), cost,
                                      sum(len(losses) for losses in state.losses.values()), seed, tier))
                if seed == index:
                    rows.append((method, images))

    embeddings = {}  # runs with the same stage-1 settings share its result
    for run_number, run in enumerate(runs if screened else runs[:1]):
        settings = run.settings(index)
        key = (run.embedding_steps, run.embedding_lr, run.copies)
        _reset_peak()
        def at_checkpoints(steps: int, snapshot, number=run_number, run=run) -> None:
            if steps in run.checkpoints[:-1]:
                sample_states(number, run, snapshot(), _peak_mib())

        final = editor.train(truth["input"], case.target_text, settings, progress=False,
                             on_fine_tune_step=at_checkpoints, embedding_from=embeddings.get(key))
        peak = _peak_mib()
        if not run.joint:  # a joint run's e_opt moved on in stage 2
            embeddings.setdefault(key, final)
        sample_states(run_number, run, final, peak)

    img2img = StableDiffusionImg2ImgPipeline(**editor.pipe.components, requires_safety_checker=False)
    img2img.set_progress_bar_config(disable=True)
    editor.pipe.set_progress_bar_config(disable=True)
    def generators(seeds: list[int]) -> list:
        return [torch.Generator().manual_seed(seed) for seed in seeds]

    # Every seed in one batch: each image's noise comes from its own seed's generator.
    by_strength, per_image = {}, {}
    for strength in STRENGTHS:
        start = time.perf_counter()
        by_strength[strength] = img2img([case.target_text] * len(seeds), image=[truth["input"]] * len(seeds),
                                        strength=strength, generator=generators(seeds), **sampler).images
        per_image[strength] = (time.perf_counter() - start) / len(seeds)
    for number, seed in enumerate(seeds):
        images = [by_strength[strength][number] for strength in STRENGTHS]
        for strength, score in zip(STRENGTHS, score_outputs(case, images, classifier)):
            cost = {"train_s": 0.0, "peak_mib": 0.0, "sample_s": per_image[strength]}
            points.extend(_points("sdedit", "strength", [strength], [score], cost, 0, seed))
        if seed == index:
            rows.append(("sdedit", images))

    # Text-only decides nothing (it is the "ignore the image" extreme): the case's first seed.
    start = time.perf_counter()
    [image] = editor.pipe(case.target_text, generator=generators(seeds[:1])[0], **sampler).images
    cost = {"train_s": 0.0, "peak_mib": 0.0, "sample_s": time.perf_counter() - start}
    points.extend(_points("text-only", "none", [None], score_outputs(case, [image], classifier), cost, 0, seeds[0]))
    rows.append(("text-only", [image]))

    if grid_folder is not None:
        _save_grid(grid_folder / f"{case.name}.png", case, truth, rows)
    return {"case": case.name, "index": index, "kind": case.kind, "source": case.scene.caption,
            "target_text": case.target_text, "points": points}


def _save_grid(path: Path, case, truth: dict, rows: list[tuple[str, list]]) -> None:
    """One row per method (its etas or strengths left to right), below the input and the ideal edit."""
    from PIL import Image

    from imagic.image_io import image_grid

    rows = [(f"{case.name}: input, ideal", [truth["input"], truth["ideal"]]), *rows]
    width = max(len(images) for _, images in rows)
    blank = Image.new("RGB", truth["input"].size, "white")
    cells = [[image.resize((128, 128)) for image in images] + [blank] * (width - len(images)) for _, images in rows]
    path.parent.mkdir(parents=True, exist_ok=True)
    image_grid(cells, [name for name, _ in rows]).save(path)


def run_cases(indices: list[int], runs: tuple[ImagicRun, ...], out: Path, workers: int, model: Path,
              fingerprint: str, sampling: Sampling = Sampling()) -> list[dict]:
    """Score every case not already scored under `fingerprint` (settings_fingerprint); returns all cases' results."""
    case_folder = out / "cases"
    case_folder.mkdir(parents=True, exist_ok=True)
    cases = edit_cases()
    results, todo = {}, []
    for index in indices:
        path = case_folder / f"{cases[index].name}.json"
        saved = json.loads(path.read_text()) if path.is_file() else None
        if saved is not None and saved.get("fingerprint") == fingerprint:
            results[index] = saved
        else:
            todo.append((index, path))
    if todo:
        start = time.perf_counter()
        print(f"{len(results)} case(s) already scored; running {len(todo)} with {workers} worker(s)", file=sys.stderr)
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(workers, mp_context=context, initializer=_start_worker,
                                 initargs=(model,)) as pool:
            jobs = {pool.submit(run_case, index, runs, out / "grids", sampling): (index, path) for index, path in todo}
            for job in tqdm(as_completed(jobs), total=len(jobs), desc="cases"):
                index, path = jobs[job]
                result = {**job.result(), "fingerprint": fingerprint}
                path.write_text(json.dumps(result))
                results[index] = result
        print(f"ran {len(todo)} case(s) in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    return [results[i] for i in indices]


def summarise(results: list[dict]) -> list[dict]:
    """Mean of every metric per (method, knob value), overall and per edit kind."""
    from imagic.shapes.scoring import METRICS

    groups: dict[tuple, list[dict]] = {}
    for result in results:
        for point in result["points"]:
            for kind in ("all", result["kind"]):
                groups.setdefault((point["method"], point["knob"], point["value"], kind), []).append(
                    {**point, "case": result["case"]})
    rows = []
    for (method, knob, value, kind), points in groups.items():
        row = {"method": method, "knob": knob, "value": value, "kind": kind,
               "cases": len({p["case"] for p in points}), "samples": len(points)}
        for metric in (*METRICS, "train_s", "peak_mib", "sample_s", "optimiser_steps"):
            row[metric] = statistics.fmean(p[metric] for p in points)
        rows.append(row)
    return rows


def best_point(rows: list[dict], method: str) -> dict | None:
    """The method's highest-success point overall; ties go to the better preservation."""
    candidates = [r for r in rows if r["method"] == method and r["kind"] == "all"]
    return max(candidates, key=lambda r: (r["success"], r["background_psnr"]), default=None)


def paired_outcomes(results: list[dict], first: dict, second: dict) -> dict[str, int]:
    """Case by case, which of two points (method and value) edits more often over its samples (its seeds; a
    deterministic start has one): the cases where one does are what a difference in success rests on. Counting
    cases, not samples, keeps a case's seeds from counting as independent evidence."""
    counts = {"first_more": 0, "second_more": 0, "tied": 0}
    for result in results:
        rates = [statistics.fmean(p["success"] for p in result["points"]
                                  if (p["method"], p["value"]) == (point["method"], point["value"]))
                 for point in (first, second)]
        counts["first_more" if rates[0] > rates[1] else "second_more" if rates[1] > rates[0] else "tied"] += 1
    return counts


def exact_sign_test_p(first_more: int, second_more: int) -> float:
    """Two-sided exact sign test on the untied cases (McNemar's exact test when each case has one sample):
    how likely a split at least this uneven is if both points edit equally often (each untied case a fair coin)."""
    untied = first_more + second_more
    tail = sum(math.comb(untied, k) for k in range(min(first_more, second_more) + 1)) / 2**untied
    return min(1.0, 2 * tail)


def curve(rows: list[dict], method: str) -> list[tuple[float, float]]:
    """The method's points overall as (background PSNR, success)."""
    return sorted((r["background_psnr"], r["success"]) for r in rows if r["method"] == method and r["kind"] == "all")


def success_keeping(points: list[tuple[float, float]], psnr: float) -> float:
    """The best success among the points that keep at least `psnr` dB of background: the curve's upper envelope."""
    return max((success for p, success in points if p >= psnr), default=0.0)


def shared_areas(first: list[tuple[float, float]], second: list[tuple[float, float]]) -> dict | None:
    """Mean success of each curve's envelope (success_keeping) from the lowest background PSNR either curve
    measured up to where one of them no longer edits half the cases: the area under the curve there, divided
    by the range's width; None if that range is empty."""
    low = min(p for p, _ in first + second)
    high = min(max((p for p, s in points if s >= 0.5), default=-math.inf) for points in (first, second))
    if not high > low:
        return None
    edges = sorted({low, high, *(p for p, _ in first + second if low < p < high)})
    # Between two neighbouring edges the envelope is constant: its value at the upper edge.
    means = [sum((b - a) * success_keeping(points, b) for a, b in zip(edges, edges[1:])) / (high - low)
             for points in (first, second)]
    return {"range_db": [low, high], "first": means[0], "second": means[1]}


def compare_with_sdedit(rows: list[dict], results: list[dict], method: str) -> dict:
    """The issue's test of one Imagic configuration against SDEdit at all its strengths: a better best point
    (more success, no less background PSNR), significantly so across cases (exact sign test p < 0.05),
    and a larger area under the success / background-PSNR curve where both edit at least half the cases."""
    best, sdedit = best_point(rows, method), best_point(rows, "sdedit")
    paired = paired_outcomes(results, best, sdedit)
    p_value = exact_sign_test_p(paired["first_more"], paired["second_more"])
    areas = shared_areas(curve(rows, method), curve(rows, "sdedit"))
    checks = {
        "better_best_point": best["success"] > sdedit["success"] and best["background_psnr"] >= sdedit["background_psnr"],
        "significant": paired["first_more"] > paired["second_more"] and p_value < 0.05,
        "larger_area": areas is not None and areas["first"] > areas["second"],
    }
    return {"best": best, "paired": {**paired, "p_value": p_value}, "areas": areas, **checks, "beats": all(checks.values())}


def _trains_as_shipped(run: ImagicRun) -> bool:
    """Whether `run` trains as the built-in model's defaults do (its name leaves out the learning rates)."""
    from imagic.defaults import SHAPES

    fine_tune = SHAPES.fine_tune[SHAPES.method]
    shipped = (SHAPES.method, SHAPES.embedding.steps, SHAPES.embedding.learning_rate, fine_tune.learning_rate,
               False, 1, None)
    return (run.method, run.embedding_steps, run.embedding_lr, run.finetune_lr, run.joint, run.copies,
            run.stop_ratio) == shipped and fine_tune.steps in run.checkpoints


def choose_default(rows: list[dict], results: list[dict], sampling: Sampling = Sampling(),
                   runs: tuple[ImagicRun, ...] = IMAGIC_RUNS) -> dict:
    """Every Imagic configuration held against SDEdit (compare_with_sdedit); the cheapest that beats it (training
    time, then peak memory) is what the built-in model should ship. Also where the shipped defaults
    (imagic.defaults.SHAPES: their training, start and eta) land, if this run trained (`runs`) and sampled them
    as they ship."""
    from imagic.defaults import SHAPES

    comparisons = {m: compare_with_sdedit(rows, results, m) for m in methods_in(rows) if m.startswith("imagic")}
    winners = [m for m, c in comparisons.items() if c["beats"]]
    cheapest = min(winners, key=lambda m: (comparisons[m]["best"]["train_s"], comparisons[m]["best"]["peak_mib"]),
                   default=None)
    method = f"imagic-{SHAPES.method}-{SHAPES.embedding.steps}+{SHAPES.fine_tune[SHAPES.method].steps}"
    value = SHAPES.eta
    if SHAPES.strength < 1.0:  # the photo start, sampled at each of its etas over its strengths
        method, value = sampling.photo_name(method, SHAPES.eta), SHAPES.strength
    as_shipped = Sampling(guidance_scale=SHAPES.guidance_scale, num_inference_steps=SHAPES.num_inference_steps)
    shipped = None if sampling.sampler != as_shipped.sampler or not any(map(_trains_as_shipped, runs)) else next(
        (r for r in rows if r["method"] == method and r["value"] == value and r["kind"] == "all"), None)
    return {"sdedit_best": best_point(rows, "sdedit"), "text_only": best_point(rows, "text-only"),
            "comparisons": comparisons, "winners": winners,
            "cheapest_winner": None if cheapest is None else comparisons[cheapest]["best"], "shipped_default": shipped}


def deciding(results: list[dict]) -> list[dict]:
    """Every case with only its deciding points: the deciding configurations, SDEdit and text-only."""
    return [{**r, "points": [p for p in r["points"] if p["tier"] == "decide"]} for r in results]


def screen(results: list[dict]) -> list[dict]:
    """The screened cases (those with screened points) with every configuration's points from the case's own
    seed, the one every configuration sampled there: SDEdit compared on the same samples."""
    return [{**r, "points": [p for p in r["points"] if p["seed"] == r["index"]]}
            for r in results if any(p["tier"] == "screen" for p in r["points"])]


def _write_points(rows: list[dict], path: Path) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, list(rows[0]))
        writer.writeheader()
        writer.writerows(sorted(rows, key=lambda r: (r["method"], r["kind"], str(r["value"]))))


def write_outputs(results: list[dict], out: Path, runs: tuple[ImagicRun, ...], fingerprint: str,
                  sampling: Sampling = Sampling()) -> tuple[dict, dict | None]:
    """points.csv (every deciding row), table.md (each method's best point, per kind: the deciding
    configurations on every case and seed, then every configuration on the screened cases), tradeoff.png,
    screen-points.csv, summary.json; returns the deciding verdict and the screen's (None without screened cases)."""
    decided, screened = deciding(results), screen(results)
    rows = summarise(decided)
    _write_points(rows, out / "points.csv")
    verdict = choose_default(rows, decided, sampling, runs)
    table = (f"Deciding: {len(decided)} cases x {sampling.seed_count} seed(s)\n\n" + markdown_table(rows, verdict))
    screen_rows, screen_verdict = [], None
    if screened:
        screen_rows = summarise(screened)
        _write_points(screen_rows, out / "screen-points.csv")
        screen_verdict = choose_default(screen_rows, screened, sampling, runs)
        table += (f"\nScreen: {len(screened)} cases x 1 seed, every configuration (SDEdit on the same samples)\n\n"
                  + markdown_table(screen_rows, screen_verdict))
    (out / "table.md").write_text(table)
    plot_tradeoff(rows, out / "tradeoff.png", verdict, screen_rows)
    summary = {"cases": len(results), "seeds_per_case": sampling.seed_count, "fingerprint": fingerprint,
               "etas": sampling.etas, "strengths": STRENGTHS, "starts": sampling.starts,
               "photo": {"strengths": sampling.photo_strengths, "etas": sampling.photo_etas}, "sampling": sampling.sampler,
               "decide": {"starts": sampling.decide_starts, "variants": sampling.decide_variants},
               "runs": [asdict(r) for r in runs], "verdict": verdict, "rows": rows,
               "screen": {"every": sampling.screen_every, "cases": len(screened), "verdict": screen_verdict,
                          "rows": screen_rows}}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return verdict, screen_verdict


def methods_in(rows: list[dict]) -> list[str]:
    return sorted({r["method"] for r in rows}, key=lambda m: (not m.startswith("imagic"), m))


def _cell(row: dict | None) -> str:
    if row is None:
        return "–"
    return f"{100 * row['success']:.0f}% · {row['background_psnr']:.1f} dB"


def markdown_table(rows: list[dict], verdict: dict) -> str:
    """Each method at its best point overall (highest success, then preservation), with that point per kind, and
    for Imagic how it compares with SDEdit (compare_with_sdedit)."""
    kinds = ("pose", "shape", "colour")
    lines = ["| method | setting | success | named only | background PSNR | identity PSNR | PSNR to ideal | "
             + " | ".join(f"{k}: success · background" for k in kinds)
             + " | vs SDEdit: cases more / fewer, p | mean success, shared range | train s | peak MiB | sample s/image |",
             "|" + "---|" * (len(kinds) + 12)]
    for method in methods_in(rows):
        best = best_point(rows, method)
        by_kind = {r["kind"]: r for r in rows if r["method"] == method and r["value"] == best["value"]}
        setting = f"{best['knob']} {best['value']}" if best["knob"] != "none" else "–"
        versus = area = "–"
        if (comparison := verdict["comparisons"].get(method)) is not None:
            paired, areas = comparison["paired"], comparison["areas"]
            versus = f"{paired['first_more']} / {paired['second_more']}, {paired['p_value']:.2g}"
            if areas is not None:
                area = f"{100 * areas['first']:.0f}% vs {100 * areas['second']:.0f}% ({areas['range_db'][0]:.1f}-" \
                       f"{areas['range_db'][1]:.1f} dB)"
            if comparison["beats"]:
                versus += " **beats**"
        lines.append(f"| {method} | {setting} | {100 * best['success']:.0f}% | {100 * best['named_success']:.0f}% | "
                     f"{best['background_psnr']:.1f} dB | {best['identity_psnr']:.1f} dB | {best['ideal_psnr']:.1f} dB | "
                     + " | ".join(_cell(by_kind.get(k)) for k in kinds)
                     + f" | {versus} | {area} | {best['train_s']:.1f} | {best['peak_mib']:.0f} | {best['sample_s']:.2f} |")
    return "\n".join(lines) + "\n"


def plot_tradeoff(rows: list[dict], path: Path, verdict: dict, screen_rows: list[dict] = ()) -> None:
    """Success against preservation, one curve per deciding method over its etas or strengths (the paper's Fig. 7
    analogue); beside it, if screened, every configuration's best point on the screened cases against SDEdit's."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, panels = plt.subplots(1, 2 if screen_rows else 1, figsize=(16 if screen_rows else 9, 6), squeeze=False)
    axes = panels[0][0]
    for method in methods_in(rows):
        points = sorted((r for r in rows if r["method"] == method and r["kind"] == "all"), key=lambda r: str(r["value"]))
        xs, ys = [p["background_psnr"] for p in points], [100 * p["success"] for p in points]
        style = "o-" if method.startswith("imagic") else ("s--" if method == "sdedit" else "*")
        axes.plot(xs, ys, style, label=method, markersize=8 if method == "text-only" else 4)
        for p, x, y in zip(points, xs, ys):
            if p["knob"] != "none":
                axes.annotate(f"{p['value']:g}", (x, y), fontsize=6, xytext=(2, 2), textcoords="offset points")
    for key, marker, label in (("cheapest_winner", "ko", "cheapest that beats SDEdit"),
                               ("shipped_default", "ks", "shipped default")):
        if verdict[key] is not None:
            point = verdict[key]
            axes.plot([point["background_psnr"]], [100 * point["success"]], marker, fillstyle="none", markersize=14,
                      label=label)
    axes.set_title("Deciding: every case and seed (labels: eta or strength)")
    if screen_rows:
        _plot_screen(panels[0][1], screen_rows)
    for axes in panels[0]:
        axes.set_xlabel("preservation: background PSNR to the input, dB (higher keeps more)")
        axes.set_ylabel("edit success (identity kept), % of samples")
        axes.grid(alpha=0.3)
        axes.legend(fontsize=7, loc="best")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def _plot_screen(axes, rows: list[dict]) -> None:
    """SDEdit's curve and each Imagic configuration's best point, coloured by where its sampling starts."""
    for method, style in (("sdedit", "s--"), ("text-only", "*")):
        points = sorted((r for r in rows if r["method"] == method and r["kind"] == "all"), key=lambda r: str(r["value"]))
        axes.plot([p["background_psnr"] for p in points], [100 * p["success"] for p in points], style, label=method)
    colours, labelled = {"noise": "tab:blue", "photo": "tab:orange", "inverted": "tab:green"}, set()
    for method in methods_in(rows):
        if method.startswith("imagic"):
            start = "photo" if method.endswith("-photo") else "inverted" if method.endswith("-inverted") else "noise"
            best = best_point(rows, method)
            axes.plot([best["background_psnr"]], [100 * best["success"]], "o", color=colours[start], markersize=4,
                      label=None if start in labelled else f"Imagic best points, {start} start")
            labelled.add(start)
            axes.annotate(method.removeprefix("imagic-"), (best["background_psnr"], 100 * best["success"]),
                          fontsize=4, xytext=(2, 2), textcoords="offset points")
    axes.set_title("Screen: every configuration's best point, screened cases, one seed")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help=f"only cases {QUICK_CASES[0]}-{QUICK_CASES[-1]} (2 per kind)")
    parser.add_argument("--cases", type=int, help="the first N cases of the 102 (default: all, or the quick set)")
    parser.add_argument("--every", type=int, default=1, metavar="N", help="every Nth of those cases: the kinds take "
                        "turns, so N not divisible by 3 keeps them balanced (--every 5: 21 cases, 7 per kind)")
    parser.add_argument("--kind", choices=EDIT_KINDS, help="only the cases of this edit kind")
    parser.add_argument("--seeds", type=int, metavar="K", help="sampling seeds per case of the deciding configurations, "
                        f"SDEdit and text-only (Imagic still trains once per case; default: {DECIDING_SEEDS}, "
                        "1 with --quick)")
    parser.add_argument("--screen-every", type=int, default=SCREEN_EVERY, metavar="N", help="sample every other "
                        f"configuration on every Nth case, from its first seed (default: {SCREEN_EVERY}: 6 of 102)")
    parser.add_argument("--long", action="store_true", help="paper-like fine-tuning lengths (LONG_RUNS) instead")
    parser.add_argument("--run", type=parse_run, action="append", metavar=RUN_FORMAT,
                        help="an Imagic run instead of IMAGIC_RUNS, e.g. full:2.5e-5:100,200 (checkpoints at 100 and "
                        f"200 steps) or lora:2e-3:25, after {EMBEDDING_STEPS} embedding steps at {EMBEDDING_LR:g} "
                        "unless given (full:2.5e-5:100:100); OPTIONS joint, copies=N, stop=RATIO "
                        "(full:2.5e-5:200:0:1e-2:joint,copies=4,stop=0.5); repeat for several")
    parser.add_argument("--etas", type=parse_etas, default=ETAS, metavar="ETA,ETA,...",
                        help=f"the etas every Imagic checkpoint is sampled at (default: {','.join(map(str, ETAS))})")
    parser.add_argument("--starts", type=parse_starts, default=STARTS, metavar="START,START,...",
                        help=f"where Imagic's sampling starts: {', '.join(STARTS)} (default: all)")
    parser.add_argument("--variants", type=parse_variants, default=tuple(VARIANTS), metavar="VARIANT,...",
                        help=f"how each trained edit is sampled, from every start: {', '.join(VARIANTS)} (default: all)")
    parser.add_argument("--decide-starts", type=parse_starts, metavar="START,...", help="the first run's starts "
                        f"that decide (default: those of {','.join(DECIDE_STARTS)} sampled, else every start)")
    parser.add_argument("--decide-variants", type=parse_variants, metavar="VARIANT,...", help="the first run's "
                        f"variants that decide (default: those of {','.join(DECIDE_VARIANTS)} sampled, else every one)")
    parser.add_argument("--photo-strengths", type=parse_etas, default=PHOTO_STRENGTHS, metavar="S,S,...",
                        help="the strengths the photo start is sampled at (default: "
                        f"{','.join(map(str, PHOTO_STRENGTHS))})")
    parser.add_argument("--photo-etas", type=parse_etas, default=(PHOTO_ETA,), metavar="ETA,ETA,...",
                        help=f"the etas the photo start is sampled at, each a method of its own (default: {PHOTO_ETA}; "
                        "another eta is named -photo-eta<ETA>)")
    parser.add_argument("--guidance", type=float, default=GUIDANCE_SCALE, metavar="SCALE",
                        help=f"classifier-free guidance scale of every method's sampler (default: {GUIDANCE_SCALE:g})")
    parser.add_argument("--workers", type=int, default=2, help="processes, one torch thread each")
    parser.add_argument("--out", default="outputs/quality", help="output folder; a rerun resumes in it")
    parser.add_argument("--model", type=Path, default=BUILT_IN_MODEL, help="a shapes-world pipeline folder "
                        "(default: the built-in model)")
    args = parser.parse_args(argv)
    cases = edit_cases()
    total = len(cases)
    if args.every < 1:
        parser.error(f"--every {args.every}: must be at least 1")
    seeds = args.seeds if args.seeds is not None else 1 if args.quick else DECIDING_SEEDS
    if seeds < 1:
        parser.error(f"--seeds {seeds}: must be at least 1")
    if args.screen_every < 1:
        parser.error(f"--screen-every {args.screen_every}: must be at least 1")
    decide = {}
    for option, chosen, default, among in (("--decide-starts", args.decide_starts, DECIDE_STARTS, args.starts),
                                           ("--decide-variants", args.decide_variants, DECIDE_VARIANTS, args.variants)):
        if chosen is not None and not set(chosen) <= set(among):
            parser.error(f"{option} {','.join(chosen)}: each must also be sampled ({','.join(among)})")
        decide[option] = chosen or tuple(x for x in default if x in among) or among
    if not all(0 < s <= 1 for s in args.photo_strengths):
        parser.error(f"--photo-strengths {','.join(map(str, args.photo_strengths))}: each must be in (0, 1]")
    if args.guidance < 1:
        parser.error(f"--guidance {args.guidance:g}: must be at least 1 (1 is no guidance)")
    if args.long and args.run:
        parser.error("--long and --run both choose the Imagic runs: give one of them")
    indices = list(QUICK_CASES) if args.quick else list(range(min(args.cases or total, total)))
    indices = [i for i in indices[::args.every] if args.kind in (None, cases[i].kind)]
    if not indices:
        parser.error(f"no {args.kind} case among the chosen ones: drop --kind or choose more cases")
    out = Path(args.out)
    runs = tuple(args.run) if args.run else LONG_RUNS if args.long else IMAGIC_RUNS
    names = [run.name(steps) for run in runs for steps in run.checkpoints]
    if len(names) != len(set(names)):
        parser.error(f"two runs would both be named {max(names, key=names.count)}: runs that differ only in a "
                     "learning rate need separate --out folders")
    sampling = Sampling(args.etas, seeds, args.guidance, starts=args.starts, variants=args.variants,
                        decide_starts=decide["--decide-starts"], decide_variants=decide["--decide-variants"],
                        screen_every=args.screen_every, photo_strengths=args.photo_strengths,
                        photo_etas=args.photo_etas)
    fingerprint = settings_fingerprint(runs, args.model, sampling)
    results = run_cases(indices, runs, out, args.workers, args.model, fingerprint, sampling)
    verdict, screen_verdict = write_outputs(results, out, runs, fingerprint, sampling)
    print((out / "table.md").read_text())
    sdedit = verdict["sdedit_best"]
    print(f"SDEdit's best point: strength {sdedit['value']}: success {100 * sdedit['success']:.0f}%, "
          f"background {sdedit['background_psnr']:.1f} dB")
    for key, label in (("cheapest_winner", "the cheapest configuration that beats SDEdit"),
                       ("shipped_default", "the shipped default")):
        if (point := verdict[key]) is not None:
            print(f"{label}: {point['method']} at {point['knob']} {point['value']}: success "
                  f"{100 * point['success']:.0f}%, background {point['background_psnr']:.1f} dB")
    print(f"deciding configurations that beat SDEdit (better best point, sign test p < 0.05, larger area): "
          f"{', '.join(verdict['winners']) or 'none'}; {len(results)} cases x {seeds} seed(s)")
    if screen_verdict is not None:
        print(f"on the screened cases (one seed), configurations that beat SDEdit: "
              f"{', '.join(screen_verdict['winners']) or 'none'}")
    print(f"outputs in '{out}'")
    return 0


if __name__ == "__main__":
    sys.exit(main())
