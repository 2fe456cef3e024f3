"""Trains the built-in shapes model and its classifier, reproducibly, on a CPU.

    python -m imagic.shapes.train                       # all phases, then ships into imagic/shapes/
    python -m imagic.shapes.train --unet-steps 8000     # longer; a stopped run resumes where it was

Phases, each resumed from its own checkpoint in --work:
1. pool: seeded renders with captions and labels, rendered once;
2. classifier: the attribute CNN, with its held-out accuracy on renders and on VAE round trips;
3. vae: the AutoencoderKL, with its held-out PSNR;
4. latents: the pool encoded once; their spread sets the VAE's scaling_factor;
5. denoiser: text encoder and UNet trained together on (latent, caption), the caption dropped
   10% of the time so classifier-free guidance works, with an EMA of the weights, on the shipped
   schedule: v-prediction with zero terminal SNR (rescaled betas). SD 1.x's schedule leaves signal
   in its noisiest step, which on 16x16 latents lets the sampler's noise set an image's overall
   tone, and Imagic could not give a photo back;
6. export and gates: the pipeline is saved (fp16 weights, loaded as fp32), loaded back, and
   text-to-image samples are classified against their captions; the model card records it all.
"""

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm

from ..families import training_target
from ..loading import BUILTIN_FOLDER as MODEL_FOLDER
from ..report import environment
from .classifier import AttributeClassifier, classify, load_classifier, save_classifier
from .model import (
    CLASSIFIER_FILE,
    assemble,
    build_scheduler,
    build_text_encoder,
    build_tokenizer,
    build_unet,
    build_vae,
)
from .world import POSES, labels, random_scene, render

CAPTION_DROPOUT = 0.1
SUBJECT_WEIGHT = 3.0


@dataclass
class Budget:
    pool: int = 24000
    seed: int = 0
    classifier_steps: int = 1000
    vae_steps: int = 2000
    vae_batch: int = 32
    unet_steps: int = 5500
    unet_batch: int = 32
    unet_lr: float = 6e-4
    gate_samples: int = 240
    gate_guidance: float = 4.0
    gate_steps: int = 25


def render_pool(count: int, seed: int) -> dict:
    """`count` scenes from `seed`: uint8 pixels [N, 3, 64, 64], subject masks [N, 1, 64, 64], captions, and the
    labels (LABELS)."""
    rng = np.random.default_rng(seed)
    scenes = [random_scene(rng) for _ in range(count)]
    rendered = [render(scene) for scene in scenes]
    pixels = np.stack([np.asarray(image) for image, _ in rendered]).transpose(0, 3, 1, 2)
    masks = np.stack([mask for _, mask in rendered])[:, None]
    targets = torch.from_numpy(np.array([labels(scene) for scene in scenes]))
    return {"pixels": torch.from_numpy(np.ascontiguousarray(pixels)), "subject": torch.from_numpy(masks),
            "captions": [s.caption for s in scenes], **{name: targets[:, i] for i, name in enumerate(LABELS)}}


def to_unit(pixels: torch.Tensor) -> torch.Tensor:
    return pixels.float() / 127.5 - 1.0


def warmup_cosine(optimizer: torch.optim.Optimizer, steps: int, warmup: int = 100) -> torch.optim.lr_scheduler.LambdaLR:
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def run_steps(name: str, work: Path, steps: int, stateful: dict, step_fn: Callable[[torch.Generator], float],
              seed: int, every: int = 200) -> None:
    """Run `step_fn` until `steps`, checkpointing `stateful` (objects with state_dict) and the generator.

    The seconds spent stepping add up across resumed runs and go to `work/seconds.json`, so the model
    card reports each phase's training time however often it was stopped.
    """
    path = work / f"{name}.ckpt"
    generator = torch.Generator().manual_seed(seed)
    losses: list[float] = []
    seconds = 0.0
    if path.exists():
        saved = torch.load(path, weights_only=True)
        for key, obj in stateful.items():
            obj.load_state_dict(saved[key])
        generator.set_state(saved["generator"])
        losses, seconds = saved["losses"], saved["seconds"]

    def save() -> None:
        torch.save({**{k: o.state_dict() for k, o in stateful.items()}, "generator": generator.get_state(),
                    "losses": losses, "seconds": seconds}, path)
        record = work / "seconds.json"
        timings = json.loads(record.read_text()) if record.exists() else {}
        record.write_text(json.dumps({**timings, name: round(seconds, 1)}, indent=2))

    bar = tqdm(range(len(losses), steps), desc=name, initial=len(losses), total=steps)
    started = time.perf_counter()
    for step in bar:
        losses.append(step_fn(generator))
        bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}")
        if (step + 1) % every == 0:
            seconds += time.perf_counter() - started
            started = time.perf_counter()
            save()
    seconds += time.perf_counter() - started
    save()


def train_classifier(pool: dict, budget: Budget, work: Path) -> AttributeClassifier:
    model = AttributeClassifier()
    optimizer = torch.optim.Adam(model.parameters(), 2e-3)
    schedule = warmup_cosine(optimizer, budget.classifier_steps)

    def step(generator: torch.Generator) -> float:
        index = torch.randint(len(pool["captions"]), (64,), generator=generator)
        pixels = to_unit(pool["pixels"][index])
        # Blur and noise now and then: generated images are softer and noisier than renders.
        if torch.rand((), generator=generator) < 0.5:
            pixels = F.avg_pool2d(pixels, 3, 1, 1)
        pixels = pixels + 0.05 * torch.rand((), generator=generator) * torch.randn(pixels.shape, generator=generator)
        loss = sum(F.cross_entropy(logits, pool[name][index]) for logits, name in zip(model(pixels), LABELS))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        return loss.item()

    model.train()
    run_steps("classifier", work, budget.classifier_steps,
              {"model": model, "optimizer": optimizer, "schedule": schedule}, step, budget.seed + 1)
    return model.eval()


@torch.no_grad()
def classifier_accuracy(model: AttributeClassifier, held_out: dict, vae: AutoencoderKL | None = None) -> dict[str, float]:
    """The share of `held_out` whose every attribute is read right; with `vae`, read after a VAE round trip."""
    read: list[list[torch.Tensor]] = [[] for _ in LABELS]
    for first in range(0, len(held_out["captions"]), 500):
        pixels = to_unit(held_out["pixels"][first : first + 500])
        if vae is not None:
            pixels = vae.decode(vae.encode(pixels).latent_dist.mode()).sample.clamp(-1, 1)
        for column, logits in zip(read, model(pixels)):
            column.append(logits.argmax(1))
    forms, colours, accents, builds = (torch.cat(column) for column in read)
    people = len(POSES)  # FORMS lists the poses first
    return {
        "subject": ((forms < people) == (held_out["form"] < people)).float().mean().item(),
        "pose_or_shape": (forms == held_out["form"]).float().mean().item(),
        "colour": (colours == held_out["colour"]).float().mean().item(),
        "accent": (accents == held_out["accent"]).float().mean().item(),
        "build": (builds == held_out["build"]).float().mean().item(),
    }


def train_vae(pool: dict, budget: Budget, work: Path) -> AutoencoderKL:
    vae = build_vae()
    optimizer = torch.optim.Adam(vae.parameters(), 2e-3)
    schedule = warmup_cosine(optimizer, budget.vae_steps)

    def step(generator: torch.Generator) -> float:
        index = torch.randint(len(pool["captions"]), (budget.vae_batch,), generator=generator)
        pixels = to_unit(pool["pixels"][index])
        posterior = vae.encode(pixels).latent_dist
        latents = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator)
        reconstruction = vae.decode(latents).sample
        # The subject's pixels count SUBJECT_WEIGHT times: its accent and build are a few pixels wide, and a plain
        # mean spends the small VAE on the background (accent 96%, build 98% after a round trip without it).
        weight = 1 + (SUBJECT_WEIGHT - 1) * pool["subject"][index].float()
        loss = (weight * (reconstruction - pixels) ** 2).mean() + 1e-6 * posterior.kl().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        return loss.item()

    vae.train()
    run_steps("vae", work, budget.vae_steps, {"model": vae, "optimizer": optimizer, "schedule": schedule},
              step, budget.seed + 2)
    return vae.eval()


@torch.no_grad()
def encode_pool(vae, pixels: torch.Tensor) -> torch.Tensor:
    return torch.cat([vae.encode(to_unit(pixels[i : i + 256])).latent_dist.mode() for i in range(0, len(pixels), 256)])


@torch.no_grad()
def vae_psnr(vae, pixels: torch.Tensor) -> float:
    """Mean per-image PSNR of reconstructions through the latents' mean, in dB (images in [0, 255])."""
    values = []
    for first in range(0, len(pixels), 256):
        batch = to_unit(pixels[first : first + 256])
        decoded = vae.decode(vae.encode(batch).latent_dist.mode()).sample.clamp(-1, 1)
        mse = ((decoded - batch) * 127.5).round().pow(2).mean(dim=(1, 2, 3))
        values.append(10 * torch.log10(255.0**2 / mse.clamp_min(1e-8)))
    return torch.cat(values).mean().item()


def train_denoiser(latents: torch.Tensor, captions: list[str], tokenizer, text_encoder, unet, budget: Budget,
                   work: Path) -> None:
    """Train text encoder and UNet together on the shipped schedule; they end holding the EMA weights."""
    def token_ids(texts: list[str]) -> torch.Tensor:
        return tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                         return_tensors="pt").input_ids

    ids, empty = token_ids(captions), token_ids([""])
    unet.to(memory_format=torch.channels_last)  # about 10% faster convolutions on this CPU
    noise_scheduler = DDPMScheduler.from_config(build_scheduler().config)
    params = [*unet.parameters(), *text_encoder.parameters()]
    optimizer = torch.optim.AdamW(params, budget.unet_lr, weight_decay=1e-2)
    schedule = warmup_cosine(optimizer, budget.unet_steps, warmup=200)
    ema = EMAModel(params, decay=0.999, use_ema_warmup=True, power=3 / 4)

    def step(generator: torch.Generator) -> float:
        index = torch.randint(len(captions), (budget.unet_batch,), generator=generator)
        x0 = latents[index]
        batch_ids = ids[index].clone()
        batch_ids[torch.rand(len(index), generator=generator) < CAPTION_DROPOUT] = empty[0]
        noise = torch.randn(x0.shape, generator=generator)
        t = torch.randint(noise_scheduler.config.num_train_timesteps, (len(index),), generator=generator)
        embedding = text_encoder(batch_ids).last_hidden_state
        prediction = unet(noise_scheduler.add_noise(x0, noise, t), t, encoder_hidden_states=embedding).sample
        loss = F.mse_loss(prediction, training_target(noise_scheduler, x0, noise, t))
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        ema.step(params)
        return loss.item()

    unet.train()
    text_encoder.train()
    run_steps("denoiser", work, budget.unet_steps,
              {"unet": unet, "text_encoder": text_encoder, "optimizer": optimizer, "schedule": schedule, "ema": ema},
              step, budget.seed + 3)
    ema.copy_to(params)
    unet.to(memory_format=torch.contiguous_format)


@torch.no_grad()
def generation_gates(pipe: StableDiffusionPipeline, classifier: AttributeClassifier, budget: Budget) -> dict:
    """Text-to-image samples from fresh captions, classified: the share whose attributes match the caption."""
    rng = np.random.default_rng(budget.seed + 1000)
    scenes = [random_scene(rng) for _ in range(budget.gate_samples)]
    pipe.set_progress_bar_config(disable=True)
    predicted = []
    for first in tqdm(range(0, len(scenes), 60), desc="gates"):
        chunk = scenes[first : first + 60]
        images = pipe([s.caption for s in chunk], num_inference_steps=budget.gate_steps,
                      guidance_scale=budget.gate_guidance, height=64, width=64,
                      generator=[torch.Generator().manual_seed(first + i) for i in range(len(chunk))]).images
        predicted += classify(classifier, images)
    hits = {key: [p[key] == getattr(s, key) for p, s in zip(predicted, scenes)]
            for key in ("subject", "form", "colour")}  # what the caption names; identity is left to chance
    return {"samples": len(scenes), "guidance_scale": budget.gate_guidance, "steps": budget.gate_steps,
            "subject": float(np.mean(hits["subject"])), "pose_or_shape": float(np.mean(hits["form"])),
            "colour": float(np.mean(hits["colour"]))}


PHASES = ("pool", "classifier", "vae", "latents", "denoiser", "gates")  # the card's order
LABELS = ("form", "colour", "accent", "build")  # world.labels' order
GATES = {"classifier_accuracy": 0.98, "generation": 0.90, "vae_psnr_db": 26.0}


def write_model_card(out: Path, card: dict) -> None:
    """card.json with every figure, and README.md: the same for people, each gate with its result."""
    (out / "card.json").write_text(json.dumps(card, indent=2) + "\n")
    budget, seconds = card["budget"], card["seconds"]
    accuracy, generation = card["classifier_accuracy"], card["generation"]

    def gate(value: float, bound: float, unit: str = "%") -> str:
        shown = f"{100 * value:.1f}%" if unit == "%" else f"{value:.2f} dB"
        return f"{shown} ({'meets' if value >= bound else 'MISSES'} the gate of {bound * 100 if unit == '%' else bound:g}{unit})"

    round_trip = card["classifier_accuracy_vae"]
    named = {"subject": "subject", "pose_or_shape": "pose or shape", "colour": "colour"}
    rows = [f"| {name} | {gate(accuracy[key], GATES['classifier_accuracy'])} | "
            f"{gate(round_trip[key], GATES['classifier_accuracy'])} | "
            + (f"{gate(generation[key], GATES['generation'])} |" if key in named else "not named: no gate |")
            for key, name in {**named, "accent": "accent (identity)", "build": "build (identity)"}.items()]
    params = card["parameters"]
    scaling = json.loads((out / "vae" / "config.json").read_text())["scaling_factor"]
    lines = [
        "# The built-in shapes model",
        "",
        "A Stable Diffusion 1.x pipeline at toy size (diffusers `StableDiffusionPipeline`: AutoencoderKL, "
        "UNet2DConditionModel with cross-attention, CLIPTextModel and CLIPTokenizer, DDIM), "
        "trained on renders of the shapes world, version 2 (`imagic/shapes/world.py`). Weights are stored in fp16 "
        "and loaded as fp32. Made by `python -m imagic.shapes.train`; every figure here is from that run's "
        "`card.json`.",
        "",
        f"- Images 64x64; latents 16x16x4 (VAE scaling factor {scaling:.4f}: the latents' spread).",
        f"- Parameters: UNet {params['unet'] / 1e6:.2f}M, VAE {params['vae'] / 1e6:.2f}M, "
        f"text encoder {params['text_encoder'] / 1e6:.2f}M.",
        f"- Data: {budget['pool']} seeded renders (seed {budget['seed']}), rendered once; held-out sets from other seeds.",
        f"- Training: classifier {budget['classifier_steps']} steps; VAE {budget['vae_steps']} steps of "
        f"{budget['vae_batch']} (the subject's pixels weighted {SUBJECT_WEIGHT:g}x in its loss); UNet and text encoder "
        f"together {budget['unet_steps']} steps of {budget['unet_batch']} "
        f"(AdamW, lr {budget['unet_lr']:g}, caption dropout 10%, EMA) on the shipped schedule: v-prediction with "
        "zero terminal SNR (rescaled betas, trailing timesteps when sampling). SD 1.x's schedule keeps signal in its "
        "noisiest step; on 16x16 latents the sampler's starting noise then sets an image's overall tone, which "
        "Imagic's fine-tuning cannot undo (docs/benchmarks.md measures both schedules on the world's version 1).",
        "- Wall time per phase on " + card["environment"]["device"] + ": "
        + ", ".join(f"{phase} {value / 60:.1f} min" for phase, value in seconds.items())
        + (f" ({card['seconds_note']})" if "seconds_note" in card else "") + ".",
        "",
        "## Gates",
        "",
        f"VAE reconstruction of 500 held-out renders: {gate(card['vae_psnr_db'], GATES['vae_psnr_db'], ' dB')} "
        "mean PSNR.",
        "",
        "Attribute accuracy. Classifier: on 2000 held-out renders, and on the same renders after a round trip "
        f"through the VAE. Generation: {generation['samples']} text-to-image samples from fresh captions "
        f"({generation['steps']} DDIM steps, guidance {generation['guidance_scale']:g}), classified by the shipped "
        "classifier and compared with the caption (the identity is not in the caption, so it is not gated there).",
        "",
        "| attribute | classifier on renders | on VAE round trips | generations |",
        "| --- | --- | --- | --- |",
        *rows,
        "",
    ]
    (out / "README.md").write_text("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", default=".cache/shapes-train", help="checkpoints and the rendered pool")
    parser.add_argument("--out", default=str(MODEL_FOLDER), help="where the pipeline folder is written")
    parser.add_argument("--classifier-out", default=str(CLASSIFIER_FILE))
    for name, value in asdict(Budget()).items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)
    args = parser.parse_args()
    budget = Budget(**{name: getattr(args, name) for name in asdict(Budget())})
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(budget.seed)
    card: dict = {"budget": asdict(budget), "seconds": {}, "environment": environment(torch.device("cpu"))}

    def timed(phase: str, fn: Callable):
        start = time.perf_counter()
        result = fn()
        card["seconds"][phase] = round(time.perf_counter() - start, 1)
        return result

    pool = timed("pool", lambda: render_pool(budget.pool, budget.seed))
    held_out = render_pool(2000, budget.seed + 500)

    classifier = train_classifier(pool, budget, work)
    card["classifier_accuracy"] = classifier_accuracy(classifier, held_out)

    vae = train_vae(pool, budget, work)
    card["classifier_accuracy_vae"] = classifier_accuracy(classifier, held_out, vae)
    latents = timed("latents", lambda: encode_pool(vae, pool["pixels"]))
    vae.register_to_config(scaling_factor=float(1.0 / latents.std()))
    latents = latents * vae.config.scaling_factor

    tokenizer = build_tokenizer(work / "tokenizer")
    text_encoder, unet = build_text_encoder(len(tokenizer)), build_unet()
    train_denoiser(latents, pool["captions"], tokenizer, text_encoder, unet, budget, work)
    card["seconds"].update(json.loads((work / "seconds.json").read_text()))

    out = Path(args.out)
    assemble(vae, text_encoder, tokenizer, unet).to(torch.float16).save_pretrained(out)
    save_classifier(classifier, Path(args.classifier_out))
    shipped = StableDiffusionPipeline.from_pretrained(out, torch_dtype=torch.float32)
    card["vae_psnr_db"] = vae_psnr(shipped.vae, held_out["pixels"][:500])
    card["generation"] = timed("gates", lambda: generation_gates(shipped, load_classifier(Path(args.classifier_out)),
                                                                 budget))
    card["seconds"] = {phase: card["seconds"][phase] for phase in PHASES}
    card["parameters"] = {name: sum(p.numel() for p in getattr(shipped, name).parameters())
                          for name in ("unet", "vae", "text_encoder")}
    write_model_card(out, card)
    print(json.dumps(card, indent=2))


if __name__ == "__main__":
    main()
