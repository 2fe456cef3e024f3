"""The Python API: an editor built from a diffusers pipeline that trains and samples Imagic edits.

    editor = ImagicEditor.from_pretrained("path/to/stable-diffusion")
    state = editor.train("dog.jpg", "a photo of a sitting dog")
    output = editor.sample(state, etas=[0.6, 0.7, 0.8], seeds=[0, 1])
    state.save("dog-sitting.safetensors")

The editor is the front door: it loads the model, fills in its defaults, checks settings and states, and
calls the three stages (stages.py) in order. The loaded pipeline is never modified: training works on
copies (denoisers.py), so one editor can run many independent edits, and the pipeline stays usable for
anything else.
"""

import os
import sys
import time
import warnings
from dataclasses import replace
from typing import Callable

import torch
from PIL import Image

from . import allocator, checks, masks, sharding, stages
from .defaults import ModelDefaults
from .errors import SettingsError, StateMismatchError
from .families import family_for
from .identity import check_same_model, model_identity
from .image_io import load_image, to_rgb
from .interrupts import stopped_by_ctrl_c
from .loading import check_device, default_dtype, defaults_before_loading, load_pipeline, model_defaults
from .memory import MemorySettings, TrainingLevers
from .memory_budget import choose_levers
from .optimisation import Control, StepCallback
from .precision import Precision, resolve_precision
from .sampling_cache import SamplingCache
from .settings import SampleSettings, TrainSettings
from .stages import Photo, SampleOutput
from .state import EditState, check_fits


class ImagicEditor:
    """Trains Imagic edits of single images and samples them at any eta and seed."""

    def __init__(self, pipe, super_resolution=None):
        """`pipe`: a text-to-image pipeline; `super_resolution`: a cascade's next stage (DeepFloyd IF's stage II,
        an IFSuperResolutionPipeline), fine-tuned and sampled after `pipe`."""
        self.pipe = pipe
        self.family = family_for(pipe, super_resolution)
        self.super_resolution = str(getattr(super_resolution, "name_or_path", "") or "")
        self._identity: dict | None = None
        self._cache = SamplingCache(self.family)

    @classmethod
    def from_pretrained(cls, model: str | os.PathLike, *, device: str | torch.device | None = None,
                        torch_dtype: torch.dtype | None = None, config: str | os.PathLike | None = None,
                        allow_pickle: bool = False, super_resolution: str | os.PathLike | None = None) -> "ImagicEditor":
        """Load a model (folder, hub id or single file) onto `device`, by default in its family's GPU dtype on GPUs
        (fp16; bf16 for SD3 and FLUX where the GPU has it), in fp32 on the CPU.
        `super_resolution`: a cascade's next stage (folder or hub id), e.g. DeepFloyd IF's stage II."""
        device = check_device(device)
        torch_dtype = torch_dtype or default_dtype(device, defaults_before_loading(model))
        pipe = load_pipeline(model, torch_dtype=torch_dtype, config=config, allow_pickle=allow_pickle)
        upper = None
        if super_resolution is not None:
            # Its text encoder is not loaded: the cascade's embeddings come from the first stage's (IF's T5).
            upper = load_pipeline(super_resolution, torch_dtype=torch_dtype, skip=("text_encoder",)).to(device)
        return cls(pipe.to(device), upper)

    @property
    def defaults(self) -> ModelDefaults:
        """The settings used where none are given: those the model's folder carries, else its family's."""
        return model_defaults(getattr(self.pipe, "name_or_path", None), self.family.defaults)

    @property
    def identity(self) -> dict:
        if self._identity is None:
            self._identity = model_identity(self.family)
        return self._identity

    def resolution(self, settings: TrainSettings) -> tuple[int, int]:
        """The training (and sampling) size: the model's native one unless the settings name one."""
        return checks.resolution(self.family, settings)

    def check_sampling(self, etas, seeds, settings: SampleSettings | None = None, *, with_photo: bool = False,
                       **options) -> SampleSettings:
        """Stage 3's settings (`settings`, with `options` as SampleSettings fields over it) checked against this
        model before any work; returns them with the model's defaults filled in. `with_photo`: the photo will be
        given, so a strength left out is the model's default start."""
        settings = replace(settings or SampleSettings(), **options)
        return checks.complete_sampling(self.family, self.defaults, etas, seeds, settings, with_photo)

    def precision(self, settings: TrainSettings) -> Precision:
        """How training computes on this model's device for these settings (precision.resolve_precision)."""
        return resolve_precision(settings.precision, self.family.device, self.family.base.denoiser.dtype)

    def photo(self, image: str | os.PathLike | Image.Image, settings: TrainSettings) -> Photo:
        """The photo (a path is loaded) fitted to the training size by the settings' resize rule."""
        source = to_rgb(image if isinstance(image, Image.Image) else load_image(image))
        return Photo.fitted(source, *self.resolution(settings), settings.resize)

    def memory_levers(self, settings: TrainSettings, memory: MemorySettings) -> tuple[TrainSettings, MemorySettings]:
        """The training settings and memory levers a run uses: with a budget (`memory.max_memory`), the cheapest
        levers that the family's measured peak says fit, printed in one line (memory_budget.choose_levers)."""
        if memory.quantized and settings.method != "lora":
            raise SettingsError("a quantized base is for LoRA (--method lora): full fine-tuning trains every weight")
        if memory.max_memory is None:
            return settings, memory
        settings, memory, line = choose_levers(self.family, settings, memory, self.resolution(settings))
        print(line, file=sys.stderr)
        return settings, memory

    def train(self, image: str | os.PathLike | Image.Image, target_text: str, settings: TrainSettings | None = None,
              *, progress: bool = True, callback: StepCallback | None = None,
              should_stop: Callable[[], bool] | None = None, memory: MemorySettings | None = None) -> EditState:
        """Stages 1 and 2 (stages.py): e_opt on the base level, then each level's fine-tuned copy. With no settings,
        the model's defaults. `callback(stage, step, loss)` follows every optimiser step; `should_stop`, asked
        before every step from any thread (a web page's Cancel button), stops training as Ctrl-C does. `memory`:
        the run's memory levers, or a budget that picks them (memory.py; not recorded in the state).

        Raises TrainingDivergedError / TrainingInterrupted carrying `partial_state`: whatever finished before a
        NaN loss, Ctrl-C or `should_stop`, which can still be saved and sampled."""
        settings, memory = self.memory_levers(settings or self.defaults.train_settings(), memory or MemorySettings())
        sharding.check_settings(settings.method)
        if self.family.device.type == "cpu":
            allocator.keep_freed_memory_returned()
        self._cache.clear()  # an earlier edit's sampling copies: freed before this one trains
        photo, family, levers = self.photo(image, settings), self.family, TrainingLevers(memory)
        start = time.perf_counter()
        e_tgt = family.encode_text(target_text)
        for level in family.levels:  # before the VAE may leave memory
            photo.at(level)
        timings = {"encode": time.perf_counter() - start}
        precision = self.precision(settings)
        # One Ctrl-C listener for both stages and the copy between them: a Ctrl-C on stage 1's last step, or while
        # the denoiser is copied, stops training before fine-tuning takes a step.
        with stopped_by_ctrl_c(should_stop) as stop, levers.active(family):
            control = Control(progress, callback, sharding.agreed(stop))
            e_opt, first = stages.optimize_embedding(family, photo, e_tgt, settings, precision, control, levers)
            tuned = (stages.fine_tune(family, photo, e_opt, e_tgt, settings, precision, control, levers)
                     if first.finished else None)
            trained = {name: tuning.finish() for name, tuning in tuned.tunings.items()} if tuned else {}
            if memory.quantized and tuned:  # the copies over the quantized base go before the loaded base is back
                tuned.tunings.clear()
                trained = {name: (weights, None) for name, (weights, _) in trained.items()}
        state = stages.edit_state(family, self.identity, target_text, photo, e_tgt, settings, timings,
                                  {"embedding": first, **(tuned.records if tuned else {})},
                                  tuned.e_opt if tuned else e_opt, {name: weights for name, (weights, _) in trained.items()})
        # What sampling needs to show the edit again anywhere: how the model samples it from its photo.
        state.sampling = self.check_sampling(self.defaults.etas, [0], with_photo=True).to_dict()
        state.super_resolution = self.super_resolution
        if trained and not memory.quantized:  # else sampled over the loaded base, as the saved state would be
            self._cache.keep(state, {name: model for name, (_, model) in trained.items()})
        stages.raise_if_stopped(state)
        return state

    def sample(self, state: EditState, etas: list[float] | tuple[float, ...] | None = None,
               seeds: list[int] | tuple[int, ...] = (0,), settings: SampleSettings | None = None, *,
               image: str | os.PathLike | Image.Image | None = None, progress: bool = True,
               callback_on_step_end: Callable | None = None, **options) -> "SampleOutput":
        """Stage 3 (stages.sample) at each eta and seed. `settings` (SampleSettings) says how; `options` are its
        fields as keywords, over it (`sample(state, [0.7], num_inference_steps=50)`); without it, as the edit was
        shown (the state's `sampling`). Fields left None and etas left out are the model's defaults
        (`self.defaults`). `image`: the photo the state was trained on (by default the one it carries), for a
        start from the photo (a strength below 1; left out, the model's default strength where the photo is at
        hand, else noise) or from its inversion (`invert=True`), and for a `mask` (the photo is kept outside it).
        `callback_on_step_end` is passed to the diffusers pipeline (same signature as there)."""
        etas = self.defaults.etas if etas is None else etas
        lacks_photo = image is None and not state.photo
        image = state.photo_image if image is None else image
        settings = self.check_sampling(etas, seeds, (settings or SampleSettings.as_recorded(state.sampling)).overridden(options),
                                       with_photo=image is not None)
        etas, seeds = [float(e) for e in etas], [int(s) for s in seeds]
        self.check_state(state)
        photo = self._sampling_start(state, image, settings.needs_photo)
        with warnings.catch_warnings():  # a text longer than the encoder reads was reported when it trained
            warnings.simplefilter("ignore")
            check_fits(state, self.family.encode_text(state.target_text), self._state_size(state))
        if lacks_photo:
            warnings.warn("this edit state carries no photo (it was saved by an imagic before state version 4): it "
                          "samples from noise unless you pass the photo it was trained on (--image)", stacklevel=2)
        models = self._cache.denoisers(state, settings.forget)
        mask = self._cache.mask(state, settings, photo, models) if settings.masked else None
        images = stages.sample(self.family, models, state, etas, seeds, settings, photo, Control(progress),
                               callback_on_step_end, mask)
        size = next(iter(images.values())).size
        return SampleOutput(images, etas, seeds, None if mask is None else masks.picture(mask[0], size[1], size[0]))

    def _sampling_start(self, state: EditState, image, needed: bool) -> Image.Image | None:
        """The photo, fitted as in training and checked to be the one trained on; None where none is given."""
        if image is None:
            if needed:
                raise SettingsError("starting from the photo (strength below 1, or invert) or a mask needs the photo: "
                                    "pass image")
            return None
        source = to_rgb(image if isinstance(image, Image.Image) else load_image(image))
        photo = Photo.fitted(source, state.height, state.width, state.settings.resize)
        if photo.sha256 != state.image_sha256:
            raise SettingsError("that image is not the photo this edit was trained on: pass the same photo")
        return photo.image

    def check_state(self, state: EditState) -> None:
        """Refuse a state of other levels or of another base model, in one line naming what differs."""
        levels = [level.name for level in self.family.levels]
        if state.levels != levels:
            raise StateMismatchError(f"this edit state was trained on the levels {', '.join(state.levels)}, this model "
                                     f"has {', '.join(levels)}: load the model it was trained on, with the same "
                                     "super-resolution stage (--super-resolution) or none")
        names = {name: list(c.state_dict()) for name, c in self.family.components.items()
                 if isinstance(c, torch.nn.Module)}
        check_same_model(state.base_model, self.identity, names)

    def _state_size(self, state: EditState) -> tuple[int, int]:
        try:
            return self.resolution(state.settings)
        except SettingsError as error:
            raise StateMismatchError(f"the edit state's settings do not fit this model: {error}") from None
