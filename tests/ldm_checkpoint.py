"""Tiny SD pipelines written back in the original LDM (CompVis) single-file checkpoint layout.

Single-file loading converts that layout to diffusers; this is the inverse, enough for the tiny
test pipelines (SD1-style UNet, AutoencoderKL, CLIP text encoder), so tests can round-trip a checkpoint.
"""

import re

import torch
from diffusers import StableDiffusionPipeline

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer.text_model."

UNET_TOP = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _rename_first(rest: str, names: dict[str, str]) -> str:
    """Rename the leading module name of `rest` (e.g. "norm1.weight") by `names`."""
    for new, old in names.items():
        if rest.startswith(new + "."):
            return old + rest[len(new):]
    return rest


def unet_to_ldm(state: dict[str, torch.Tensor], layers_per_block: int) -> dict[str, torch.Tensor]:
    """UNet2DConditionModel keys -> openaimodel keys (input_blocks / middle_block / output_blocks)."""
    step = layers_per_block + 1
    up_with_attention = {int(m[1]) for k in state if (m := re.match(r"up_blocks\.(\d+)\.attentions\.", k))}
    out = {}
    for key, tensor in state.items():
        if m := re.match(r"(down|up)_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
            side, block, kind, layer, rest = m[1], int(m[2]), m[3], int(m[4]), m[5]
            index = 1 + block * step + layer if side == "down" else block * step + layer
            group = "input_blocks" if side == "down" else "output_blocks"
            name = f"{group}.{index}.0.{_rename_first(rest, UNET_RESNET)}" if kind == "resnets" \
                else f"{group}.{index}.1.{rest}"
        elif m := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
            name = f"input_blocks.{1 + int(m[1]) * step + layers_per_block}.0.op.{m[2]}"
        elif m := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.(.+)", key):
            block = int(m[1])
            name = f"output_blocks.{block * step + layers_per_block}.{2 if block in up_with_attention else 1}.{m[2]}"
        elif m := re.match(r"mid_block\.resnets\.(\d+)\.(.+)", key):
            name = f"middle_block.{2 * int(m[1])}.{_rename_first(m[2], UNET_RESNET)}"
        elif m := re.match(r"mid_block\.attentions\.0\.(.+)", key):
            name = f"middle_block.1.{m[1]}"
        else:
            name = _rename_first(key, UNET_TOP)
        out[UNET_PREFIX + name] = tensor
    return out


def vae_to_ldm(state: dict[str, torch.Tensor], num_blocks: int) -> dict[str, torch.Tensor]:
    """AutoencoderKL keys -> taming-style keys; decoder blocks are numbered in reverse there."""
    out = {}
    for key, tensor in state.items():
        name = key.replace("conv_norm_out", "norm_out").replace("conv_shortcut", "nin_shortcut")
        if m := re.match(r"encoder\.down_blocks\.(\d+)\.(resnets|downsamplers)\.(\d+)\.(.+)", name):
            inner = f"block.{m[3]}" if m[2] == "resnets" else "downsample"
            name = f"encoder.down.{m[1]}.{inner}.{m[4]}"
        elif m := re.match(r"decoder\.up_blocks\.(\d+)\.(resnets|upsamplers)\.(\d+)\.(.+)", name):
            inner = f"block.{m[3]}" if m[2] == "resnets" else "upsample"
            name = f"decoder.up.{num_blocks - 1 - int(m[1])}.{inner}.{m[4]}"
        elif m := re.match(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)", name):
            name = f"{m[1]}.mid.block_{int(m[2]) + 1}.{m[3]}"
        elif m := re.match(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)", name):
            name = f"{m[1]}.mid.attn_1.{_rename_first(m[2], VAE_ATTENTION)}"
            if tensor.ndim == 2:  # the original attention projections are 1x1 convolutions
                tensor = tensor[:, :, None, None]
        out[VAE_PREFIX + name] = tensor
    return out


def pipeline_to_ldm(pipe: StableDiffusionPipeline) -> dict[str, torch.Tensor]:
    """One flat state dict holding the UNet, VAE and text encoder as an original SD checkpoint would."""
    state = unet_to_ldm(pipe.unet.state_dict(), pipe.unet.config.layers_per_block)
    state |= vae_to_ldm(pipe.vae.state_dict(), len(pipe.vae.config.down_block_types))
    # transformers >= 5.6 flattens CLIPTextModel; older versions nest it under "text_model.".
    state |= {CLIP_PREFIX + k.removeprefix("text_model."): v for k, v in pipe.text_encoder.state_dict().items()}
    return {k: v.detach().clone().contiguous() for k, v in state.items()}
