"""The built-in shapes model: a Stable Diffusion 1.x pipeline at toy size, and where it ships.

The same classes and code path as SD 1.x (AutoencoderKL, a cross-attention UNet, a CLIP text
encoder and tokenizer, DDIM) with v-prediction on a zero-terminal-SNR schedule (Lin et al.,
2023), sized for 64x64 images and 16x16 latents so that it trains on two CPU cores and edits
in seconds. `imagic.shapes.train` trains it.
"""

from pathlib import Path

from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from ..toy import sd_scheduler, tiny_tokenizer
from .world import SIZE, VOCABULARY

PACKAGE_FOLDER = Path(__file__).parent
CLASSIFIER_FILE = PACKAGE_FOLDER / "classifier.safetensors"
TEXT_WIDTH = 64


def build_tokenizer(folder: Path) -> CLIPTokenizer:
    return tiny_tokenizer(folder, VOCABULARY)


def build_vae() -> AutoencoderKL:
    """4x downsampling: 64x64x3 pixels to 16x16x4 latents."""
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32, 64),
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        layers_per_block=1, norm_num_groups=8, sample_size=SIZE,
    )


def build_text_encoder(vocab_size: int) -> CLIPTextModel:
    return CLIPTextModel(CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=TEXT_WIDTH, intermediate_size=2 * TEXT_WIDTH, num_attention_heads=4,
        num_hidden_layers=2, max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1,
        projection_dim=TEXT_WIDTH,
    ))


def build_unet() -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=SIZE // 4, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(64, 128, 128), norm_num_groups=16,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=TEXT_WIDTH, attention_head_dim=8,
    )


def build_scheduler() -> DDIMScheduler:
    """The shipped schedule: no signal left at the last step, so the starting noise carries no image tone."""
    return DDIMScheduler.from_config(sd_scheduler("v_prediction").config, rescale_betas_zero_snr=True,
                                     timestep_spacing="trailing")


def assemble(vae, text_encoder, tokenizer, unet) -> StableDiffusionPipeline:
    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=build_scheduler(),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
