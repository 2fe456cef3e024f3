"""Imagic's three stages (Kawar et al., 2023), in the paper's order and words, as functions of data.

    e_tgt = family.encode_text(target_text).embedding
    e_opt, record = optimize_embedding(family, photo, e_tgt, settings)          # stage 1: e_tgt -> e_opt
    tuned = fine_tune(family, photo, e_opt, e_tgt, settings)                   # stage 2: weights per level
    images = sample(family, denoisers, state, etas, seeds, sample_settings)    # stage 3: images per eta and seed

Stage 1 optimises the target text's embedding with the model frozen, so that it reconstructs the photo.
Stage 2 freezes e_opt and fine-tunes a copy of each level's denoiser (all weights, or a LoRA) so that e_opt
reproduces the photo even better: the base level with e_opt, a cascade's super-resolution levels with e_tgt
as the paper does. Stage 3 samples the fine-tuned model conditioned on e = eta * e_tgt + (1 - eta) * e_opt
(`interpolate`); beyond the paper (Forgedit), on e_opt plus eta times the part of e_tgt orthogonal to it
(`project`). Every random draw comes from the training seed: stage 1 from 2 * seed, stage 2 of the base
from 2 * seed + 1, each upper level from a seed of its own name, so a stage's draws do not depend on the
others'.
"""

import contextlib
import copy
import hashlib
import time
import warnings
from dataclasses import dataclass, field, replace
from typing import Callable

import numpy as np
import torch
from PIL import Image

from . import denoisers, masks, sharding
from .errors import SamplingError, TrainingDivergedError, TrainingInterrupted
from .families import Embedding, Level, ModelFamily, SamplingJob, Text
from .image_io import fit_to_size, image_grid, image_to_tensor
from .memory import TrainingLevers
from .optimisation import Batch, Control, Optimisation, StageResult
from .precision import Precision
from .settings import SampleSettings, TrainSettings
from .state import EditState, fine_tune_stage


@dataclass(frozen=True)
class Photo:
    """The photo an edit is trained on: as given (RGB) and fitted to the base level's size by the settings' rule.
    A level above the base (a super-resolution stage) fits the photo as given at its own, larger size."""

    source: Image.Image
    image: Image.Image
    resize: str
    encoded: dict[str, torch.Tensor] = field(default_factory=dict, compare=False, repr=False)  # by level name

    @classmethod
    def fitted(cls, source: Image.Image, height: int, width: int, resize: str) -> "Photo":
        return cls(source, fit_to_size(source, width, height, resize), resize)

    @property
    def sha256(self) -> str:
        """The hash of the pixels trained on (after fitting), whatever file or object they came from."""
        return hashlib.sha256(self.image.tobytes()).hexdigest()

    @property
    def pixels(self) -> torch.Tensor:
        return image_to_tensor(self.image)

    def at(self, level: Level) -> torch.Tensor:
        """The photo in `level`'s space, at its size: encoded once, so that the VAE can leave memory after."""
        if level.name not in self.encoded:
            image = self.image if level.scale == 1 else fit_to_size(
                self.source, self.image.width * level.scale, self.image.height * level.scale, self.resize)
            self.encoded[level.name] = level.encode_image(image_to_tensor(image))
        return self.encoded[level.name]


@dataclass
class StageRecord:
    """What an edit state keeps of a stage: its losses, how it ended, and how long it took."""

    losses: list[float]
    status: str  # "done", or why and where it stopped: "nan at step 3 of 100", "interrupted at step 5 of 100"
    seconds: float

    @classmethod
    def of(cls, result: StageResult, steps: int, seconds: float) -> "StageRecord":
        status = "done"
        if not result.finished:
            reason = "NaN/inf loss" if result.stopped == "nan" else "interrupted"
            status = f"{reason} at step {len(result.losses) + 1} of {steps}"
        return cls(list(result.losses), status, seconds)

    @property
    def finished(self) -> bool:
        return self.status == "done"


def stage_generator(seed: int, level: Level | None = None, base: bool = True) -> torch.Generator:
    """Stage 1 draws from 2 * seed, stage 2 of the base level from 2 * seed + 1, an upper level's stage 2 from a
    seed of its own, derived from the training seed and the level's name."""
    if level is None:
        return torch.Generator().manual_seed(2 * seed)
    if base:
        return torch.Generator().manual_seed(2 * seed + 1)
    derived = hashlib.sha256(f"{seed}:{level.name}".encode()).digest()[:8]
    return torch.Generator().manual_seed(int.from_bytes(derived, "big"))


def prepared_for_training(model: torch.nn.Module, settings: TrainSettings) -> torch.nn.Module:
    """A training copy or view of a denoiser with the settings' gradient checkpointing and torch.compile."""
    if settings.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    return denoisers.compiled(model) if settings.compile else model


def optimize_embedding(family: ModelFamily, photo: Photo, e_tgt: Text, settings: TrainSettings, precision: Precision,
                       control: Control = Control(), levers: TrainingLevers = TrainingLevers()
                       ) -> tuple[Embedding, StageRecord]:
    """Stage 1: e_opt, near e_tgt, that reconstructs the photo through the frozen base denoiser (a view of the
    loaded one, or of its quantized copy (`levers`): nothing of it trains)."""
    start, base = time.perf_counter(), family.base
    frozen = prepared_for_training(levers.frozen_base(base).eval(), settings)
    e_opt = {name: value.detach().float().clone().requires_grad_(True) for name, value in e_tgt.embedding.items()}
    batch = Batch(base, photo.at(base), e_opt, e_tgt.extras)
    result = Optimisation("embedding", batch, frozen, list(e_opt.values()), settings.embedding,
                          stage_generator(settings.seed), precision).run(control=control)
    e_opt = sharding.from_main({name: value.detach() for name, value in e_opt.items()})
    return e_opt, StageRecord.of(result, settings.embedding.steps, time.perf_counter() - start)


class FineTuning:
    """Stage 2 of one level, in pieces: a trainable copy of its denoiser (a LoRA over a view of the loaded one, or
    an fp32 copy of every weight) trained on the photo, conditioned on `embedding`. With `joint`, the embedding
    trains beside the weights at the embedding's learning rate (Forgedit). `run(until)` trains on; `weights()`
    copies what it has learned so far, `finish()` ends it. Under several processes the copy is sharded
    (sharding.py)."""

    def __init__(self, family: ModelFamily, level: Level, photo: Photo, embedding: Text, settings: TrainSettings,
                 precision: Precision, joint: bool = False, levers: TrainingLevers = TrainingLevers()):
        start = time.perf_counter()
        self.level, self.method, self.joint, self.settings = level, settings.method, joint, settings
        self.quantized = levers.memory.quantized  # a LoRA over a quantized copy is not merged into it
        is_base = level is family.base
        self.key = fine_tune_stage([lvl.name for lvl in family.levels], level.name)
        self.steps = settings.fine_tune_of(level.name, is_base).steps
        self.trained = prepared_for_training(self._trainable_copy(level, settings, levers), settings).train()
        self.embedding = {name: value.detach().clone().requires_grad_(joint) if joint else value.detach()
                          for name, value in embedding.embedding.items()}
        params: list = [p for p in self.trained.parameters() if p.requires_grad]
        if joint:
            sharding.averaged_gradients(list(self.embedding.values()))
            params = [{"params": params}, {"params": list(self.embedding.values()),
                                            "lr": settings.embedding.learning_rate}]
        batch = Batch(level, photo.at(level), self.embedding, embedding.extras, None if is_base else photo.pixels)
        stage = "fine-tune" if is_base else f"fine-tune {level.name}"
        self.optimisation = Optimisation(stage, batch, self.trained, params, settings.fine_tune_of(level.name, is_base),
                                         stage_generator(settings.seed, level, is_base), precision)
        self.seconds = time.perf_counter() - start  # the copy is part of the stage's time

    @staticmethod
    def _trainable_copy(level: Level, settings: TrainSettings, levers: TrainingLevers) -> torch.nn.Module:
        if sharding.active():
            return sharding.sharded_copy(level.denoiser)
        if settings.method == "lora":
            return denoisers.add_lora(levers.frozen_base(level), settings.lora_rank,
                                      settings.lora_scale_alpha, settings.seed, targets=level.lora_targets)
        return denoisers.full_copy(level.denoiser)

    def run(self, until: int | None = None, control: Control = Control(), offload: bool = False) -> StageRecord:
        """Train on to `until` steps (default: all of them). `offload`: the loaded denoiser leaves memory meanwhile
        (full fine-tuning trains an fp32 copy and needs nothing of it until sampling)."""
        start = time.perf_counter()
        with denoisers.offloaded(self.level.denoiser) if offload else contextlib.nullcontext():
            result = self.optimisation.run(until, control)
        self.seconds += time.perf_counter() - start
        return StageRecord.of(result, self.steps, self.seconds)

    def weights(self) -> dict[str, torch.Tensor]:
        """Copies of the weights trained so far, in the loaded denoiser's dtype (as an edit state keeps them)."""
        dtype, trained = self.level.denoiser.dtype, denoisers.trained_weights(self.trained, self.method)
        return {name: value.to(dtype, copy=True) for name, value in sharding.full(trained).items()}

    def e_opt(self) -> Embedding:
        """The embedding as trained so far (moved by a joint stage 2, else as given), on the CPU."""
        return {name: value.detach().cpu().clone() for name, value in self.embedding.items()}

    def finish(self) -> tuple[dict[str, torch.Tensor], torch.nn.Module]:
        """End training: the trained weights as an edit state keeps them, and the trained copy itself, ready to
        sample (frozen, in the loaded denoiser's dtype, a LoRA merged where that pays: denoisers.worth_merging).
        The weights are the copy's own tensors, not copies of them: a full fine-tune's are a whole denoiser. A
        sharded copy's weights are gathered, and the denoiser rebuilt from them as from a loaded edit state."""
        if sharding.active():
            model = denoisers.edited_denoiser(self.level.denoiser, self.method, self.weights(), self.settings.lora_rank,
                                              self.settings.lora_scale_alpha, targets=self.level.lora_targets)
            return denoisers.trained_weights(model, self.method), model
        model = denoisers.cast_for_sampling(self.trained, self.level.denoiser.dtype)
        weights = denoisers.trained_weights(model, self.method)
        if self.method == "lora" and not self.quantized and denoisers.worth_merging(self.level.denoiser):
            model = denoisers.merge_lora(model)
        return weights, model


@dataclass
class FineTuned:
    """Stage 2's outcome: per level trained, its trained copy and record; and e_opt as stage 2 left it."""

    tunings: dict[str, FineTuning]
    records: dict[str, StageRecord]
    e_opt: Embedding

    @property
    def finished(self) -> bool:
        return all(record.finished for record in self.records.values())


def fine_tune(family: ModelFamily, photo: Photo, e_opt: Embedding, e_tgt: Text, settings: TrainSettings,
              precision: Precision, control: Control = Control(), levers: TrainingLevers = TrainingLevers()) -> FineTuned:
    """Stage 2: the base level fine-tuned with e_opt, then each upper level (if the base finished and its settings
    give it steps) with e_tgt or, as the settings' `upper_condition` says, e_opt."""
    base = family.base
    tuning = FineTuning(family, base, photo, replace(e_tgt, embedding=e_opt), settings, precision, joint=settings.joint,
                        levers=levers)
    tuned = FineTuned({base.name: tuning}, {tuning.key: tuning.run(control=control, offload=settings.method == "full")},
                      tuning.e_opt())
    condition = e_tgt if settings.upper_condition == "e_tgt" else replace(e_tgt, embedding=tuned.e_opt)
    for level in family.levels[1:]:
        if not tuned.finished or not settings.fine_tune_of(level.name, base=False).steps:
            continue
        # Where its photo is, not family.device: the loaded base may be out of the accelerator (memory levers).
        upper = FineTuning(family, level, photo, _on(condition, photo.at(level).device), settings, precision,
                           levers=levers)
        tuned.tunings[level.name] = upper
        tuned.records[upper.key] = upper.run(control=control, offload=settings.method == "full")
    return tuned


def edit_state(family: ModelFamily, identity: dict, target_text: str, photo: Photo, e_tgt: Text,
               settings: TrainSettings, timings: dict[str, float], records: dict[str, StageRecord], e_opt: Embedding,
               weights: dict[str, dict[str, torch.Tensor]]) -> EditState:
    """The edit state of stages 1 and 2 as far as they went: `records` by stage ("embedding", then each level's
    fine-tuning key), `weights` by level. Its tensors are on the CPU, where stage 3 mixes the embeddings, so that
    sampling after training and after loading the state mix them bit for bit alike."""
    def cpu(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {name: value.detach().cpu() for name, value in tensors.items()}

    return EditState(
        target_text=target_text, e_tgt=cpu(e_tgt.embedding), e_opt=cpu(e_opt),
        method=settings.method if records["embedding"].finished else "none",
        weights={level: dict(tensors) for level, tensors in weights.items()}, settings=copy.deepcopy(settings),
        base_model=identity, image_sha256=photo.sha256, height=photo.image.height, width=photo.image.width,
        losses={key: list(record.losses) for key, record in records.items()},
        stages={key: record.status for key, record in records.items()},
        timings={**timings, **{key: record.seconds for key, record in records.items()}},
        levels=[level.name for level in family.levels], text_extras=cpu(e_tgt.extras),
        photo={"pixels": torch.from_numpy(np.array(photo.image, dtype=np.uint8))})


def checkpoint(family: ModelFamily, identity: dict, target_text: str, photo: Photo, e_tgt: Text,
               settings: TrainSettings, embedding: StageRecord, tuning: FineTuning) -> EditState:
    """The edit state that a training of the base level stopped after `tuning`'s steps so far gives (its learning
    rate is constant): one run of stage 2 yields several fine-tuning lengths."""
    steps = tuning.optimisation.steps_done
    record = StageRecord.of(tuning.optimisation.result, steps, tuning.seconds)
    return edit_state(family, identity, target_text, photo, e_tgt, settings.with_fine_tune_steps(steps), {},
                      {"embedding": embedding, tuning.key: record}, tuning.e_opt(), {tuning.level.name: tuning.weights()})


def stage_label(stage: str) -> str:
    """A stage of an edit state ("embedding", "fine_tune", "fine_tune.<level>") as users read it."""
    return {"embedding": "embedding optimisation", "fine_tune": "fine-tuning"}.get(
        stage, f"fine-tuning of {stage.removeprefix('fine_tune.')}")


def raise_if_stopped(state: EditState) -> None:
    """A training that did not finish raises, carrying the state of what finished."""
    unfinished = [(stage, status) for stage, status in state.stages.items() if status != "done"]
    if not unfinished:
        return
    stage, status = unfinished[-1]
    label = stage_label(stage)
    if status.startswith("NaN"):
        raise TrainingDivergedError(f"{label} stopped: {status}; lower its learning rate or use fp32", partial_state=state)
    raise TrainingInterrupted(f"{label} {status}", partial_state=state)


def _on(text: Text, device: torch.device) -> Text:
    return Text({k: v.to(device) for k, v in text.embedding.items()}, {k: v.to(device) for k, v in text.extras.items()})


def interpolate(e_tgt: Embedding, e_opt: Embedding, eta: float) -> Embedding:
    """Stage 3's conditioning: eta * e_tgt + (1 - eta) * e_opt (eta=0: the input image, eta=1: the text)."""
    return {name: eta * e_tgt[name] + (1.0 - eta) * e_opt[name] for name in e_tgt}


def project(e_tgt: Embedding, e_opt: Embedding, eta: float) -> Embedding:
    """Forgedit's vector projection: each token's vector of e_tgt split into its part along e_opt's vector and
    the part orthogonal to it; e = e_opt + eta * the orthogonal part. What the text adds that the photo's
    embedding does not already say is added in full at eta 1, and e_opt's own direction is never shrunk, as
    interpolation shrinks it (eta=0: the input image)."""
    mixed = {}
    for name in e_tgt:
        target, learned = e_tgt[name], e_opt[name]
        along = (target * learned).sum(-1, keepdim=True) / (learned * learned).sum(-1, keepdim=True).clamp_min(1e-12)
        mixed[name] = learned + eta * (target - along * learned)
    return mixed


MIXES: dict[str, Callable[[Embedding, Embedding, float], Embedding]] = {"interpolate": interpolate, "project": project}


@dataclass
class SampleOutput:
    """Edited images by (eta, seed); `grid()` lays them out with a row per seed and a column per eta. `mask`: where
    the edit could change the photo (white), at the images' size, when sampled with one."""

    images: dict[tuple[float, int], Image.Image]
    etas: list[float]
    seeds: list[int]
    mask: Image.Image | None = None

    def grid(self, min_cell: int = 96) -> Image.Image:
        """Small images are enlarged (nearest neighbour) to `min_cell` pixels so the labels fit."""
        factor = max(1, -(-min_cell // min(next(iter(self.images.values())).size)))
        rows = [[_enlarge(self.images[(eta, seed)], factor) for eta in self.etas] for seed in self.seeds]
        return image_grid(rows, [f"seed {s}" for s in self.seeds], [f"eta {e:g}" for e in self.etas])


def _enlarge(image: Image.Image, factor: int) -> Image.Image:
    return image.resize((image.width * factor, image.height * factor), Image.Resampling.NEAREST)


def edit_mask(family: ModelFamily, models: dict[str, torch.nn.Module], state: EditState, settings: SampleSettings,
              photo: Image.Image) -> tuple[torch.Tensor, torch.Tensor]:
    """Where stage 3 may change the photo (masks.py), at the base level's latent size, 1: edit, 0: keep: the user's
    picture, or where the fine-tuned model's predictions under e_tgt and e_opt differ. Returns it with the photo's
    latents at the base level."""
    base = family.base
    x0 = base.encode_image(image_to_tensor(photo))
    if settings.mask != masks.AUTO:
        picture = masks.from_picture(settings.mask, photo.height, photo.width)
        return masks.to_latents(picture, *x0.shape[-2:]), x0
    extras = {name: value.to(x0.device) for name, value in state.text_extras.items()}
    difference = masks.prediction_difference(base, models[base.name], x0, state.e_tgt, state.e_opt, extras)
    return masks.threshold(difference, settings.mask_threshold, settings.mask_grow), x0


def sample(family: ModelFamily, models: dict[str, torch.nn.Module], state: EditState, etas: list[float],
           seeds: list[int], settings: SampleSettings, photo: Image.Image | None = None,
           control: Control = Control(), callback_on_step_end: Callable | None = None,
           mask: tuple[torch.Tensor, torch.Tensor] | None = None) -> dict[tuple[float, int], Image.Image]:
    """Stage 3: an image per eta and seed from the fine-tuned denoisers (`models`, by level), conditioned on
    `settings.mix` of e_tgt and e_opt at each eta (a cascade's upper levels: on e_tgt, or e_opt if they were
    fine-tuned with it). Every eta of a seed starts from the same noise, so a row of etas differs by eta
    alone; with `photo` (the fitted photo trained on) and a strength below 1, from the photo noised to it,
    and with `settings.invert`, from its DDIM inversion under e_opt through the fine-tuned model. With `mask`
    (edit_mask's mask and photo latents) the photo is kept outside it. `settings` must be complete
    (ImagicEditor.check_sampling fills it)."""
    negative = family.encode_text(settings.negative_prompt or "", allow_empty=True)
    upper = state.e_tgt if state.settings.upper_condition == "e_tgt" else state.e_opt
    inverted = None
    if settings.invert:
        base = family.base
        inverted = family.invert(models[base.name], base.encode_image(image_to_tensor(photo)), state.e_opt,
                                 settings.num_inference_steps)
    images: dict[tuple[float, int], Image.Image] = {}
    for seed in seeds:
        for first in range(0, len(etas), settings.batch_size):
            chunk = etas[first : first + settings.batch_size]
            mixed = [MIXES[settings.mix](state.e_tgt, state.e_opt, eta) for eta in chunk]
            job = SamplingJob(
                denoisers=models, embedding={name: torch.cat([m[name] for m in mixed]) for name in mixed[0]},
                extras=state.text_extras, upper_embedding=upper, negative=negative,
                generators=[torch.Generator().manual_seed(seed) for _ in chunk], settings=settings,
                height=state.height, width=state.width, photo=photo,
                latents=None if inverted is None else inverted.expand(len(chunk), *inverted.shape[1:]),
                trained_levels=frozenset(state.weights), progress=control.progress,
                callback_on_step_end=callback_on_step_end, mask=None if mask is None else mask[0],
                x0=None if mask is None else mask[1])
            images.update({(eta, seed): image for eta, image in zip(chunk, _pictures(family, job, settings))})
    return images


def _pictures(family: ModelFamily, job: SamplingJob, settings: SampleSettings) -> list[Image.Image]:
    """`family.sample(job)`, refused where numbers overflowed: NaN pixels (seen as the pipeline casts its pictures to
    bytes) or a picture of one colour everywhere, what huge values give instead of an edit."""
    with warnings.catch_warnings():
        warnings.filterwarnings("error", "invalid value encountered in cast", RuntimeWarning)
        try:
            pictures = family.sample(job)
        except RuntimeWarning:
            pictures = None
    if pictures is None or any(_one_colour(image) for image in pictures):
        what = "NaN" if pictures is None else "a picture of one colour"
        raise SamplingError(f"sampling gave {what}: the edit's numbers overflow (guidance scale "
                            f"{settings.guidance_scale:g}); lower the guidance or the eta, or train the edit again")
    return pictures


def _one_colour(image: Image.Image) -> bool:
    return all(low == high for low, high in image.convert("RGB").getextrema())
