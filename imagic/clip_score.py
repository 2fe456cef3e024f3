"""CLIP scores for real-model edits: how well an output matches its target text, and its input.

- text score: 100 * cos(CLIP image embedding, CLIP text embedding), floored at 0 (CLIPScore's
  convention, without its 2.5 weight);
- fidelity: cos(CLIP image embedding of the output, of the input), 1 for the same image.

Loads any local CLIP folder saved by transformers (e.g. openai/clip-vit-large-patch14).
"""

import os

import torch
from PIL import Image
from transformers import CLIPModel, CLIPProcessor

from .errors import ModelLoadError


class ClipScorer:
    def __init__(self, folder: str | os.PathLike, device: str | torch.device = "cpu"):
        try:
            self.model = CLIPModel.from_pretrained(folder).to(device).eval()
            self.processor = CLIPProcessor.from_pretrained(folder)
        except (OSError, ValueError) as error:
            raise ModelLoadError(
                f"cannot load a CLIP model from '{folder}': give a folder with a transformers CLIP model and processor "
                f"({str(error).splitlines()[0]})"
            ) from None
        self.device = torch.device(device)

    @torch.no_grad()
    def _image_features(self, images: list[Image.Image]) -> torch.Tensor:
        pixels = self.processor(images=[i.convert("RGB") for i in images], return_tensors="pt")["pixel_values"]
        features = self.model.get_image_features(pixel_values=pixels.to(self.device))
        return torch.nn.functional.normalize(_tensor(features), dim=-1)

    @torch.no_grad()
    def _text_features(self, texts: list[str]) -> torch.Tensor:
        tokens = self.processor(text=texts, return_tensors="pt", padding=True, truncation=True)
        features = self.model.get_text_features(input_ids=tokens["input_ids"].to(self.device),
                                                attention_mask=tokens["attention_mask"].to(self.device))
        return torch.nn.functional.normalize(_tensor(features), dim=-1)

    def score(self, output: Image.Image, source: Image.Image, text: str) -> dict[str, float]:
        """The output's CLIP text score against `text` and its fidelity to `source` (one image pass for both)."""
        image, original = self._image_features([output, source])
        [text_features] = self._text_features([text])
        return {"clip_text_score": max(0.0, 100.0 * float((image * text_features).sum())),
                "clip_fidelity": float((image * original).sum())}


def _tensor(features) -> torch.Tensor:
    # Newer transformers may return a model output whose pooled embedding is the feature.
    return features if isinstance(features, torch.Tensor) else features.pooler_output
