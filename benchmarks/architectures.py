"""Random-weight pipelines at real denoiser sizes, for the speed and memory benchmarks.

Speed does not depend on the weights, so each builder pairs a full-size denoiser with small stand-ins for
the parts that run once per edit (VAE, text encoders). Each builds on `device`, so that billions of
weights are initialised there rather than on the CPU and copied.
"""

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from diffusers import DiffusionPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline

# DeepFloyd IF's stages at their published parameter counts (IF-I-XL 4.3B, IF-II-L 1.2B). Their configs
# were not available here, so the widths are chosen to match the counts (4.43B and 1.19B), with IF's block
# types, T5 width (4096), 64-wide attention heads and scale-shift time conditioning.
IF_STAGE_I_CHANNELS = (704, 1408, 2112, 2816)
IF_STAGE_II_CHANNELS = (160, 320, 640, 960, 1280)
IF_STAGE_II_LAYERS = (2, 2, 3, 5, 5)


def build_sd15_unet_pipeline(tokenizer_folder: Path, device: "torch.device | str" = "cpu") -> "StableDiffusionPipeline":
    """SD 1.5's UNet (random weights), a small 8x VAE and a 1-layer, 768-wide CLIP text encoder."""
    import torch
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from imagic.toy import sd_scheduler, tiny_tokenizer

    torch.manual_seed(0)
    tokenizer = tiny_tokenizer(tokenizer_folder)
    with torch.device(device):
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=768, intermediate_size=3072, num_attention_heads=12,
            num_hidden_layers=1, max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1,
            hidden_act="quick_gelu", projection_dim=768,
        ))
        vae = AutoencoderKL(  # four blocks: three halvings, SD's factor 8
            in_channels=3, out_channels=3, latent_channels=4, block_out_channels=[32] * 4,
            down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
            layers_per_block=1, norm_num_groups=8, sample_size=512,
        )
        unet = UNet2DConditionModel(
            sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
            block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        )
    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=sd_scheduler("epsilon"),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def build_sdxl_unet_pipeline(tokenizer_folder: Path, device: "torch.device | str" = "cpu") -> "StableDiffusionXLPipeline":
    """SDXL base's UNet (random weights), a small 8x VAE and two 1-layer CLIP text encoders of SDXL's widths."""
    import torch
    from diffusers import AutoencoderKL, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from imagic.toy import sd_scheduler, tiny_tokenizer

    torch.manual_seed(0)
    tokenizer = tiny_tokenizer(tokenizer_folder)

    def text_config(width: int, heads: int) -> CLIPTextConfig:
        return CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=width, intermediate_size=4 * width,
                              num_attention_heads=heads, num_hidden_layers=1, max_position_embeddings=77,
                              bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_act="gelu", projection_dim=width)

    with torch.device(device):
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4, block_out_channels=[32] * 4,
            down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
            layers_per_block=1, norm_num_groups=8, sample_size=1024, force_upcast=True,
        )
        unet = UNet2DConditionModel(  # stable-diffusion-xl-base-1.0's UNet config
            sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
            use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816,
        )
        text_encoder, text_encoder_2 = CLIPTextModel(text_config(768, 12)), CLIPTextModelWithProjection(
            text_config(1280, 20))
    return StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer, tokenizer_2=tokenizer,
        unet=unet, scheduler=sd_scheduler("epsilon"), force_zeros_for_empty_prompt=True,
    )


def build_if_sized_pipelines(device: "torch.device | str" = "cpu") -> "tuple[DiffusionPipeline, DiffusionPipeline]":
    """DeepFloyd IF's stage I (64 px) and stage II (256 px) at their parameter counts, sharing a 1-layer T5."""
    import torch
    from diffusers import IFPipeline, IFSuperResolutionPipeline, UNet2DConditionModel
    from transformers import T5Config, T5EncoderModel

    from imagic.families.deepfloyd_if import if_scheduler
    from imagic.toy import tiny_t5_tokenizer

    torch.manual_seed(0)
    tokenizer = tiny_t5_tokenizer()
    shared_blocks = dict(
        out_channels=6, attention_head_dim=64, encoder_hid_dim=4096, encoder_hid_dim_type="text_proj",
        addition_embed_type="text", addition_embed_type_num_heads=64, resnet_time_scale_shift="scale_shift",
        act_fn="gelu", cross_attention_norm="group_norm", mid_block_type="UNetMidBlock2DSimpleCrossAttn",
    )
    with torch.device(device):
        text_encoder = T5EncoderModel(T5Config(vocab_size=len(tokenizer), d_model=4096, d_ff=10240, d_kv=64,
                                               num_heads=64, num_layers=1, pad_token_id=0, eos_token_id=1,
                                               dropout_rate=0.0))
        stage_1 = UNet2DConditionModel(
            sample_size=64, in_channels=3, layers_per_block=3, block_out_channels=IF_STAGE_I_CHANNELS,
            cross_attention_dim=4096,
            down_block_types=("ResnetDownsampleBlock2D",) + ("SimpleCrossAttnDownBlock2D",) * 3,
            up_block_types=("SimpleCrossAttnUpBlock2D",) * 3 + ("ResnetUpsampleBlock2D",), **shared_blocks,
        )
        stage_2 = UNet2DConditionModel(  # the upscaled image beside x_t; its noise level as a class label
            sample_size=256, in_channels=6, layers_per_block=IF_STAGE_II_LAYERS, block_out_channels=IF_STAGE_II_CHANNELS,
            cross_attention_dim=IF_STAGE_II_CHANNELS[-1], class_embed_type="timestep",
            down_block_types=("ResnetDownsampleBlock2D",) * 3 + ("SimpleCrossAttnDownBlock2D",) * 2,
            up_block_types=("SimpleCrossAttnUpBlock2D",) * 2 + ("ResnetUpsampleBlock2D",) * 3, **shared_blocks,
        )
    shared = {"tokenizer": tokenizer, "text_encoder": text_encoder, "safety_checker": None,
              "feature_extractor": None, "watermarker": None, "requires_safety_checker": False}
    return (IFPipeline(**shared, unet=stage_1, scheduler=if_scheduler()),
            IFSuperResolutionPipeline(**shared, unet=stage_2, scheduler=if_scheduler(sample_max_value=1.0),
                                      image_noising_scheduler=if_scheduler(variance_type="fixed_small")))


# stable-diffusion-3.5-medium's transformer (MMDiT-X: dual attention in its first 13 blocks, RMS-normed q and k).
SD35_MEDIUM = dict(
    sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
    num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048,
    pos_embed_max_size=384, dual_attention_layers=tuple(range(13)), qk_norm="rms_norm",
)
# FLUX.1-dev's transformer: 19 joint and 38 single blocks, guidance as an input.
FLUX_1 = dict(
    patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128, num_attention_heads=24,
    joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56),
)


def _flow_vae() -> "torch.nn.Module":
    """A small VAE of SD3's and FLUX's layout: 16 latent channels, factor 8, their shift and scale."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=16, block_out_channels=[32] * 4,
        down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4, layers_per_block=1,
        norm_num_groups=8, sample_size=1024, shift_factor=0.0609, scaling_factor=1.5305, use_quant_conv=False,
        use_post_quant_conv=False,
    )


def _one_layer_text_encoders(tokenizer_folder: Path, clip_widths: tuple[int, ...], projection: bool = True):
    """The tiny CLIP tokenizer, 1-layer CLIP encoders of `clip_widths` (with projections: SD3's pooled embedding;
    without: FLUX's pooler output), a T5 tokenizer and a 1-layer T5 encoder of width 4096."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    from imagic.toy import tiny_t5_tokenizer, tiny_tokenizer

    tokenizer, t5_tokenizer = tiny_tokenizer(tokenizer_folder), tiny_t5_tokenizer()
    clip_class = CLIPTextModelWithProjection if projection else CLIPTextModel
    clips = [clip_class(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=width, intermediate_size=4 * width, num_attention_heads=width // 64,
        num_hidden_layers=1, max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1,
        hidden_act="gelu", projection_dim=width)) for width in clip_widths]
    t5 = T5EncoderModel(T5Config(vocab_size=len(t5_tokenizer), d_model=4096, d_ff=10240, d_kv=64, num_heads=64,
                                 num_layers=1, pad_token_id=0, eos_token_id=1, dropout_rate=0.0))
    return tokenizer, clips, t5_tokenizer, t5


def build_sd35_medium_pipeline(tokenizer_folder: Path, device: "torch.device | str" = "cpu",
                               block_fraction: float = 1.0) -> "DiffusionPipeline":
    """SD 3.5 Medium's transformer (random weights; `block_fraction` of its blocks), a small 16-channel VAE and
    1-layer CLIP-L, CLIP-G and T5 encoders of SD3's widths."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    torch.manual_seed(0)
    config = dict(SD35_MEDIUM, num_layers=max(1, round(SD35_MEDIUM["num_layers"] * block_fraction)))
    config["dual_attention_layers"] = tuple(i for i in SD35_MEDIUM["dual_attention_layers"] if i < config["num_layers"])
    with torch.device(device):
        tokenizer, (clip_l, clip_g), t5_tokenizer, t5 = _one_layer_text_encoders(tokenizer_folder, (768, 1280))
        vae, transformer = _flow_vae(), SD3Transformer2DModel(**config)
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae, text_encoder=clip_l,
        tokenizer=tokenizer, text_encoder_2=clip_g, tokenizer_2=tokenizer, text_encoder_3=t5, tokenizer_3=t5_tokenizer,
    )


def build_flux_pipeline(tokenizer_folder: Path, device: "torch.device | str" = "cpu",
                        block_fraction: float = 1.0) -> "DiffusionPipeline":
    """FLUX.1-dev's transformer (random weights; `block_fraction` of its joint and of its single blocks), a small
    16-channel VAE and 1-layer CLIP-L and T5 encoders of FLUX's widths."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    torch.manual_seed(0)
    config = dict(FLUX_1, num_layers=max(1, round(FLUX_1["num_layers"] * block_fraction)),
                  num_single_layers=max(1, round(FLUX_1["num_single_layers"] * block_fraction)))
    with torch.device(device):
        tokenizer, (clip_l,), t5_tokenizer, t5 = _one_layer_text_encoders(tokenizer_folder, (768,), projection=False)
        vae, transformer = _flow_vae(), FluxTransformer2DModel(**config)
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    return FluxPipeline(transformer=transformer, scheduler=scheduler, vae=vae, text_encoder=clip_l,
                        tokenizer=tokenizer, text_encoder_2=t5, tokenizer_2=t5_tokenizer)
