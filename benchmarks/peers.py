"""Tuning-free peers of Imagic, each run through diffusers' own pipeline on the same loaded model.

    python benchmarks/peers.py                        # every peer on the first 9 cases, one seed: success and PSNR per value
    python benchmarks/peers.py --peer ledits++ --values 2,5,10,20 --cases 6   # another peer's values, fewer cases

A peer is an editor that needs no training: SDEdit (img2img), DiffEdit, Pix2Pix-Zero and LEDITS++. Each
`Peer.edit` builds its diffusers pipeline on the loaded pipeline's own modules (the benchmark loads them in
float32 on the CPU), edits one photo from its source caption to its target caption at every setting of its strength knob
(`Peer.values`, weak edits that keep the photo first, strong edits last) from every seed, and returns the
images by (value, seed), as ImagicEditor.sample does by (eta, seed). Every peer samples with the benchmark's
guidance scale and number of inference steps; each image's random draws come from its own
`torch.Generator().manual_seed(seed)`. What a pipeline installs on the shared UNet (attention processors,
requires_grad flags, gradients) is put back after each edit, so that later methods on the model are unaffected.

The knobs and their values were chosen on this model (see the comment above `PEERS`): on the first 9 cases
from one seed, each set spans an edit too weak to change most cases to one that overdrives the method.
"""

import argparse
import inspect
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from PIL import Image

# The same strengths as quality.STRENGTHS: SDEdit as quality.py has always run it.
SDEDIT_STRENGTHS = (0.3, 0.45, 0.6, 0.75, 0.9)

Edits = dict[tuple[float, int], Image.Image]


def changed_words(source_text: str, target_text: str) -> tuple[str, str]:
    """The word the target caption changes, as (source word, target word): in the shapes world two captions
    differ in exactly one word ("standing" -> "sitting"). Captions that differ otherwise (in more words, or in
    length) give themselves whole."""
    source, target = source_text.split(), target_text.split()
    if len(source) == len(target):
        differing = [(s, t) for s, t in zip(source, target) if s != t]
        if len(differing) == 1:
            return differing[0]
    return source_text, target_text


@contextmanager
def unet_kept(unet: torch.nn.Module) -> Iterator[None]:
    """Restores what Pix2Pix-Zero and LEDITS++ change on the UNet they are given: its attention processors
    (both install their own), its parameters' requires_grad flags and their gradients (Pix2Pix-Zero sets the
    attention layers' flags, and its backward pass leaves gradients on every parameter that requires one)."""
    processors = unet.attn_processors
    flags = {name: p.requires_grad for name, p in unet.named_parameters()}
    grads = {name: p.grad for name, p in unet.named_parameters()}
    try:
        yield
    finally:
        unet.set_attn_processor(processors)
        for name, p in unet.named_parameters():
            p.requires_grad_(flags[name])
            p.grad = grads[name]


def _pipeline(cls, pipe, **components):
    """`cls` on `pipe`'s modules, with a scheduler of its own from the same config (diffusers' schedulers keep
    state between steps) unless `components` give one, with no safety checker and no progress bar."""
    accepted = inspect.signature(cls.__init__).parameters
    components = {k: v for k, v in pipe.components.items() if k in accepted} | {
        "scheduler": type(pipe.scheduler).from_config(pipe.scheduler.config)} | components
    peer = cls(**components, requires_safety_checker=False)
    peer.set_progress_bar_config(disable=True)
    return peer


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def sdedit(pipe, image: Image.Image, source_text: str, target_text: str, seeds: list[int], values, *,
           guidance_scale: float, num_inference_steps: int) -> Edits:
    """SDEdit (Meng et al., 2022): the photo noised to `strength`, then denoised under the target caption;
    every seed in one batch, each image's noise from its own generator."""
    from diffusers import StableDiffusionImg2ImgPipeline

    img2img = _pipeline(StableDiffusionImg2ImgPipeline, pipe)
    edits = {}
    for strength in values:
        images = img2img([target_text] * len(seeds), image=[image] * len(seeds), strength=strength,
                         generator=[_generator(seed) for seed in seeds], guidance_scale=guidance_scale,
                         num_inference_steps=num_inference_steps).images
        edits.update({(strength, seed): edited for seed, edited in zip(seeds, images)})
    return edits


def _inverse_steps(num_inference_steps: int, strength: float) -> int:
    """How many inverted latents DiffEdit's `invert` returns and its `__call__` takes at `strength` (its
    get_inverse_timesteps and get_timesteps)."""
    return min(int(num_inference_steps * strength), num_inference_steps)


def diffedit(pipe, image: Image.Image, source_text: str, target_text: str, seeds: list[int], values, *,
             guidance_scale: float, num_inference_steps: int) -> Edits:
    """DiffEdit (Couairon et al., 2023): a mask where the UNet's predictions under the two captions differ,
    a DDIM inversion of the photo under the source caption to `inpaint_strength`, then DDIM under the target
    caption inside the mask, the inverted latents outside. Per seed, one mask and one inversion to the largest
    strength: a weaker strength's inversion is its last steps (the same latents; eta 0 draws nothing more).

    Both schedulers use leading timestep spacing, not this model's trailing: the pipeline keeps outside the
    mask, after its last step, the first inverted latent, at the smallest timestep, which leading spacing puts
    at 1 (as SD 1.x does) and trailing at 49 of 1000, whose noise stays in the output's background (-1.5 dB of
    background PSNR on 9 cases)."""
    from diffusers import DDIMInverseScheduler, StableDiffusionDiffEditPipeline

    if _inverse_steps(num_inference_steps, min(values)) < 1:
        raise ValueError(f"DiffEdit at inpaint_strength {min(values):g} takes no step of {num_inference_steps}: "
                         "take more steps or a larger strength")
    config = {**pipe.scheduler.config, "timestep_spacing": "leading"}
    editor = _pipeline(StableDiffusionDiffEditPipeline, pipe, scheduler=type(pipe.scheduler).from_config(config),
                       inverse_scheduler=DDIMInverseScheduler.from_config(config))
    sampler = {"guidance_scale": guidance_scale, "num_inference_steps": num_inference_steps}
    edits = {}
    for seed in seeds:
        generator = _generator(seed)  # draws the mask's noise, then the photo's latent
        mask = editor.generate_mask(image=image, source_prompt=source_text, target_prompt=target_text,
                                    generator=generator, **sampler)
        latents = editor.invert(prompt=source_text, image=image, inpaint_strength=max(values), generator=generator,
                                **sampler).latents
        for strength in values:
            steps = _inverse_steps(num_inference_steps, strength)
            [edits[(strength, seed)]] = editor(target_text, mask_image=mask, image_latents=latents[:, -steps:],
                                               inpaint_strength=strength, generator=generator, **sampler).images
    return edits


def pix2pix_zero(pipe, image: Image.Image, source_text: str, target_text: str, seeds: list[int], values, *,
                 guidance_scale: float, num_inference_steps: int) -> Edits:
    """Pix2Pix-Zero (Parmar et al., 2023) on a real photo: a regularised DDIM inversion under the source
    caption (unguided, the pipeline's default), then sampling from it under the source caption's embedding
    moved along the edit direction (target minus source caption embedding), its cross-attention maps pulled
    towards the reconstruction's. The knob scales the edit direction: `target_embeds` is passed as
    source + scale * (target - source), whose difference from the source is the pipeline's direction."""
    from diffusers import DDIMInverseScheduler, StableDiffusionPix2PixZeroPipeline

    editor = _pipeline(StableDiffusionPix2PixZeroPipeline, pipe, caption_generator=None, caption_processor=None,
                       inverse_scheduler=DDIMInverseScheduler.from_config(pipe.scheduler.config))
    source_embeds, target_embeds = editor.get_embeds([source_text]), editor.get_embeds([target_text])
    edits = {}
    for seed in seeds:
        generator = _generator(seed)  # draws the photo's latent and the inversion's regulariser rolls
        latents = editor.invert(source_text, image=image, num_inference_steps=num_inference_steps,
                                generator=generator).latents
        for scale in values:
            [edits[(scale, seed)]] = editor(
                source_text, source_embeds=source_embeds,
                target_embeds=source_embeds + scale * (target_embeds - source_embeds), latents=latents,
                generator=generator, guidance_scale=guidance_scale, num_inference_steps=num_inference_steps).images
    return edits


def ledits_pp(pipe, image: Image.Image, source_text: str, target_text: str, seeds: list[int], values, *,
              guidance_scale: float, num_inference_steps: int) -> Edits:
    """LEDITS++ (Brack et al., 2024): an edit-friendly DDPM inversion of the photo (its noise maps drawn from
    the seed's generator; the photo's latent is the VAE's mode), then sampling with guidance towards the target
    caption's changed word and away from the source caption's, at `edit_guidance_scale` each.

    Two of the pipeline's defaults fail on this model. Its masks (use_intersect_mask=True turns on
    use_cross_attn_mask) read cross-attention maps at a quarter of the latent's size, 4x4 here, where this UNet
    has cross-attention only in its mid block, which LEDITS++ leaves out: no maps, and torch.cat fails on none.
    It keeps a DDIMScheduler it is given, and its DDIM inversion fails (DDIMScheduler.add_noise indexed by a
    float tensor) and would take the UNet's output for epsilon, which this model's v-prediction is not; so it
    runs its DPM-Solver++ SDE path (order 2, as the pipeline builds it), whose scheduler converts the output.
    LEDITS++ has no classifier-free guidance of a prompt (it edits from the unconditional prediction), so
    `guidance_scale` is not used; its inversion forces leading timestep spacing and skips the noisiest 15%."""
    from diffusers import DPMSolverMultistepScheduler, LEditsPPPipelineStableDiffusion

    scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, algorithm_type="sde-dpmsolver++",
                                                        solver_order=2)
    editor = _pipeline(LEditsPPPipelineStableDiffusion, pipe, scheduler=scheduler)
    removed, added = changed_words(source_text, target_text)
    edits = {}
    for seed in seeds:
        editor.invert(image=image, num_inversion_steps=num_inference_steps, generator=_generator(seed))
        for scale in values:
            [edits[(scale, seed)]] = editor(
                editing_prompt=[added, removed], reverse_editing_direction=[False, True], edit_guidance_scale=scale,
                use_cross_attn_mask=False, use_intersect_mask=False).images
    return edits


@dataclass(frozen=True)
class Peer:
    """A tuning-free editor and the settings of its strength knob, weak edits (keeps the photo) to strong."""

    name: str  # "sdedit", "diffedit", "pix2pix-zero", "ledits++"
    knob: str  # what `values` are, e.g. "strength"
    values: tuple[float, ...]
    run: Callable[..., Edits]  # (pipe, image, source_text, target_text, seeds, values, *, guidance_scale, steps)

    def edit(self, pipe, image: Image.Image, source_text: str, target_text: str, seeds: list[int], *,
             guidance_scale: float, num_inference_steps: int, values: tuple[float, ...] | None = None) -> Edits:
        """`image` edited from `source_text` to `target_text` at each of `values` (default: the peer's) from
        each seed: {(value, seed): image}. The loaded pipeline's modules are as they were afterwards."""
        with unet_kept(pipe.unet):
            return self.run(pipe, image, source_text, target_text, list(seeds), tuple(values or self.values),
                            guidance_scale=guidance_scale, num_inference_steps=num_inference_steps)


# The knobs' values, weak edits to strong, chosen on the first 9 cases from one seed at 20 steps and guidance 4
# (`python benchmarks/peers.py`): success (identity kept) / named success / background PSNR at each value, and
# seconds per edit on one torch thread (a seed's mask and inversion shared by its values):
#   sdedit        strength 0.3, 0.45, 0.6, 0.75, 0.9: 11/11/26.8, 56/56/23.8, 56/100/19.8, 22/100/16.9, 11/100/14.4; 0.47 s
#   diffedit      inpaint_strength 0.2, 0.4, 0.6, 0.8, 1.0: 0/0/31.7, 44/56/30.3, 33/78/29.3, 22/100/28.9, 44/78/28.7; 0.78 s
#   pix2pix-zero  direction_scale 0.5, 1, 2, 4: 11/44/19.5, 0/100/19.8, 0/78/17.7, 0/22/14.2; 4.39 s
#   ledits++      edit_guidance_scale 0.5, 1, 2, 3, 5: 0/11/28.5, 0/22/26.7, 22/44/23.1, 22/22/20.9, 0/11/19.7; 1.33 s
# - DiffEdit: 0.2 edits no case, 1.0 inverts all the way; the background stays near the VAE's reconstruction
#   throughout, copied from the inversion outside the mask.
# - Pix2Pix-Zero has no strength knob of its own: its cross-attention guidance (0 to 0.2, at scale 1) changed
#   nothing measurable, so the edit direction is scaled. Its regularised DDIM inversion at 20 steps keeps only
#   ~20 dB of background with no edit at all (scale 0: 0/0/19.5), so no value keeps the photo better, and the
#   identity is lost in every case; 0.5 is the weakest that edits, 4 overdrives it (8: 0/0/12.3).
# - LEDITS++: scale 0 reconstructs the photo (32.2 dB), 0.5 starts to edit, past 3 it overdrives (10 to 40: no
#   case, even named); the pipeline's default, 5, is the strong end.
PEERS = {peer.name: peer for peer in (
    Peer("sdedit", "strength", SDEDIT_STRENGTHS, sdedit),
    Peer("diffedit", "inpaint_strength", (0.2, 0.4, 0.6, 0.8, 1.0), diffedit),
    Peer("pix2pix-zero", "direction_scale", (0.5, 1.0, 2.0), pix2pix_zero),
    Peer("ledits++", "edit_guidance_scale", (0.5, 1.0, 2.0, 3.0, 5.0), ledits_pp),
)}


def _values(spec: str) -> tuple[float, ...]:
    return tuple(float(v) for v in spec.split(","))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--peer", action="append", choices=list(PEERS), help="a peer to run; repeat (default: all)")
    parser.add_argument("--values", type=_values, metavar="V,V,...", help="the knob's values instead (one --peer)")
    parser.add_argument("--cases", type=int, default=9, help="the first N benchmark cases (default: 9)")
    parser.add_argument("--seeds", type=int, default=1, help="seeds per case, as quality.py chooses them (default: 1)")
    parser.add_argument("--steps", type=int, default=20, help="inference steps (default: 20, as quality.py)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default: 1, as quality.py's workers)")
    args = parser.parse_args(argv)
    names = args.peer or list(PEERS)
    if args.values is not None and len(names) != 1:
        parser.error("--values needs exactly one --peer")

    import diffusers
    from quality import BUILT_IN_MODEL, GUIDANCE_SCALE, sampling_seeds

    from imagic.editor import ImagicEditor
    from imagic.shapes.cases import edit_cases
    from imagic.shapes.classifier import load_classifier
    from imagic.shapes.model import CLASSIFIER_FILE
    from imagic.shapes.scoring import score_outputs

    torch.set_num_threads(args.threads)
    diffusers.utils.logging.set_verbosity_error()
    pipe = ImagicEditor.from_pretrained(str(BUILT_IN_MODEL), device="cpu").pipe
    classifier = load_classifier(CLASSIFIER_FILE)
    cases = edit_cases()[:args.cases]
    for name in names:
        peer = PEERS[name]
        values = args.values or peer.values
        scores: dict[float, list[dict]] = {value: [] for value in values}
        seconds = 0.0
        for case in cases:
            seeds = sampling_seeds(case.index, args.seeds)
            start = time.perf_counter()
            edits = peer.edit(pipe, case.render()["input"], case.scene.caption, case.target_text, seeds,
                              guidance_scale=GUIDANCE_SCALE, num_inference_steps=args.steps, values=values)
            seconds += time.perf_counter() - start
            for value in values:
                scores[value].extend(score_outputs(case, [edits[(value, seed)] for seed in seeds], classifier))
        print(f"\n{name}: {len(cases)} cases x {args.seeds} seed(s), {seconds / len(cases) / args.seeds / len(values):.2f} "
              f"s per edit on {args.threads} thread(s)\n| {peer.knob} | success | named | background PSNR |\n|---|---|---|---|")
        for value in values:
            points = scores[value]
            print(f"| {value:g} | {100 * statistics.mean(p['success'] for p in points):.0f}% | "
                  f"{100 * statistics.mean(p['named_success'] for p in points):.0f}% | "
                  f"{statistics.mean(p['background_psnr'] for p in points):.1f} dB |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
