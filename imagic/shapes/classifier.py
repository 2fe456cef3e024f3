"""The shapes world's attribute classifier: its stand-in for CLIP when an edit is scored.

A small CNN with four heads: the form (a pose for a person, else the shape; the subject
follows from it), the colour, and the identity no caption names: the accent colour and the
build. Trained on renders by `imagic.shapes.train`, shipped as
safetensors beside the model.
"""

from pathlib import Path

import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn

from ..image_io import image_to_tensor
from .world import ACCENTS, BUILDS, COLOURS, FORMS, POSES


class AttributeClassifier(nn.Module):
    def __init__(self, width: int = 32):
        super().__init__()
        layers, channels = [], 3
        for out in (width, 2 * width, 4 * width, 4 * width):
            layers += [nn.Conv2d(channels, out, 3, padding=1), nn.BatchNorm2d(out), nn.ReLU(), nn.MaxPool2d(2)]
            channels = out
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.form_head = nn.Linear(channels, len(FORMS))
        self.colour_head = nn.Linear(channels, len(COLOURS))
        self.accent_head = nn.Linear(channels, len(ACCENTS))
        self.build_head = nn.Linear(channels, 2)

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Pixels in [-1, 1], [N, 3, H, W] -> logits of (form, colour, accent, build), in world.labels' order."""
        features = self.features(pixels)
        return tuple(head(features) for head in (self.form_head, self.colour_head, self.accent_head, self.build_head))


def images_to_batch(images: list[Image.Image]) -> torch.Tensor:
    return torch.cat([image_to_tensor(image) for image in images])


def save_classifier(model: AttributeClassifier, path: Path) -> None:
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))


def load_classifier(path: Path) -> AttributeClassifier:
    model = AttributeClassifier()
    model.load_state_dict(load_file(str(path)))
    return model.eval()


@torch.no_grad()
def classify(model: AttributeClassifier, images: list[Image.Image]) -> list[dict[str, str]]:
    """Each image's attributes: subject ("person"/"shape"), form (pose or shape), colour, accent and build."""
    indices = [logits.argmax(1).tolist() for logits in model(images_to_batch(images))]
    read = []
    for form, colour, accent, build in zip(*indices):
        subject = "person" if FORMS[form] in POSES else "shape"
        read.append({"subject": subject, "form": FORMS[form], "colour": list(COLOURS)[colour],
                     "accent": list(ACCENTS)[accent], "build": BUILDS[subject][build]})
    return read
