"""Forgedit's forgetting (Zhang et al., 2023): at sampling, part of an edit's trained weights set back to the base
model's. Which tensors a group holds depends on the denoiser's layer names, so each family's level names its own
groups; these builders serve the UNets and the MMDiT transformers.

A group is a predicate over a trained tensor's name (a LoRA matrix or a full state dict entry): True where the
tensor is set back. Forgedit finds that a UNet's encoder learns the photo's layout and its decoder its appearance,
so forgetting the encoder frees the pose while the look is kept.
"""

from typing import Callable

ForgetGroups = dict[str, Callable[[str], bool]]

# A UNet's input side: the image and conditioning embeddings, the down blocks and the middle block.
_UNET_ENCODER = ("conv_in.", "time_embedding.", "add_embedding.", "encoder_hid_proj.", "down_blocks.", "mid_block.")


def unet_groups(text_keys_values: tuple[str, ...]) -> ForgetGroups:
    """`encoder` (the input side), `decoder` (the rest) and `all-but-encoder-kv` (everything but the down blocks'
    projections of the text into keys and values, named by `text_keys_values`: how the text is read there)."""

    def encoder(name: str) -> bool:
        return name.startswith(_UNET_ENCODER)

    def all_but_encoder_kv(name: str) -> bool:
        return not (name.startswith("down_blocks.") and any(part in name for part in text_keys_values))

    return {"encoder": encoder, "decoder": lambda name: not encoder(name), "all-but-encoder-kv": all_but_encoder_kv}


def transformer_groups(text_keys_values: tuple[str, ...]) -> ForgetGroups:
    """An MMDiT has no encoder and decoder: `all-but-text-kv` keeps only the joint blocks' projections of the text
    stream into keys and values (`text_keys_values`), the transformer's counterpart of `all-but-encoder-kv`."""
    return {"all-but-text-kv": lambda name: not any(part in name for part in text_keys_values)}
