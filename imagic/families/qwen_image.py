"""Qwen-Image: a Qwen2.5-VL text encoder, a causal-3D (video) VAE with per-channel latent statistics, and an MMDiT
over 2x2-packed latents trained by flow matching. One level, the transformer.

The text is the language model's last hidden states after a chat template's head (the pipeline drops its
first 34 tokens), as long as the text itself: Imagic optimises and interpolates those token states, and
their attention mask travels beside them unchanged (`Text.extras`, the pipeline's `prompt_embeds_mask`).
Stage 2 regresses the velocity on the straight path (families/schedules.py), the timestep read as sigma.
Guidance is true classifier-free guidance with a negative pass (the pipeline's `true_cfg_scale`; the model
takes no guidance input), so a negative prompt is taken.
"""

import json
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKLQwenImage,
    FlowMatchEulerDiscreteScheduler,
    QwenImageImg2ImgPipeline,
    QwenImagePipeline,
    QwenImageTransformer2DModel,
)
from tokenizers.pre_tokenizers import ByteLevel
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2Tokenizer

from ..defaults import STABLE_DIFFUSION
from .contract import Embedding, Text
from .sd3 import FlowTransformerLevel, StableDiffusion3Family

# Qwen-Image's published usage: true CFG 4 with a negative prompt, 50 steps; LoRA (its transformer has 20B
# parameters); bf16 on GPUs, as published. Not measured here (no weights).
QWEN_IMAGE_DEFAULTS = STABLE_DIFFUSION.but(method="lora", guidance_scale=4.0, gpu_dtype="bf16")
QWEN_IMAGE_TOKENS = 512  # text states the pipeline reads by default (the prompt, then the template's 5-token tail)
# Both streams' attention (the image's projections and the text's added ones) and both feed-forwards.
QWEN_IMAGE_LORA_TARGETS = (
    "to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
    "img_mlp.net.0.proj", "img_mlp.net.2", "txt_mlp.net.0.proj", "txt_mlp.net.2",
)


class QwenImageLevel(FlowTransformerLevel):
    """Qwen-Image's transformer: latents packed 2x2, the timestep as sigma, the text with its attention mask."""

    lora_targets = QWEN_IMAGE_LORA_TARGETS

    def _statistics(self) -> tuple[torch.Tensor, torch.Tensor]:
        config, vae = self.pipe.vae.config, self.pipe.vae
        shape = (1, config.z_dim, 1, 1, 1)
        mean = torch.tensor(config.latents_mean, device=vae.device).view(shape)
        return mean, torch.tensor(config.latents_std, device=vae.device).view(shape)

    @torch.no_grad()
    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels -> the VAE's normalised latents (the distribution's mean), one frame, [1, z, h, w] fp32."""
        vae = self.pipe.vae
        latents = vae.encode(pixels.to(vae.device, vae.dtype)[:, :, None]).latent_dist.mode()
        mean, std = self._statistics()
        return ((latents.float() - mean) / std)[:, :, 0]

    def pipeline_latents(self, latents: torch.Tensor) -> torch.Tensor:
        return QwenImagePipeline._pack_latents(latents, *latents.shape)

    def predict(self, denoiser: torch.nn.Module, x_t: torch.Tensor, t: torch.Tensor, embedding: Embedding,
                conditions: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        batch, channels, height, width = x_t.shape
        packed = QwenImagePipeline._pack_latents(x_t, batch, channels, height, width)
        velocity = denoiser(hidden_states=packed, timestep=t / 1000, encoder_hidden_states=embedding["prompt_embeds"],
                            encoder_hidden_states_mask=(conditions or {}).get("prompt_embeds_mask"),
                            img_shapes=[[(1, height // 2, width // 2)]] * batch, return_dict=False)[0]
        scale = self.pipe.vae_scale_factor
        return QwenImagePipeline._unpack_latents(velocity, height * scale, width * scale, scale)[:, :, 0]


# The tiny pipeline's tokenizer: byte-level BPE as Qwen2's, its vocabulary all 256 byte symbols (every character
# tokenizes) and one token per word of the chat template, so that the template's head is 34 tokens, as the
# pipeline's `prompt_template_encode_start_idx` expects.
_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                   "<|image_pad|>", "<|video_pad|>"]
_TEMPLATE_WORDS = ["system", "user", "assistant", "Describe", " the", " image", " by", " detailing", " color",
                   " shape", " size", " texture", " quantity", " text", " spatial", " relationships", " of", " objects",
                   " and", " background"]
_PROMPT_WORDS = ["a", "photo", "of", "dog", "cat", "sitting", "standing", "red", "blue", "person", "the"]


def _tiny_tokenizer(folder: Path) -> Qwen2Tokenizer:
    folder.mkdir(parents=True, exist_ok=True)
    to_symbols = ByteLevel(add_prefix_space=False, use_regex=False)
    tokens, merges = sorted(ByteLevel.alphabet()), []
    words = _TEMPLATE_WORDS + _PROMPT_WORDS + [" " + word for word in _PROMPT_WORDS]
    # Words after a space first: their merges must outrank a bare word's first merge ("p h" in " photo").
    for word in sorted(words, key=lambda w: not w.startswith(" ")):
        symbols = "".join(piece for piece, _ in to_symbols.pre_tokenize_str(word))
        piece = symbols[0]
        for char in symbols[1:]:  # left to right, so each word ends as one token
            merges.append(f"{piece} {char}")
            piece += char
            tokens.append(piece)
    vocab = {token: i for i, token in enumerate(dict.fromkeys(tokens + _SPECIAL_TOKENS))}
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(dict.fromkeys(merges)) + "\n")
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "Qwen2Tokenizer", "extra_special_tokens": _SPECIAL_TOKENS[1:], "model_max_length": 32768}))
    return Qwen2Tokenizer.from_pretrained(folder)


def _tiny_qwen_image(tokenizer_folder: Path) -> QwenImagePipeline:
    """Qwen-Image at toy size: a 2-layer, 32-wide Qwen2.5-VL language model (and the 1-block vision tower its class
    always builds), a VAE of factor 2 with 4 latent channels whose statistics are not 0 and 1, and a 2-block MMDiT
    over 2x2-packed latents; Qwen-Image's published schedule. Sides: multiples of 4."""
    tokenizer = _tiny_tokenizer(tokenizer_folder)
    ids = tokenizer.convert_tokens_to_ids
    text_config = {
        "vocab_size": len(tokenizer), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 2048,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [1, 1, 2]},
        "bos_token_id": ids("<|endoftext|>"), "eos_token_id": ids("<|im_end|>"), "pad_token_id": ids("<|endoftext|>")}
    vision_config = {"depth": 1, "hidden_size": 16, "intermediate_size": 16, "num_heads": 2, "out_hidden_size": 32,
                     "fullatt_block_indexes": [0]}
    text_encoder = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(
        text_config=text_config, vision_config=vision_config, image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"), vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"))).eval()
    vae = AutoencoderKLQwenImage(base_dim=8, z_dim=4, dim_mult=[1, 2], num_res_blocks=1, attn_scales=[],
                                 temperal_downsample=[False], latents_mean=[0.1, -0.2, 0.3, -0.1],
                                 latents_std=[1.5, 0.8, 1.2, 2.0])
    transformer = QwenImageTransformer2DModel(patch_size=2, in_channels=16, out_channels=4, num_layers=2,
                                              attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                              guidance_embeds=False, axes_dims_rope=(4, 6, 6))
    scheduler = FlowMatchEulerDiscreteScheduler(
        base_image_seq_len=256, base_shift=0.5, max_image_seq_len=8192, max_shift=0.9, shift=1.0, shift_terminal=0.02,
        time_shift_type="exponential", use_dynamic_shifting=True)
    return QwenImagePipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                             transformer=transformer)


class QwenImageFamily(StableDiffusion3Family):
    """Qwen-Image (QwenImagePipeline), guided by a negative pass."""

    name = "qwen-image"
    defaults = QWEN_IMAGE_DEFAULTS
    image_to_image = QwenImageImg2ImgPipeline
    level_class = QwenImageLevel
    single_file_marker = "txt_norm."  # the RMS norm of the text states: Qwen-Image's alone
    tiny_pipelines = {"qwen-image": _tiny_qwen_image}

    def native_resolution(self) -> tuple[int, int]:
        side = self.pipe.default_sample_size * self.pipe.vae_scale_factor
        return side, side

    def resolution_multiple(self) -> int:
        return self.pipe.vae_scale_factor * 2  # the 2x2 packing

    def _text_window(self) -> tuple:
        # The prompt's own tokens: the pipeline reads QWEN_IMAGE_TOKENS states, the template's 5-token tail among
        # them; the base class keeps window - 1 tokens (for CLIP's and T5's closing token).
        return self.pipe.tokenizer, QWEN_IMAGE_TOKENS - 4

    def _encode_prompt(self, text: str) -> Text:
        prompt_embeds, mask = self.pipe.encode_prompt(text, device=self.device, max_sequence_length=QWEN_IMAGE_TOKENS)
        if mask is None:  # the pipeline leaves out a mask of all ones
            mask = torch.ones(prompt_embeds.shape[:2], dtype=torch.long, device=prompt_embeds.device)
        return Text({"prompt_embeds": prompt_embeds.float()}, {"prompt_embeds_mask": mask})

    def guidance(self, scale: float) -> dict:
        """True classifier-free guidance: the model takes no guidance input."""
        return {"true_cfg_scale": scale, "guidance_scale": None}
