"""Edit quality on the shapes world, scored against the truth: Imagic against its peers, its configuration chosen
on one split of cases and confirmed on another that nothing was chosen on.

    python benchmarks/quality.py              # decide on the tuning split, then confirm on the confirmation split
    python benchmarks/quality.py --quick      # 3 cases of each split (one per kind), one seed: a check in minutes
    python benchmarks/quality.py --split tuning --every 5 --run full:1e-4:50,100 --masks none,auto \\
        --out outputs/probe                   # a probe: 21 tuning cases, other trainings, with and without the mask
    python benchmarks/quality.py --split confirmation --choose imagic-full-100+50-eta1.4-mask --out outputs/confirm
    python benchmarks/quality.py --split confirmation --peers none --run full:2.5e-5:50,100 --masks auto \\
        --mask-thresholds 0.3 --choose imagic-full-100+50@2.5e-05-eta1-mask-t0.3-g1,$DEFAULT \\
        --baseline $DEFAULT --out outputs/faster   # fewer steps against the default's (DEFAULT=imagic-full-100+100@...)

Cases (imagic/shapes/cases.py): a tuning and a confirmation split of 102 seeded edits each, a third of them
pose edits (the paper's non-rigid edits), the confirmation split mirroring the tuning split's kinds,
subjects and identities case by case. Every output is scored against the case's truth
(imagic/shapes/scoring.py): success (the asked-for change, the other named attributes and the subject's
identity kept), background PSNR (what no caption mentions), identity and closeness to the ideal edit.

Methods, all on the built-in model with one sampler (SAMPLER_STEPS DDIM steps at guidance GUIDANCE_SCALE):
- Imagic configurations: a training (`--run`; checkpoints along one run are configurations of their own)
  times a way to sample it: an eta (`--etas`), with or without the edit mask (`--masks none,auto`), and
  beyond the paper Forgedit's projection or forgetting (`--variants`). Each is drawn as a curve over where
  sampling starts: the photo noised to each of `--strengths` (1: from noise, the paper's start). Imagic
  is given the photo and the target text only.
- Peers (benchmarks/peers.py): SDEdit, DiffEdit, Pix2Pix-Zero and LEDITS++, through diffusers' own
  pipelines on the same model, seeds, guidance and steps, each over 3-5 settings of its own strength
  knob. They are given the source caption, which the world knows and a real user often does not have.
- Text-only: the target text sampled with no image.

The deciding run samples every configuration and peer on the tuning split and holds each configuration
against each peer (verdict.py): the cheapest that beats every peer is chosen, else the one with the best
trade-off. The confirming run samples the chosen configuration and the peers on the confirmation split;
its verdict is the benchmark's. Cases run in worker processes (one torch thread each); each case's scores
are written to OUT/<split>/cases/ as it finishes, so a stopped run resumes (a case scored under other
settings or another model runs again). Writes OUT/table.md, OUT/tradeoff.png, OUT/summary.json and per
split OUT/<split>/points.csv and a grid of every output per case under OUT/<split>/grids/.
"""

import argparse
import csv
import hashlib
import json
import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import tables
import verdict
from peers import PEERS
from tqdm.auto import tqdm

import imagic
from imagic.shapes.cases import CASE_COUNT, EDIT_KINDS, SPLITS, edit_cases  # light: numpy and PIL

BUILT_IN_MODEL = Path(imagic.__file__).parent / "shapes" / "model"  # imagic.loading would import torch here
GUIDANCE_SCALE = 4.0  # every method's, and the built-in model's default
SAMPLER_STEPS = 20
# Where Imagic's sampling starts: the photo noised to these strengths (1: from noise, the paper's start).
STRENGTHS = (0.45, 0.6, 0.75, 0.9, 1.0)
QUICK_CASES = (0, 1, 2)  # one case of each kind
VARIANTS = {  # how a trained edit is sampled beyond the paper (Forgedit): ImagicEditor.sample's options
    "paper": {},
    "project": {"mix": "project"},
    "forget-encoder": {"forget": "encoder"},
    "forget-decoder": {"forget": "decoder"},
    "forget-kv": {"forget": "all-but-encoder-kv"},
}


@dataclass(frozen=True)
class ImagicRun:
    """One training per case; each checkpoint (fine-tuning steps) is a configuration of its own. Beyond the paper
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
    quantize_base: str = "none"  # LoRA over a quantized base (imagic.memory)

    def name(self, steps: int) -> str:
        options = ("-joint" if self.joint else "") + (f"-x{self.copies}" if self.copies > 1 else "") + (
            f"-stop{self.stop_ratio:g}" if self.stop_ratio is not None else "") + (
            f"-{self.quantize_base}" if self.quantize_base != "none" else "")
        return f"imagic-{self.method}-{self.embedding_steps}+{steps}@{self.finetune_lr:g}{options}"

    def settings(self, seed: int):
        from imagic.settings import StageSettings, TrainSettings

        return TrainSettings(
            embedding=StageSettings(self.embedding_steps, self.embedding_lr, copies=self.copies),
            fine_tune=StageSettings(self.checkpoints[-1], self.finetune_lr, copies=self.copies,
                                    stop_ratio=self.stop_ratio),
            method=self.method, seed=seed, joint=self.joint,
        )


@dataclass(frozen=True)
class Sampling:
    """How a trained edit is sampled: at `eta`, with or without the automatic edit mask (at a threshold, grown by
    some latent pixels: SampleSettings' mask_threshold and mask_grow), in a variant (VARIANTS)."""

    eta: float = 1.0
    mask: str = "none"
    variant: str = "paper"
    mask_threshold: float = 0.5
    mask_grow: int = 1

    def suffix(self) -> str:
        mask = ""
        if self.mask == "auto":
            mask = "-mask" + ("" if (self.mask_threshold, self.mask_grow) == (0.5, 1) else
                              f"-t{self.mask_threshold:g}-g{self.mask_grow}")
        return f"-eta{self.eta:g}{mask}" + ("" if self.variant == "paper" else f"-{self.variant}")

    def options(self) -> dict:
        """SampleSettings fields: every mask setting given, so the model's own defaults play no part."""
        masked = {"mask": "auto", "mask_threshold": self.mask_threshold, "mask_grow": self.mask_grow}
        return {**VARIANTS[self.variant], **(masked if self.mask == "auto" else {"mask": "none"})}


@dataclass(frozen=True)
class Plan:
    """What a split's cases run: the Imagic trainings and the ways of sampling them, the peers, the seeds."""

    runs: tuple[ImagicRun, ...]
    samplings: tuple[Sampling, ...]
    peers: tuple[str, ...] = tuple(PEERS)
    seed_count: int = 1
    strengths: tuple[float, ...] = STRENGTHS
    guidance_scale: float = GUIDANCE_SCALE
    steps: int = SAMPLER_STEPS
    only: tuple[str, ...] | None = None  # configurations' names: the confirming run samples these alone

    @property
    def sampler(self) -> dict:
        return {"num_inference_steps": self.steps, "guidance_scale": self.guidance_scale}

    def configurations(self) -> dict[str, tuple[ImagicRun, int, Sampling]]:
        """Every configuration by its name: a run's checkpoint sampled one way."""
        found = {run.name(steps) + sampling.suffix(): (run, steps, sampling)
                 for run in self.runs for steps in run.checkpoints for sampling in self.samplings}
        return found if self.only is None else {name: found[name] for name in self.only}

    def confirming(self, *names: str) -> "Plan":
        """This plan reduced to some configurations, each training run to their checkpoints."""
        chosen = [self.configurations()[name] for name in names]
        runs = {run: tuple(sorted({steps for r, steps, _ in chosen if r == run})) for run, _, _ in chosen}
        return replace(self, runs=tuple(replace(run, checkpoints=steps) for run, steps in runs.items()),
                       samplings=tuple(dict.fromkeys(sampling for _, _, sampling in chosen)), only=names)


RUN_FORMAT = "METHOD:LR:STEPS[,STEPS...][:EMBEDDING_STEPS[:EMBEDDING_LR[:OPTIONS]]]"
EMBEDDING_STEPS, EMBEDDING_LR = 100, 1e-2
# The deciding run's candidates, chosen by probes of every 5th tuning case (docs/benchmarks.md): the built-in
# model's training (embedding 100 steps at 1e-2, full fine-tuning 100 at 2.5e-5), sampled as it ships (eta 1, no
# mask) and with the automatic mask at threshold 0.3 at etas 1 and 1.4, the probes' best trade-offs; one training.
IMAGIC_RUNS = (ImagicRun("full", EMBEDDING_STEPS, EMBEDDING_LR, 2.5e-5, (100,)),)
SAMPLINGS = (Sampling(1.0), Sampling(1.0, "auto", mask_threshold=0.3), Sampling(1.4, "auto", mask_threshold=0.3))


def parse_run(spec: str) -> ImagicRun:
    """`--run METHOD:LR:STEPS[,STEPS...][:EMBEDDING_STEPS[:EMBEDDING_LR[:OPTIONS]]]`, e.g. `full:1e-4:50,100`: a
    fine-tuning run with checkpoints at each listed step count, after EMBEDDING_STEPS embedding steps at
    EMBEDDING_LR unless given. OPTIONS, comma-separated: `joint`, `copies=N`, `stop=RATIO`, `quant=int8|int4` (LoRA
    over a quantized base)."""
    fields = spec.split(":")
    try:
        if not 3 <= len(fields) <= 6:
            raise ValueError
        method, learning_rate, steps = fields[:3]
        options: dict = {}
        for option in filter(None, (fields[5] if len(fields) > 5 else "").split(",")):
            key, _, value = option.partition("=")
            if key == "joint" and not value:
                options["joint"] = True
            elif key in ("copies", "stop") and value:
                options["copies" if key == "copies" else "stop_ratio"] = int(value) if key == "copies" else float(value)
            elif key == "quant" and value in ("int8", "int4"):
                options["quantize_base"] = value
            else:
                raise ValueError(option)
        run = ImagicRun(method, int(fields[3]) if len(fields) > 3 else EMBEDDING_STEPS,
                        float(fields[4]) if len(fields) > 4 else EMBEDDING_LR, float(learning_rate),
                        tuple(int(s) for s in steps.split(",")), **options)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{spec!r}: expected {RUN_FORMAT}, e.g. full:1e-4:50,100 or "
                                         "full:2.5e-5:200:0:1e-2:joint,copies=4,stop=0.5 or lora:2e-3:25:100:1e-2:quant=int8")
    checkpoints = run.checkpoints
    if run.method not in ("full", "lora"):
        raise argparse.ArgumentTypeError(f"{spec!r}: the method must be full or lora, not {run.method!r}")
    if list(checkpoints) != sorted(set(checkpoints)) or checkpoints[0] < 1 or run.finetune_lr <= 0:
        raise argparse.ArgumentTypeError(f"{spec!r}: the learning rate must be positive and the step counts "
                                         "increasing and at least 1")
    if run.stop_ratio is not None and len(checkpoints) > 1:
        raise argparse.ArgumentTypeError(f"{spec!r}: a run that stops on its reconstruction check has one step "
                                         "count, its most: a checkpoint after the stop would not exist")
    if run.quantize_base != "none" and run.method != "lora":
        raise argparse.ArgumentTypeError(f"{spec!r}: a quantized base is for lora")
    if run.embedding_steps < (0 if run.joint else 1) or run.embedding_lr <= 0:
        raise argparse.ArgumentTypeError(f"{spec!r}: the embedding stage needs a positive learning rate and at least "
                                         "1 step (0 with joint)")
    from imagic.errors import SettingsError

    try:
        run.settings(0)
    except SettingsError as error:  # e.g. copies or the stop ratio out of range
        raise argparse.ArgumentTypeError(f"{spec!r}: {error}") from None
    return run


def _numbers(spec: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in spec.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{spec!r}: expected comma-separated numbers, e.g. 0.5,0.7,0.9")
    if list(values) != sorted(set(values)):
        raise argparse.ArgumentTypeError(f"{spec!r}: the values must be increasing")
    return values


def _choices(allowed) -> callable:
    def parse(spec: str) -> tuple[str, ...]:
        chosen = tuple(spec.split(","))
        if not chosen or any(c not in allowed for c in chosen) or len(set(chosen)) != len(chosen):
            raise argparse.ArgumentTypeError(f"{spec!r}: expected some of {','.join(allowed)}, each once")
        return chosen
    return parse


def model_fingerprint(folder: Path) -> str:
    """A digest of a pipeline folder's weights and configs (not its card, not the defaults it carries)."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name not in (
            "README.md", "card.json", "imagic_defaults.json")):
        digest.update(path.relative_to(folder).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def fingerprint(plan: Plan, model: Path) -> str:
    """What a case's scores depend on: a changed method, setting or model runs the case again."""
    spec = {"plan": asdict(plan), "peers": {name: PEERS[name].values for name in plan.peers},
            "sampler": plan.sampler, "model": model_fingerprint(model)}
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:16]


def sampling_seeds(index: int, count: int) -> list[int]:
    """A case's sampling seeds: its index first (so one seed is the case's training seed), then index + 1000 j."""
    return [index + 1000 * j for j in range(count)]


_worker: dict = {}  # one editor and classifier per worker process, loaded once


def _start_worker(model: Path) -> None:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    import diffusers
    import torch

    from imagic.editor import ImagicEditor
    from imagic.shapes.classifier import load_classifier
    from imagic.shapes.model import CLASSIFIER_FILE

    torch.set_num_threads(1)
    diffusers.utils.logging.disable_progress_bar()
    _worker["editor"] = ImagicEditor.from_pretrained(str(model), device="cpu")
    _worker["editor"].pipe.set_progress_bar_config(disable=True)
    _worker["classifier"] = load_classifier(CLASSIFIER_FILE)


def _points(method: str, knob: str, values, seed: int, scores: list[dict], cost: dict) -> list[dict]:
    return [{"method": method, "knob": knob, "value": value, "seed": seed, **score, **cost}
            for value, score in zip(values, scores)]


def _imagic(case, truth: dict, plan: Plan) -> tuple[list[dict], list[tuple[str, list]]]:
    """Every configuration of the plan on one case: each run trained once (runs with the same embedding stage share
    it), its checkpoints taken in pieces of one fine-tuning (imagic.stages), each sampled every way."""
    from imagic import stages
    from imagic.families import Text
    from imagic.memory import MemorySettings, TrainingLevers
    from imagic.optimisation import Control
    from imagic.report import peak_memory_bytes, reset_peak_memory
    from imagic.shapes.scoring import score_outputs

    editor, classifier = _worker["editor"], _worker["classifier"]
    family, seeds, quiet = editor.family, sampling_seeds(case.index, plan.seed_count), Control(progress=False)
    wanted, points, rows, stage_1 = plan.configurations(), [], [], {}
    e_tgt = family.encode_text(case.target_text)
    for run in plan.runs:
        settings = run.settings(case.index)
        photo, precision = editor.photo(truth["input"], settings), editor.precision(settings)
        reset_peak_memory(editor.family.device)
        key = (run.embedding_steps, run.embedding_lr, run.copies, run.quantize_base)
        levers = TrainingLevers(MemorySettings(quantize_base=run.quantize_base))
        # The quantized copies are the trained models' own: the loaded model is back for sampling the checkpoints.
        with levers.active(family):
            if key not in stage_1:
                stage_1[key] = stages.optimize_embedding(family, photo, e_tgt, settings, precision, quiet, levers)
            e_opt, first = stage_1[key]
            tuning = stages.FineTuning(family, family.base, photo, Text(e_opt, e_tgt.extras), settings, precision,
                                       joint=run.joint, levers=levers)
        for steps in run.checkpoints:
            tuning.run(steps, quiet)
            state = stages.checkpoint(family, editor.identity, case.target_text, photo, e_tgt, settings, first, tuning)
            cost = {"train_s": first.seconds + tuning.seconds, "peak_mib": peak_memory_bytes(family.device) / 2**20}
            for name in (run.name(steps) + s.suffix() for s in plan.samplings):
                if name not in wanted:
                    continue
                sampling = wanted[name][2]
                start = time.perf_counter()
                images = {strength: editor.sample(state, [sampling.eta], seeds, image=truth["input"], strength=strength,
                                                  batch_size=1, progress=False, **sampling.options(), **plan.sampler)
                          for strength in plan.strengths}
                cost["sample_s"] = (time.perf_counter() - start) / (len(plan.strengths) * len(seeds))
                for seed in seeds:
                    outputs = [images[s].images[(sampling.eta, seed)] for s in plan.strengths]
                    points += _points(name, "strength", plan.strengths, seed, score_outputs(case, outputs, classifier),
                                      {**cost, "optimiser_steps": len(first.losses) + steps})
                    rows += [(name, outputs)] if seed == seeds[0] else []
    return points, rows


def _peers_and_text(case, truth: dict, plan: Plan) -> tuple[list[dict], list[tuple[str, list]]]:
    """Every peer over its knob, and text-only, on one case."""
    import torch

    from imagic.shapes.scoring import score_outputs

    editor, classifier = _worker["editor"], _worker["classifier"]
    seeds, points, rows = sampling_seeds(case.index, plan.seed_count), [], []
    for name in plan.peers:
        peer = PEERS[name]
        start = time.perf_counter()
        edits = peer.edit(editor.pipe, truth["input"], case.scene.caption, case.target_text, seeds, **plan.sampler)
        cost = {"train_s": 0.0, "peak_mib": 0.0, "optimiser_steps": 0,
                "sample_s": (time.perf_counter() - start) / (len(peer.values) * len(seeds))}
        for seed in seeds:
            outputs = [edits[(value, seed)] for value in peer.values]
            points += _points(name, peer.knob, peer.values, seed, score_outputs(case, outputs, classifier), cost)
            rows += [(name, outputs)] if seed == seeds[0] else []
    start = time.perf_counter()  # text-only: the "ignore the image" extreme, from the case's first seed
    [image] = editor.pipe(case.target_text, generator=torch.Generator().manual_seed(seeds[0]), **plan.sampler).images
    cost = {"train_s": 0.0, "peak_mib": 0.0, "optimiser_steps": 0, "sample_s": time.perf_counter() - start}
    points += _points("text-only", "none", [None], seeds[0], score_outputs(case, [image], classifier), cost)
    return points, rows + [("text-only", [image])]


def run_case(split: str, index: int, plan: Plan, grid_folder: Path | None) -> dict:
    """Every method of the plan on one case of a split: its scored points (one per method, setting and seed) and,
    if asked, a grid of its first seed's outputs."""
    case = edit_cases(split)[index]
    truth = case.render()
    imagic_points, imagic_rows = _imagic(case, truth, plan)
    peer_points, peer_rows = _peers_and_text(case, truth, plan)
    if grid_folder is not None:
        _save_grid(grid_folder / f"{case.name}.png", case, truth, imagic_rows + peer_rows)
    return {"case": case.name, "index": index, "split": split, "kind": case.kind, "identity": case.identity,
            "source": case.scene.caption, "target_text": case.target_text, "points": imagic_points + peer_points}


def _save_grid(path: Path, case, truth: dict, rows: list[tuple[str, list]]) -> None:
    """One row per method (its settings left to right), below the input and the ideal edit."""
    from PIL import Image

    from imagic.image_io import image_grid

    rows = [(f"{case.name}: input, ideal", [truth["input"], truth["ideal"]]), *rows]
    width = max(len(images) for _, images in rows)
    blank = Image.new("RGB", truth["input"].size, "white")
    cells = [[image.resize((128, 128)) for image in images] + [blank] * (width - len(images)) for _, images in rows]
    path.parent.mkdir(parents=True, exist_ok=True)
    image_grid(cells, [name for name, _ in rows]).save(path)


def run_cases(split: str, indices: list[int], plan: Plan, out: Path, workers: int, model: Path) -> list[dict]:
    """Score every case of `split` not already scored under this plan and model; returns all their results."""
    folder, key = out / split / "cases", fingerprint(plan, model)
    folder.mkdir(parents=True, exist_ok=True)
    cases = edit_cases(split)
    results, todo = {}, []
    for index in indices:
        path = folder / f"{cases[index].name}.json"
        saved = json.loads(path.read_text()) if path.is_file() else None
        if saved is not None and saved.get("fingerprint") == key:
            results[index] = saved
        else:
            todo.append((index, path))
    if todo:
        print(f"{split}: {len(results)} case(s) already scored; running {len(todo)} with {workers} worker(s)",
              file=sys.stderr)
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(workers, mp_context=context, initializer=_start_worker, initargs=(model,)) as pool:
            jobs = {pool.submit(run_case, split, index, plan, out / split / "grids"): (index, path)
                    for index, path in todo}
            for job in tqdm(as_completed(jobs), total=len(jobs), desc=f"{split} cases"):
                index, path = jobs[job]
                results[index] = {**job.result(), "fingerprint": key}
                path.write_text(json.dumps(results[index]))
    return [results[i] for i in indices]


def _write_points(rows: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, list(rows[0]))
        writer.writeheader()
        writer.writerows(sorted(rows, key=lambda r: (r["method"], r["group"], str(r["value"]))))


def judged(split: str, results: list[dict], plan: Plan, out: Path, baseline: str | None = None) -> dict:
    """A split's rows and verdict (and with a `baseline` configuration, every other one against it); its points.csv
    written."""
    rows = verdict.summarise(results)
    _write_points(rows, out / split / "points.csv")
    against = verdict.against_baseline(rows, results, baseline) if baseline else []
    return {"split": split, "cases": len(results), "seeds_per_case": plan.seed_count, "rows": rows,
            "verdict": verdict.verdict(rows, results, list(plan.peers)), "against_baseline": against}


def chosen(decision: dict) -> str:
    """The deciding run's choice: the cheapest configuration that beats every peer, else the best trade-off."""
    return decision["verdict"]["cheapest_winner"] or decision["verdict"]["best_tradeoff"]


def report(splits: list[dict], out: Path, source_note: str) -> str:
    """OUT/table.md and OUT/tradeoff.png for the splits run."""
    parts = []
    for split in splits:
        rows, result = split["rows"], split["verdict"]
        parts += [f"## {split['split'].capitalize()} split: {split['cases']} cases x {split['seeds_per_case']} "
                  f"seed(s)\n", source_note, "\n### Each method's best point\n", tables.main_table(rows),
                  "\n### Every point\n", tables.curves_table(rows), "\n### Per kind of edit\n",
                  tables.groups_table(rows, "kind:"), "\n### Per identity\n", tables.groups_table(rows, "identity:"),
                  *(["\n### Against the baseline configuration\n", tables.baseline_table(split["against_baseline"])]
                    if split.get("against_baseline") else []),
                  "\n### Verdict against each peer\n", tables.verdict_table(result),
                  f"\nBeats every peer: {_winners(result)}; cheapest that does: "
                  f"{result['cheapest_winner'] or 'none'}; best trade-off: {result['best_tradeoff']}\n"]
    text = "\n".join(parts)
    (out / "table.md").write_text(text)
    tables.plot([(f"{s['split']} split ({s['cases']} cases)", s["rows"]) for s in splits], out / "tradeoff.png")
    return text


def _winners(result: dict) -> str:
    return ", ".join(result["winners"]) or ("none" if result["peers"] else "none (no peer was run)")


SOURCE_NOTE = ("The peers are given the source caption (the world knows it; a real user often does not); Imagic "
               "is given only the photo and the target text.\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--split", choices=("both", *SPLITS), default="both",
                        help="decide on tuning, then confirm on confirmation (both), or run one split")
    parser.add_argument("--choose", type=lambda spec: tuple(spec.split(",")), metavar="CONFIGURATION[,...]",
                        help="with --split confirmation: the configuration(s) to confirm (default: the deciding run's "
                        "choice in OUT)")
    parser.add_argument("--baseline", metavar="CONFIGURATION", help="also hold every other configuration against "
                        "this one, case by case (e.g. fewer steps against the default's): within noise of it, or not")
    parser.add_argument("--quick", action="store_true", help=f"only cases {QUICK_CASES} of each split, one seed")
    parser.add_argument("--cases", type=int, help=f"the first N cases of each split (default: all {CASE_COUNT})")
    parser.add_argument("--every", type=int, default=1, metavar="N", help="every Nth of those cases (the kinds take "
                        "turns: N not divisible by 3 keeps them balanced)")
    parser.add_argument("--kind", choices=EDIT_KINDS, help="only the cases of this edit kind")
    parser.add_argument("--seeds", type=int, default=1, metavar="K", help="sampling seeds per case (default: 1)")
    parser.add_argument("--run", type=parse_run, action="append", metavar=RUN_FORMAT, help="an Imagic training "
                        f"instead of the default ones; repeat for several (e.g. full:1e-4:50,100, after "
                        f"{EMBEDDING_STEPS} embedding steps at {EMBEDDING_LR:g} unless given)")
    ways = parser.add_argument_group("how each checkpoint is sampled: every combination of these, each a configuration "
                                     "(default, none of them given: " + ", ".join(s.suffix()[1:] for s in SAMPLINGS) + ")")
    ways.add_argument("--etas", type=_numbers, metavar="ETA,...", help="etas (default: 1)")
    ways.add_argument("--masks", type=_choices(("none", "auto")), metavar="MASK,...",
                      help="without the edit mask (none) and/or with the automatic one (auto) (default: none)")
    ways.add_argument("--mask-thresholds", type=_numbers, metavar="T,...", help="the automatic mask's thresholds "
                      "(default: 0.5)")
    ways.add_argument("--mask-grows", type=_numbers, metavar="G,...", help="latent pixels the automatic mask is grown "
                      "by (default: 1)")
    ways.add_argument("--variants", type=_choices(tuple(VARIANTS)), metavar="VARIANT,...",
                      help=f"beyond the paper: {', '.join(VARIANTS)} (default: paper)")
    parser.add_argument("--strengths", type=_numbers, default=STRENGTHS, metavar="S,...", help="where Imagic's "
                        "sampling starts: the photo noised to these strengths (1: pure noise, the paper's start)")
    parser.add_argument("--peers", type=_choices((*PEERS, "none")), default=tuple(PEERS), metavar="PEER,...",
                        help=f"the peers to run, or none (a probe of Imagic alone; default: all of {', '.join(PEERS)})")
    parser.add_argument("--guidance", type=float, default=GUIDANCE_SCALE, help="every method's guidance scale")
    parser.add_argument("--workers", type=int, default=2, help="processes, one torch thread each")
    parser.add_argument("--out", type=Path, default=Path("outputs/quality"), help="output folder; a rerun resumes in it")
    parser.add_argument("--model", type=Path, default=BUILT_IN_MODEL, help="a shapes-world pipeline folder")
    args = parser.parse_args(argv)
    if args.every < 1 or args.seeds < 1:
        parser.error("--every and --seeds must be at least 1")
    if not all(0 < s <= 1 for s in args.strengths):
        parser.error(f"--strengths {','.join(map(str, args.strengths))}: each must be in (0, 1]")
    if args.guidance < 1:
        parser.error(f"--guidance {args.guidance:g}: must be at least 1 (1 is no guidance)")
    indices = list(QUICK_CASES) if args.quick else list(range(min(args.cases or CASE_COUNT, CASE_COUNT)))
    indices = [i for i in indices[::args.every] if args.kind in (None, EDIT_KINDS[i % len(EDIT_KINDS)])]
    if not indices:
        parser.error(f"no {args.kind} case among the chosen ones: drop --kind or choose more cases")
    samplings = _samplings(args)
    peers = tuple(p for p in args.peers if p != "none")
    plan = Plan(tuple(args.run or IMAGIC_RUNS), samplings, peers, args.seeds, args.strengths, args.guidance)
    names = [run.name(steps) for run in plan.runs for steps in run.checkpoints]
    if len(names) != len(set(names)):
        parser.error(f"two runs would both be named {max(names, key=names.count)}")
    for name in (*(args.choose or ()), *filter(None, [args.baseline])):
        if name not in plan.configurations():
            parser.error(f"--choose/--baseline {name}: not one of this plan's configurations "
                         f"({', '.join(plan.configurations())}); give the --run, --etas and --masks that make it")
    if args.baseline and args.choose and args.baseline not in args.choose:
        parser.error(f"--baseline {args.baseline}: confirm it too (--choose ...,{args.baseline})")
    return _run(args, plan, indices)


def _samplings(args: argparse.Namespace) -> tuple[Sampling, ...]:
    """SAMPLINGS, or every combination of the ways of sampling given."""
    given = (args.etas, args.masks, args.mask_thresholds, args.mask_grows, args.variants)
    if all(option is None for option in given):
        return SAMPLINGS
    etas, masks, thresholds, grows, variants = (option or default for option, default in zip(
        given, ((1.0,), ("none",), (0.5,), (1,), ("paper",))))
    return tuple(dict.fromkeys(
        Sampling(eta, mask, variant, threshold if mask == "auto" else 0.5, int(grow) if mask == "auto" else 1)
        for eta in etas for mask in masks for variant in variants for threshold in thresholds for grow in grows))


def _run(args: argparse.Namespace, plan: Plan, indices: list[int]) -> int:
    out, splits, timings = args.out, [], {}
    (out / "tuning").mkdir(parents=True, exist_ok=True)
    decision_file = out / "tuning" / "decision.json"
    if args.split in ("both", "tuning"):
        start = time.perf_counter()
        results = run_cases("tuning", indices, plan, out, args.workers, args.model)
        timings["tuning"] = time.perf_counter() - start
        splits.append(judged("tuning", results, plan, out, args.baseline))
        decision_file.write_text(json.dumps({"chosen": chosen(splits[-1]), "fingerprint": fingerprint(plan, args.model)}))
    if args.split in ("both", "confirmation"):
        names = args.choose or ((chosen(splits[0]),) if splits else None)
        if names is None and decision_file.is_file():
            names = (json.loads(decision_file.read_text())["chosen"],)
        if names is None:
            print(f"no configuration to confirm: run the tuning split into '{out}' first, or give --choose", file=sys.stderr)
            return 2
        start = time.perf_counter()
        confirming = plan.confirming(*names)
        results = run_cases("confirmation", indices, confirming, out, args.workers, args.model)
        timings["confirmation"] = time.perf_counter() - start
        splits.append({**judged("confirmation", results, confirming, out, args.baseline), "chosen": ",".join(names)})
    text = report(splits, out, SOURCE_NOTE)
    summary = {"timings_s": timings, "plan": asdict(plan), "splits": splits,
               "chosen": splits[-1].get("chosen") or chosen(splits[0])}
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    print(text)
    for split in splits:
        result = split["verdict"]
        print(f"{split['split']}: beats every peer: {_winners(result)}; "
              f"best trade-off: {result['best_tradeoff']}")
    print(f"chosen: {summary['chosen']}; times: {', '.join(f'{k} {v / 60:.1f} min' for k, v in timings.items())}; "
          f"outputs in '{out}'")
    return 0


if __name__ == "__main__":
    sys.exit(main())
