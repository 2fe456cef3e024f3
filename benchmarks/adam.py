"""Fine-tuning steps with imagic's fused Adam against torch's default Adam, side by side in one run.

    python benchmarks/adam.py                          # SD 1.5's UNet (random weights), 256x256, on the CPU
    python benchmarks/adam.py --arch shapes            # the built-in model's UNet, at its 64x64
    python benchmarks/adam.py --device cuda --dtype bf16

imagic's stages ask torch for its fused Adam (`imagic.optimisation.make_optimizer`); left to itself, torch steps
Adam with a Python loop over the weights on the CPU and with its foreach kernels on CUDA. Each
implementation trains the same denoiser for `--steps` full fine-tuning steps (forward, backward and
optimiser step, with random latents and text embeddings: speed does not depend on the values); the first
step allocates Adam's state and is not timed. Printed: the median optimiser step and the median whole
step, for both and as a ratio.
"""

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from architectures import build_sd15_unet_pipeline  # benchmarks/architectures.py, beside this script
from stages import device_clock

from imagic.optimisation import make_optimizer
from imagic.settings import StageSettings

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def build_denoiser(arch: str) -> tuple[torch.nn.Module, int]:
    """The UNet to fine-tune and its latent size: SD 1.5's at 256x256 pixels, or the built-in model's."""
    if arch == "shapes":
        from diffusers import UNet2DConditionModel

        from imagic.loading import BUILTIN_FOLDER

        unet = UNet2DConditionModel.from_pretrained(BUILTIN_FOLDER, subfolder="unet")
        return unet, unet.config.sample_size
    with tempfile.TemporaryDirectory() as tokenizer_folder:
        return build_sd15_unet_pipeline(Path(tokenizer_folder)).unet, 256 // 8


def time_steps(denoiser: torch.nn.Module, optimizer: torch.optim.Optimizer, latent_size: int, steps: int,
               device: torch.device, autocast_dtype: torch.dtype) -> dict[str, float]:
    """Median seconds of the optimiser step and of the whole step, over all steps but the first."""
    generator = torch.Generator().manual_seed(0)
    width = denoiser.config.cross_attention_dim
    x_t = torch.randn(1, denoiser.config.in_channels, latent_size, latent_size, generator=generator).to(device)
    text = torch.randn(1, 77, width, generator=generator).to(device)
    target = torch.randn(x_t.shape, generator=generator).to(device)

    def now() -> float:
        return device_clock(device)

    optimiser_s, step_s = [], []
    for _ in range(steps):
        start = now()
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype != torch.float32):
            prediction = denoiser(x_t, torch.tensor([500], device=device), encoder_hidden_states=text).sample
        F.mse_loss(prediction.float(), target).backward()
        before_step = now()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        end = now()
        optimiser_s.append(end - before_step)
        step_s.append(end - start)
    return {"optimiser": statistics.median(optimiser_s[1:]), "step": statistics.median(step_s[1:])}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", choices=("sd15-unet", "shapes"), default="sd15-unet")
    parser.add_argument("--steps", type=int, default=4, help="per implementation; the first is not timed")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=DTYPES, default="fp32", help="autocast dtype; weights stay fp32")
    args = parser.parse_args(argv)
    if args.steps < 2:
        parser.error("--steps must be at least 2: the first step is a warm-up and is not timed")
    device = torch.device(args.device)
    denoiser, latent_size = build_denoiser(args.arch)
    denoiser.to(device).train()
    params = list(denoiser.parameters())
    settings = StageSettings(steps=args.steps, learning_rate=1e-6)
    figures = {}
    # One implementation at a time: two sets of Adam moments for SD 1.5 would not fit in 24 GB beside the model.
    for name, make in (("torch default", lambda: torch.optim.Adam(params, lr=settings.learning_rate)),
                       ("fused", lambda: make_optimizer(params, settings))):
        print(f"measuring {name} ...", file=sys.stderr, flush=True)
        optimizer = make()
        figures[name] = time_steps(denoiser, optimizer, latent_size, args.steps, device, DTYPES[args.dtype])
        del optimizer
    default, fused = figures["torch default"], figures["fused"]
    print(f"{args.arch}, {sum(p.numel() for p in params) / 1e6:.1f}M weights, {latent_size}x{latent_size} latents, "
          f"{device.type}, autocast {args.dtype}, {torch.get_num_threads()} threads; torch {torch.__version__}")
    print(f"{'':28}{'torch default':>14}{'fused':>10}{'fused/default':>15}")
    for key, label in (("optimiser", "Adam step, s"), ("step", "fine-tuning step, s")):
        print(f"{label:28}{default[key]:14.3f}{fused[key]:10.3f}{fused[key] / default[key]:15.2f}")


if __name__ == "__main__":
    main()
