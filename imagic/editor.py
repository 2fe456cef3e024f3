"""The Python API: an editor built from a diffusers pipeline that trains and samples Imagic edits.

    editor = ImagicEditor.from_pretrained("path/to/stable-diffusion")
    state = editor.train("dog.jpg", "a photo of a sitting dog")
    output = editor.sample(state, etas=[0.6, 0.7, 0.8], seeds=[0, 1])
    state.save("dog-sitting.safetensors")

The loaded pipeline is never modified: training works on copies (see denoisers.py), so one
editor can run many independent edits, and the pipeline stays usable for anything else.
"""

import contextlib
import hashlib
import os
import time
from dataclasses import dataclass, replace
from typing import Callable

import torch
from PIL import Image

from . import denoisers
from .defaults import ModelDefaults, model_defaults
from .errors import SettingsError, StateMismatchError, TrainingDivergedError, TrainingInterrupted
from .families import Embedding, Level, family_for, make_scheduler
from .image_io import fit_to_size, image_grid, image_to_tensor, load_image, to_rgb
from .interrupts import ctrl_c_requests
from .loading import defaults_before_loading, load_pipeline
from .precision import Precision, resolve_precision
from .settings import SampleSettings, TrainSettings, check_choice, check_sampling
from .stages import MIXES, StageResult, StepCallback, fine_tune, optimize_embedding
from .state import EditState, check_fits, check_same_model, fine_tune_stage, model_identity

MAX_RESOLUTION_SCALE = 4  # training and output sides: at most this many times the model's native size


@dataclass
class SampleOutput:
    """Edited images by (eta, seed); `grid()` lays them out with a row per seed and a column per eta."""

    images: dict[tuple[float, int], Image.Image]
    etas: list[float]
    seeds: list[int]

    def grid(self, min_cell: int = 96) -> Image.Image:
        """Small images are enlarged (nearest neighbour) to `min_cell` pixels so the labels fit."""
        factor = max(1, -(-min_cell // min(next(iter(self.images.values())).size)))
        rows = [[_enlarge(self.images[(eta, seed)], factor) for eta in self.etas] for seed in self.seeds]
        return image_grid(rows, [f"seed {s}" for s in self.seeds], [f"eta {e:g}" for e in self.etas])


def _enlarge(image: Image.Image, factor: int) -> Image.Image:
    return image.resize((image.width * factor, image.height * factor), Image.Resampling.NEAREST)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device, defaults: ModelDefaults) -> torch.dtype:
    """fp32 on the CPU (bf16 there is ~20x slower); on a GPU the model's own, bf16 falling back to fp16 where the
    GPU lacks it."""
    if device.type == "cpu":
        return torch.float32
    if defaults.gpu_dtype == "bf16" and (device.type != "cuda" or torch.cuda.is_bf16_supported()):
        return torch.bfloat16
    return torch.float16


def _stage_status(result: StageResult, steps: int) -> str:
    if result.finished:
        return "done"
    reason = "NaN/inf loss" if result.stopped == "nan" else "interrupted"
    return f"{reason} at step {len(result.losses) + 1} of {steps}"


@dataclass
class _TrainingRecord:
    """Everything an EditState holds but the weights: shared by a training's final state and its checkpoints."""

    target_text: str
    e_tgt: Embedding
    e_opt: Embedding
    base_model: dict
    image_sha256: str
    height: int
    width: int
    stages: dict[str, str]
    losses: dict[str, list[float]]
    timings: dict[str, float]
    levels: list[str]

    def state(self, method: str, weights: dict[str, dict], settings: TrainSettings) -> EditState:
        """A state of its own: later changes to this record do not reach it."""
        return EditState(
            target_text=self.target_text, e_tgt=self.e_tgt, e_opt=self.e_opt, method=method,
            weights={level: dict(tensors) for level, tensors in weights.items()}, settings=settings.to_dict(),
            base_model=self.base_model, image_sha256=self.image_sha256, height=self.height, width=self.width,
            losses={k: list(v) for k, v in self.losses.items()}, stages=dict(self.stages),
            timings=dict(self.timings), levels=list(self.levels),
        )


def _stage_label(key: str) -> str:
    if key == "embedding":
        return "embedding optimisation"
    return "fine-tuning" if key == "fine_tune" else f"fine-tuning of {key.removeprefix('fine_tune.')}"


class ImagicEditor:
    """Trains Imagic edits of single images and samples them at any eta and seed."""

    def __init__(self, pipe, super_resolution=None):
        """`pipe`: a text-to-image pipeline; `super_resolution`: a cascade's next stage (DeepFloyd IF's stage II,
        an IFSuperResolutionPipeline), fine-tuned and sampled after `pipe`."""
        self.pipe = pipe
        self.family = family_for(pipe, super_resolution)
        self._identity: dict | None = None
        self._cached: tuple[EditState, dict[str, torch.nn.Module], str] | None = None

    @classmethod
    def from_pretrained(
        cls,
        model: str | os.PathLike,
        *,
        device: str | torch.device | None = None,
        torch_dtype: torch.dtype | None = None,
        config: str | os.PathLike | None = None,
        allow_pickle: bool = False,
        super_resolution: str | os.PathLike | None = None,
    ) -> "ImagicEditor":
        """Load a model (folder, hub id or single file) onto `device`, by default in its family's GPU dtype on GPUs
        (fp16; bf16 for SD3 and FLUX where the GPU has it), in fp32 on the CPU.
        `super_resolution`: a cascade's next stage (folder or hub id), e.g. DeepFloyd IF's stage II."""
        device = torch.device(device) if device is not None else default_device()
        if torch_dtype is None:
            torch_dtype = default_dtype(device, defaults_before_loading(model))
        pipe = load_pipeline(model, torch_dtype=torch_dtype, config=config, allow_pickle=allow_pickle)
        upper = None
        if super_resolution is not None:
            # Its text encoder is not loaded: the cascade's embeddings come from the first stage's (IF's T5).
            upper = load_pipeline(super_resolution, torch_dtype=torch_dtype, skip=("text_encoder",)).to(device)
        return cls(pipe.to(device), upper)

    @property
    def defaults(self) -> ModelDefaults:
        """The settings used where none are given: the built-in model's own, else its family's."""
        return model_defaults(str(getattr(self.pipe, "name_or_path", "") or ""), self.family.defaults)

    @property
    def identity(self) -> dict:
        if self._identity is None:
            self._identity = model_identity(self.family)
        return self._identity

    def resolution(self, settings: TrainSettings) -> tuple[int, int]:
        """The training (and sampling) size: the model's native one unless the settings name one."""
        if settings.resolution is None:
            return self.family.native_resolution()
        size = settings.resolution
        height, width = (size, size) if isinstance(size, int) else size
        multiple = self.family.resolution_multiple()
        if height % multiple or width % multiple or height <= 0 or width <= 0:
            raise SettingsError(
                f"resolution {height}x{width} must be positive multiples of {multiple} for this model, "
                f"e.g. {max(multiple, round(height / multiple) * multiple)}"
            )
        # Past 4x its native size per side a model draws repeated tiles, and the attention's memory
        # (quadratic in the latent's pixels) grows 256-fold: beyond any one machine for SD's 512.
        native = self.family.native_resolution()
        if height > MAX_RESOLUTION_SCALE * native[0] or width > MAX_RESOLUTION_SCALE * native[1]:
            raise SettingsError(
                f"resolution {height}x{width} is over {MAX_RESOLUTION_SCALE}x this model's native "
                f"{native[0]}x{native[1]} per side: choose at most {MAX_RESOLUTION_SCALE * native[0]}x"
                f"{MAX_RESOLUTION_SCALE * native[1]}"
            )
        return height, width

    def check_sampling(self, etas, seeds, settings: SampleSettings | None = None, *, with_photo: bool = False,
                       **options) -> SampleSettings:
        """Stage 3's settings (`settings`, with `options` as SampleSettings fields over it) checked against this
        model before any work (`imagic edit` calls it before training); returns them with the model's defaults
        filled in. `with_photo`: the photo will be given, so a strength left out is the model's default."""
        settings = replace(settings or SampleSettings(), **options)
        defaults = self.defaults
        if settings.strength is None:
            settings = replace(settings, strength=defaults.start_strength(with_photo, settings.invert))
        if settings.guidance_scale is None:
            settings = replace(settings, guidance_scale=defaults.guidance_scale)
        if settings.num_inference_steps is None:
            settings = replace(settings, num_inference_steps=defaults.num_inference_steps)
        check_sampling(etas, seeds, settings)
        if settings.invert and not self.family.inverts:
            raise SettingsError(f"{self.family.name} cannot start from an inversion of the photo: start from the "
                                "photo with a strength below 1 instead")
        if settings.negative_prompt and not self.family.takes_negative_prompt:
            raise SettingsError(f"{self.family.name} guides without a negative pass (its guidance is distilled into "
                                "the model): leave the negative prompt out")
        check_choice("mix", settings.mix, tuple(MIXES))
        groups = ("none", *self.family.base.forget_groups)
        if settings.forget not in groups:
            raise SettingsError(f"{self.family.name} has no forgetting group {settings.forget!r}: its groups are "
                                f"{', '.join(groups)}")
        steps, strength = settings.num_inference_steps, settings.strength
        if int(steps * strength) < 1:  # what diffusers' img2img runs: it fails deep inside on none
            raise SettingsError(f"strength {strength:g} of {steps} steps leaves no denoising step: "
                                f"raise the strength to at least {1 / steps:g} or the steps")
        config = self.pipe.scheduler.config
        sampler = make_scheduler(settings.scheduler, config) or type(self.pipe.scheduler).from_config(config)
        try:
            # FLUX shifts its schedule by the image's size (mu); any mu checks the step count.
            sampler.set_timesteps(steps, **({"mu": 1.0} if sampler.config.get("use_dynamic_shifting") else {}))
        except ValueError as error:
            raise SettingsError(f"{steps} inference steps: {' '.join(str(error).split())}") from None
        return settings

    def prepare_image(self, image: str | os.PathLike | Image.Image, settings: TrainSettings, scale: int = 1
                      ) -> Image.Image:
        """Load (if a path) and fit the image to the training size (times `scale`: a level above the base) by
        the settings' resize rule."""
        if not isinstance(image, Image.Image):
            image = load_image(image)
        height, width = self.resolution(settings)
        return fit_to_size(to_rgb(image), width * scale, height * scale, settings.resize)

    def train(
        self,
        image: str | os.PathLike | Image.Image,
        target_text: str,
        settings: TrainSettings | None = None,
        *,
        progress: bool = True,
        callback: StepCallback | None = None,
        on_fine_tune_step: Callable[[int, Callable[[], EditState]], None] | None = None,
        embedding_from: EditState | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> EditState:
        """Stages 1 and 2: optimise e_opt on the base level, then fine-tune a copy of each level's denoiser: the
        base with e_opt, a cascade's upper levels on the photo at their own size with e_tgt (or, as the settings'
        `upper_condition` says, e_opt).

        `on_fine_tune_step(steps, snapshot)` is called after each of the base level's fine-tuning
        steps but the last; `snapshot()` returns the complete state a run of that many steps would
        return (the learning rate is constant), so one run yields several fine-tuning strengths (the
        quality benchmark's checkpoints). Time spent in the hook is not counted.
        `embedding_from` reuses stage 1 of an earlier state of the same image, text, embedding
        settings and seed (e.g. to fine-tune it again with LoRA): the result is the same as
        running stage 1 again, since each stage draws from its own seeded generator.

        `should_stop` is asked before every optimiser step and may be set from any thread (a web
        front-end's Cancel button): when it returns True, training stops as on Ctrl-C.

        Raises TrainingDivergedError / TrainingInterrupted carrying `partial_state`: whatever
        finished before a NaN loss, Ctrl-C or `should_stop`, which can still be saved and sampled.
        """
        settings = settings or self.defaults.train_settings()
        family, base = self.family, self.family.base
        self._cached = None  # an earlier edit's sampling copies: freed before this one trains
        if not isinstance(image, Image.Image):
            image = load_image(image)
        fitted = self.prepare_image(image, settings)
        image_sha256 = _pixels_sha256(fitted)
        timings: dict[str, float] = {}

        start = time.perf_counter()
        e_tgt = family.encode_text(target_text)
        photo = image_to_tensor(fitted)
        x0 = base.encode_image(photo)
        timings["encode"] = time.perf_counter() - start
        precision = resolve_precision(settings.precision, family.device, base.denoiser.dtype)

        # One Ctrl-C listener for both stages and the copy between them (the stages' own listeners
        # share its flag): a Ctrl-C on stage 1's last step, or while the UNet is copied, stops
        # training before fine-tuning takes a step.
        with ctrl_c_requests():
            if embedding_from is not None:
                _check_reusable(embedding_from, target_text, image_sha256, settings)
                e_opt = {name: value.to(family.device) for name, value in embedding_from.e_opt.items()}
                embedding_result = StageResult(losses=list(embedding_from.losses["embedding"]))
                timings["embedding"] = embedding_from.timings.get("embedding", 0.0)
            else:
                start = time.perf_counter()
                e_opt, embedding_result = self._optimize_embedding(x0, e_tgt, settings, precision, progress, callback,
                                                                   should_stop)
                timings["embedding"] = time.perf_counter() - start
            record = _TrainingRecord(
                target_text=target_text, e_tgt=_to_cpu(e_tgt), e_opt=_to_cpu(e_opt), base_model=self.identity,
                image_sha256=image_sha256, height=fitted.height, width=fitted.width,
                stages={"embedding": _stage_status(embedding_result, settings.embedding.steps)},
                losses={"embedding": embedding_result.losses}, timings=timings,
                levels=[level.name for level in family.levels],
            )
            method, weights, trained, failed = "none", {}, {}, embedding_result
            if embedding_result.finished:
                method = settings.method
                trained[base.name], failed = self._fine_tune(
                    base, record, x0, e_opt, settings, precision, progress, callback, on_fine_tune_step,
                    should_stop,
                )
                chosen = e_tgt if settings.upper_condition == "e_tgt" else record.e_opt  # after a joint stage 2
                upper_embedding = {name: value.to(family.device) for name, value in chosen.items()}
                for level in family.levels[1:]:
                    if not failed.finished or not settings.fine_tune_of(level.name, base=False).steps:
                        continue
                    level_x0 = level.encode_image(image_to_tensor(self.prepare_image(image, settings, level.scale)))
                    trained[level.name], failed = self._fine_tune(
                        level, record, level_x0, upper_embedding, settings, precision, progress, callback, None,
                        should_stop, photo,
                    )
                weights = {name: denoisers.trained_weights(model, method) for name, model in trained.items()}

        state = record.state(method, weights, settings)
        if trained:  # the levels left as loaded are sampled as they are
            models = {level.name: self._merged_if_worth_it(trained[level.name], level, method) if level.name in trained
                      else denoisers.frozen_view(level.denoiser).eval() for level in family.levels}
            self._cached = (state, models, "none")
        if not failed.finished:
            last = list(record.stages)[-1]
            stage, status = _stage_label(last), record.stages[last]
            if failed.stopped == "nan":
                raise TrainingDivergedError(
                    f"{stage} stopped: {status}; lower its learning rate or use fp32", partial_state=state
                )
            raise TrainingInterrupted(f"{stage} {status}", partial_state=state)
        return state

    def _optimize_embedding(
        self, x0: torch.Tensor, e_tgt: Embedding, settings: TrainSettings, precision: Precision, progress: bool,
        callback: StepCallback | None, should_stop: Callable[[], bool] | None,
    ) -> tuple[Embedding, StageResult]:
        """Stage 1 on a frozen view of the loaded base denoiser."""
        base = self.family.base
        frozen = self._with_checkpointing(denoisers.frozen_view(base.denoiser).eval(), settings)
        return optimize_embedding(
            base, frozen, x0, e_tgt, settings.embedding, _stage_generator(settings.seed, 0), precision,
            progress, callback, should_stop,
        )

    def _fine_tune(
        self, level: Level, record: _TrainingRecord, x0: torch.Tensor, e_opt: Embedding, settings: TrainSettings,
        precision: Precision, progress: bool, callback: StepCallback | None,
        on_step: Callable[[int, Callable[[], EditState]], None] | None, should_stop: Callable[[], bool] | None,
        photo: torch.Tensor | None = None,
    ) -> tuple[torch.nn.Module, StageResult]:
        """Stage 2 of one level on a trainable copy of its denoiser, conditioned on `e_opt` (an upper level: on the
        embedding its settings name, and on `photo` at the base's size); calls `on_step(steps, snapshot)` after each
        step but the last and writes the stage's time, status and losses into `record`. Returns the copy, ready to
        sample."""
        is_base = level is self.family.base
        key, stage_settings = fine_tune_stage(record.levels, level.name), settings.fine_tune_of(level.name, is_base)
        start = time.perf_counter()
        trained = self._with_checkpointing(self._trainable_copy(level, settings), settings).train()
        step_losses: list[float] = []
        outside = 0.0  # seconds spent in on_step, left out of the stage's time

        def step_done(stage: str, step: int, loss: float) -> None:
            nonlocal outside
            if callback is not None:
                callback(stage, step, loss)
            step_losses.append(loss)
            if on_step is None or step + 1 >= stage_settings.steps:
                return
            paused = time.perf_counter()

            def snapshot() -> EditState:
                record.timings[key] = paused - start - outside
                record.stages[key], record.losses[key] = "done", step_losses
                weights = denoisers.trained_weights(trained, settings.method)
                copies = {name: value.to(level.denoiser.dtype, copy=True) for name, value in weights.items()}
                if joint:
                    record.e_opt = _to_cpu({name: value.detach().clone() for name, value in e_opt.items()})
                return record.state(settings.method, {level.name: copies}, settings.with_fine_tune_steps(step + 1))

            on_step(step + 1, snapshot)
            outside += time.perf_counter() - paused

        joint = settings.joint and is_base
        if joint:  # e_opt trains beside the weights: a copy of its own, read back after
            e_opt = {name: value.detach().clone().requires_grad_(True) for name, value in e_opt.items()}
        generator = _stage_generator(settings.seed, 1) if is_base else _level_generator(settings.seed, level.name)
        # Full fine-tuning trains an fp32 copy: the loaded denoiser is not needed until it ends, unless a caller
        # watching the steps (on_step) samples between them.
        offload = settings.method == "full" and on_step is None
        with denoisers.offloaded(level.denoiser) if offload else contextlib.nullcontext():
            result = fine_tune(
                level, trained, x0, e_opt, stage_settings, generator, precision, progress, step_done,
                embedding_lr=settings.embedding.learning_rate if joint else None, should_stop=should_stop,
                photo=photo, stage="fine-tune" if is_base else f"fine-tune {level.name}",
            )
        if joint:
            record.e_opt = _to_cpu({name: value.detach() for name, value in e_opt.items()})
        record.timings[key] = time.perf_counter() - start - outside
        record.stages[key] = _stage_status(result, stage_settings.steps)
        record.losses[key] = result.losses
        return denoisers.cast_for_sampling(trained, level.denoiser.dtype), result

    def sample(
        self,
        state: EditState,
        etas: list[float] | tuple[float, ...] | None = None,
        seeds: list[int] | tuple[int, ...] = (0,),
        settings: SampleSettings | None = None,
        *,
        image: str | os.PathLike | Image.Image | None = None,
        progress: bool = True,
        callback_on_step_end: Callable | None = None,
        **options,
    ) -> SampleOutput:
        """Stage 3: sample e = eta*e_tgt + (1-eta)*e_opt from the fine-tuned model, per eta and seed (a cascade's
        upper levels: conditioned on e_tgt, or e_opt if they were fine-tuned with it).

        `settings` (SampleSettings) says how; `options` are its fields given as keywords, over it
        (`sample(state, [0.7], num_inference_steps=50)`). Fields left None and etas left out are the
        model's defaults (`self.defaults`). Every eta of one seed starts from the same noise, so a row
        of the grid differs by eta alone. `callback_on_step_end` is passed to the diffusers pipeline
        (same signature as there).

        Where sampling starts (the paper starts from pure noise): with the photo the state was trained
        on as `image`, `strength` < 1 starts from the photo noised to that strength, as SDEdit does, and
        `invert=True` from a DDIM inversion of the photo under e_opt through the fine-tuned model
        (deterministic: every seed gives the same image). A strength left out is the model's default
        (`self.defaults.strength`) when `image` is given, else 1: without the photo, from noise.

        Beyond the paper, from Forgedit (Zhang et al., 2023): `mix="project"` adds eta times the part of e_tgt
        orthogonal to e_opt instead of interpolating (stages.project); `forget` sets part of the trained weights
        back to the base model's (the base level's `forget_groups`: a UNet's "encoder", "decoder",
        "all-but-encoder-kv"; a transformer's "all-but-text-kv").
        """
        etas = self.defaults.etas if etas is None else etas
        settings = self.check_sampling(etas, seeds, settings, with_photo=image is not None, **options)
        etas, seeds = [float(e) for e in etas], [int(s) for s in seeds]
        self.check_state(state)
        photo = self._sampling_start(state, image, settings.from_photo)
        negative = self.family.encode_text(settings.negative_prompt or "", allow_empty=True)
        check_fits(state, negative, self._state_size(state))
        models = self._denoisers_for(state, settings.forget)
        base = self.family.base
        upper = state.e_tgt if state.settings.get("upper_condition", "e_tgt") == "e_tgt" else state.e_opt
        inverted = None
        if settings.invert:
            x0 = base.encode_image(image_to_tensor(photo))
            inverted = self.family.invert(models[base.name], x0, state.e_opt, settings.num_inference_steps)
        images: dict[tuple[float, int], Image.Image] = {}
        for seed in seeds:
            for first in range(0, len(etas), settings.batch_size):
                chunk = etas[first : first + settings.batch_size]
                mixed = [MIXES[settings.mix](state.e_tgt, state.e_opt, eta) for eta in chunk]
                embedding = {name: torch.cat([m[name] for m in mixed]) for name in mixed[0]}
                generators = [torch.Generator().manual_seed(seed) for _ in chunk]
                batch = self.family.sample(
                    models, embedding, upper, negative, generators, height=state.height, width=state.width,
                    num_inference_steps=settings.num_inference_steps, guidance_scale=settings.guidance_scale,
                    guidance_rescale=settings.guidance_rescale, scheduler_name=settings.scheduler, progress=progress,
                    callback_on_step_end=callback_on_step_end, image=photo, strength=settings.strength,
                    latents=None if inverted is None else inverted.expand(len(chunk), *inverted.shape[1:]),
                    trained_levels=frozenset(state.weights),
                )
                images.update({(eta, seed): img for eta, img in zip(chunk, batch)})
        return SampleOutput(images, etas, seeds)

    def _sampling_start(self, state: EditState, image, from_photo: bool) -> Image.Image | None:
        """The photo to start from, fitted as in training and checked to be the one trained on; None for noise."""
        if image is None:
            if from_photo:
                raise SettingsError("starting from the photo (strength below 1, or invert) needs the photo: pass image")
            return None
        settings = TrainSettings.from_dict(state.settings)
        fitted = fit_to_size(to_rgb(image if isinstance(image, Image.Image) else load_image(image)),
                             state.width, state.height, settings.resize)
        if _pixels_sha256(fitted) != state.image_sha256:
            raise SettingsError("that image is not the photo this edit was trained on: pass the same photo")
        return fitted

    def check_state(self, state: EditState) -> None:
        """Refuse, in one line, a state trained on other levels or another model than this editor's."""
        levels = [level.name for level in self.family.levels]
        if state.levels != levels:
            raise StateMismatchError(f"this edit state was trained on the levels {', '.join(state.levels)}, this model "
                                     f"has {', '.join(levels)}: load the model it was trained on, with the same "
                                     "super-resolution stage (--super-resolution) or none")
        names = {name: list(c.state_dict()) for name, c in self.family.components.items()
                 if isinstance(c, torch.nn.Module)}
        check_same_model(state, self.identity, names)

    def _state_size(self, state: EditState) -> tuple[int, int]:
        try:
            return self.resolution(TrainSettings.from_dict(state.settings))
        except SettingsError as error:
            raise StateMismatchError(f"the edit state's settings do not fit this model: {error}") from None

    @staticmethod
    def _trainable_copy(level: Level, settings: TrainSettings) -> torch.nn.Module:
        if settings.method == "lora":
            view = denoisers.frozen_view(level.denoiser)
            return denoisers.add_lora(view, settings.lora_rank, settings.lora_scale_alpha, settings.seed,
                                      targets=level.lora_targets)
        return denoisers.full_copy(level.denoiser)

    @staticmethod
    def _merged_if_worth_it(trained: torch.nn.Module, level: Level, method: str) -> torch.nn.Module:
        """A trained LoRA view, merged for sampling where that pays (as `_denoisers_for` builds it from a state)."""
        if method == "lora" and denoisers.worth_merging(level.denoiser):
            return denoisers.merge_lora(trained)
        return trained

    @staticmethod
    def _with_checkpointing(model: torch.nn.Module, settings: TrainSettings) -> torch.nn.Module:
        if settings.gradient_checkpointing:
            model.enable_gradient_checkpointing()
        return model

    def _denoisers_for(self, state: EditState, forget: str = "none") -> dict[str, torch.nn.Module]:
        """The state's denoiser per level (`forget` applies to the base's); the last ones built (or trained) are
        kept, keyed by the state and `forget`."""
        if self._cached is None or self._cached[0] is not state or self._cached[2] != forget:
            rank = int(state.settings.get("lora_rank", 1))
            alpha = state.settings.get("lora_alpha") or rank
            self._cached = None  # full copies are freed before the next are built
            models = {}
            for level in self.family.levels:
                weights = {k: v.to(self.family.device) for k, v in state.weights.get(level.name, {}).items()}
                forgotten = level.forget_groups[forget] if level is self.family.base and forget != "none" else None
                models[level.name] = denoisers.edited_denoiser(
                    level.denoiser, state.method, weights, rank, alpha, forgotten,
                    targets=level.lora_targets, merge=denoisers.worth_merging(level.denoiser))
            self._cached = (state, models, forget)
        return self._cached[1]


def _stage_generator(seed: int, stage: int) -> torch.Generator:
    """Stage k's noise and timesteps come from seed*2+k: a stage's draws do not depend on the other's."""
    return torch.Generator().manual_seed(2 * seed + stage)


def _level_generator(seed: int, level: str) -> torch.Generator:
    """An upper level's stage 2 draws from its own seed, derived from the training seed and the level's name."""
    return torch.Generator().manual_seed(int.from_bytes(hashlib.sha256(f"{seed}:{level}".encode()).digest()[:8], "big"))


def _check_reusable(state: EditState, target_text: str, image_sha256: str, settings: TrainSettings) -> None:
    earlier = TrainSettings.from_dict(state.settings)
    if state.stages.get("embedding") != "done":
        raise SettingsError("embedding_from: that state's embedding optimisation did not finish")
    if earlier.joint and state.stages.get("fine_tune"):
        raise SettingsError("embedding_from: that state's embedding was trained on in stage 2 (joint): "
                            "reuse a state trained without joint")
    if state.target_text != target_text or state.image_sha256 != image_sha256:
        raise SettingsError("embedding_from: that state was trained on another image or target text")
    if (earlier.embedding, earlier.seed, earlier.precision) != (settings.embedding, settings.seed, settings.precision):
        raise SettingsError("embedding_from: that state's embedding settings or seed differ from these")


def _to_cpu(embedding: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # Interpolation then runs on the CPU both after training and after loading: bit-identical mixes.
    return {name: value.cpu() for name, value in embedding.items()}


def _pixels_sha256(image: Image.Image) -> str:
    """The hash of the pixels trained on (after fitting), whatever file or object they came from."""
    return hashlib.sha256(image.tobytes()).hexdigest()
