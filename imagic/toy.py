"""Tiny pipelines of every supported family built from configs: the real code paths at toy size.

Untrained (random weights): for tests, the plumbing demo and smoke benchmarks, never for
real edits. `python -m imagic.toy FOLDER` writes one as a diffusers folder.
"""

import argparse
import json
import string
import tempfile
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DDPMScheduler,
    DiffusionPipeline,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    IFPipeline,
    IFSuperResolutionPipeline,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
    T5Tokenizer,
)

WORDS = ["a", "photo", "of", "dog", "cat", "sitting", "standing", "red", "blue", "person", "the"]


def write_tiny_tokenizer(folder: Path, words: list[str] = WORDS) -> Path:
    """A CLIP BPE tokenizer whose vocabulary is letters plus whole `words`: any lowercase word still tokenizes."""
    folder.mkdir(parents=True, exist_ok=True)
    tokens = ["<|startoftext|>", "<|endoftext|>"]
    tokens += list(string.ascii_lowercase) + [c + "</w>" for c in string.ascii_lowercase]
    merges = []
    for word in words:
        # Merge left to right so each listed word becomes one token.
        piece = word[0]
        for i, char in enumerate(word[1:], start=1):
            right = char + ("</w>" if i == len(word) - 1 else "")
            merges.append(f"{piece} {right}")
            piece += right
            tokens.append(piece)
    vocab = {token: i for i, token in enumerate(dict.fromkeys(tokens))}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(dict.fromkeys(merges)) + "\n")
    return folder


def tiny_tokenizer(folder: Path, words: list[str] = WORDS) -> CLIPTokenizer:
    write_tiny_tokenizer(folder, words)
    return CLIPTokenizer(
        str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77,
        unk_token="<|endoftext|>", pad_token="<|endoftext|>",
    )


def sd_scheduler(prediction_type: str = "epsilon") -> DDIMScheduler:
    """DDIM with Stable Diffusion 1.x/2.x's noise schedule."""
    return DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
        set_alpha_to_one=False, steps_offset=1, prediction_type=prediction_type,
    )


def build_tiny_pipeline(kind: str, tokenizer_folder: Path, seed: int = 0) -> DiffusionPipeline:
    """kind "sd1": epsilon, VAE factor 2, 32 px; kind "sd2": v-prediction, VAE factor 4, 32 px; kind "sdxl":
    SDXL's two text encoders, pooled embedding and size/crop conditioning, VAE factor 2, 32 px; kind "if" and
    "if-ii": DeepFloyd IF's stage I (16 px) and stage II (16 -> 64 px), T5, learned variance; kind "sd3": SD3's
    three text encoders and MMDiT, flow matching, 32 px; kind "flux": FLUX's CLIP and T5, packed latents, guidance
    as an input, flow matching, 32 px."""
    torch.manual_seed(seed)
    if kind == "sdxl":
        return _tiny_sdxl(tokenizer_folder)
    if kind in ("sd3", "flux"):
        return _tiny_flow(kind, tokenizer_folder)
    if kind in ("if", "if-ii"):
        return _tiny_if(kind == "if-ii")
    tokenizer = tiny_tokenizer(tokenizer_folder)
    sd2 = kind == "sd2"
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_attention_heads=4,
        num_hidden_layers=2, max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1,
        hidden_act="gelu" if sd2 else "quick_gelu", projection_dim=32,
    ))
    vae_blocks = 3 if sd2 else 2
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=[16] * vae_blocks,
        down_block_types=["DownEncoderBlock2D"] * vae_blocks, up_block_types=["UpDecoderBlock2D"] * vae_blocks,
        layers_per_block=1, norm_num_groups=8, sample_size=32,
    )
    unet = UNet2DConditionModel(
        sample_size=32 // 2 ** (vae_blocks - 1), in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(16, 32), norm_num_groups=8,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=(2, 4) if sd2 else 4, use_linear_projection=sd2,
    )
    scheduler = sd_scheduler("v_prediction" if sd2 else "epsilon")
    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def _tiny_text_config(vocab_size: int) -> CLIPTextConfig:
    return CLIPTextConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=37, num_attention_heads=4,
                          num_hidden_layers=2, max_position_embeddings=77, bos_token_id=0, eos_token_id=1,
                          pad_token_id=1, hidden_act="gelu", projection_dim=32)


def _tiny_sdxl(tokenizer_folder: Path) -> StableDiffusionXLPipeline:
    tokenizer = tiny_tokenizer(tokenizer_folder)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=[16, 16],
        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
        layers_per_block=1, norm_num_groups=8, sample_size=32, force_upcast=True,
    )
    # Cross-attention reads both encoders' tokens side by side (32 + 32); the added embedding reads the
    # pooled text (32) and six size/crop ids of 8 each.
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        norm_num_groups=8, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=64, attention_head_dim=(2, 4),
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + 32,
    )
    return StableDiffusionXLPipeline(
        vae=vae, text_encoder=CLIPTextModel(_tiny_text_config(len(tokenizer))),
        text_encoder_2=CLIPTextModelWithProjection(_tiny_text_config(len(tokenizer))), tokenizer=tokenizer,
        tokenizer_2=tokenizer, unet=unet, scheduler=sd_scheduler("epsilon"), force_zeros_for_empty_prompt=True,
    )


def tiny_t5_tokenizer(words: list[str] = WORDS) -> T5Tokenizer:
    """A T5 (unigram) tokenizer whose vocabulary is whole `words` and single letters, built in memory."""
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -3.0)]
    pieces += [("▁" + word, -1.0) for word in words] + [(c, -5.0) for c in string.ascii_lowercase]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=77)


def if_scheduler(**overrides) -> DDPMScheduler:
    """DeepFloyd IF's DDPM schedule: cosine betas, a learned variance range, dynamic thresholding."""
    config = {"beta_schedule": "squaredcos_cap_v2", "variance_type": "learned_range", "thresholding": True,
              "dynamic_thresholding_ratio": 0.95, "sample_max_value": 1.5, "clip_sample": True,
              "clip_sample_range": 1.0, "prediction_type": "epsilon", **overrides}
    return DDPMScheduler(**config)


def _tiny_if_unet(super_resolution: bool) -> UNet2DConditionModel:
    # IF's blocks: ResNet-only down/up blocks and "simple" cross-attention (text keys and values added to the
    # self-attention's), the T5 states projected by the UNet itself, scale-shift time conditioning; stage II
    # reads the upscaled image beside x_t and its noise level as a class label.
    return UNet2DConditionModel(
        sample_size=64 if super_resolution else 16, in_channels=6 if super_resolution else 3, out_channels=6,
        layers_per_block=1, block_out_channels=(16, 32), norm_num_groups=8,
        down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
        mid_block_type="UNetMidBlock2DSimpleCrossAttn",
        up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, encoder_hid_dim=32, encoder_hid_dim_type="text_proj",
        addition_embed_type="text", addition_embed_type_num_heads=2, resnet_time_scale_shift="scale_shift",
        act_fn="gelu", class_embed_type="timestep" if super_resolution else None,
    )


def _tiny_if(super_resolution: bool) -> DiffusionPipeline:
    tokenizer = tiny_t5_tokenizer()
    text_encoder = T5EncoderModel(T5Config(vocab_size=len(tokenizer), d_model=32, d_ff=37, d_kv=8, num_heads=4,
                                           num_layers=2, pad_token_id=0, eos_token_id=1, dropout_rate=0.0))
    unet = _tiny_if_unet(super_resolution)
    shared = {"tokenizer": tokenizer, "text_encoder": text_encoder, "unet": unet, "safety_checker": None,
              "feature_extractor": None, "watermarker": None, "requires_safety_checker": False}
    if super_resolution:
        return IFSuperResolutionPipeline(**shared, scheduler=if_scheduler(sample_max_value=1.0),
                                         image_noising_scheduler=if_scheduler(variance_type="fixed_small"))
    return IFPipeline(**shared, scheduler=if_scheduler())


def _tiny_flow(kind: str, tokenizer_folder: Path) -> DiffusionPipeline:
    """SD3's or FLUX's layout at toy size: a 16-wide VAE of factor 2 with a shift and scale as theirs have, CLIP
    encoders (with projections for SD3's pooled embedding) and a T5 as wide as the transformer reads the text."""
    tokenizer, t5_tokenizer = tiny_tokenizer(tokenizer_folder), tiny_t5_tokenizer()

    def clip(projection: bool) -> CLIPTextModel:
        config = _tiny_text_config(len(tokenizer))
        return CLIPTextModelWithProjection(config) if projection else CLIPTextModel(config)

    def t5(width: int) -> T5EncoderModel:
        return T5EncoderModel(T5Config(vocab_size=len(t5_tokenizer), d_model=width, d_ff=37, d_kv=8, num_heads=4,
                                       num_layers=2, pad_token_id=0, eos_token_id=1, dropout_rate=0.0))

    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=[16, 16],
        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2, layers_per_block=1,
        norm_num_groups=8, sample_size=32, shift_factor=0.06, scaling_factor=1.5, use_quant_conv=False,
        use_post_quant_conv=False,
    )
    if kind == "sd3":
        transformer = SD3Transformer2DModel(  # text: CLIP tokens (32 + 32 wide) padded to T5's 64; pooled 32 + 32
            sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8,
            num_attention_heads=4, joint_attention_dim=64, caption_projection_dim=32, pooled_projection_dim=64,
            pos_embed_max_size=32,
        )
        return StableDiffusion3Pipeline(
            transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
            text_encoder=clip(True), tokenizer=tokenizer, text_encoder_2=clip(True), tokenizer_2=tokenizer,
            text_encoder_3=t5(64), tokenizer_3=t5_tokenizer,
        )
    transformer = FluxTransformer2DModel(  # 2x2-packed latents: 4 x 4 channels; guidance distilled, as in FLUX.1-dev
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(4, 4, 8),
    )
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    return FluxPipeline(transformer=transformer, scheduler=scheduler, vae=vae, text_encoder=clip(False),
                        tokenizer=tokenizer, text_encoder_2=t5(32), tokenizer_2=t5_tokenizer)


def main() -> None:
    parser = argparse.ArgumentParser(description="Write a tiny untrained SD-style pipeline folder.")
    parser.add_argument("folder")
    parser.add_argument("--kind", choices=("sd1", "sd2", "sdxl", "if", "if-ii", "sd3", "flux"), default="sd1")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tokenizer_folder:
        build_tiny_pipeline(args.kind, Path(tokenizer_folder)).save_pretrained(args.folder)
    print(f"wrote a tiny untrained {args.kind} pipeline to '{args.folder}'")


if __name__ == "__main__":
    main()
