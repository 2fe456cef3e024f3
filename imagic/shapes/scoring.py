"""Scoring an edit of the shapes world against its truth.

- success: the classifier reads the target scene's subject, form and colour in the output,
  i.e. the asked-for attribute changed and the others stayed;
- preservation: PSNR and SSIM between output and input outside both subjects' masks (the
  background, which no caption mentions);
- closeness: PSNR and SSIM between output and the ideal edit, over the whole image.
"""

from PIL import Image

from ..metrics import psnr, ssim
from .cases import EditCase
from .classifier import AttributeClassifier, classify

METRICS = ("success", "background_psnr", "background_ssim", "ideal_psnr", "ideal_ssim")


def score_outputs(case: EditCase, outputs: list[Image.Image], classifier: AttributeClassifier) -> list[dict]:
    """One dict of METRICS (plus what the classifier read) per output image."""
    truth = case.render()
    background = ~truth["subjects"]
    wanted = {"subject": case.target.subject, "form": case.target.form, "colour": case.target.colour}
    scores = []
    for image, read in zip(outputs, classify(classifier, outputs)):
        image = image.convert("RGB")
        scores.append({
            "success": float(read == wanted),
            "background_psnr": psnr(image, truth["input"], background),
            "background_ssim": ssim(image, truth["input"], background),
            "ideal_psnr": psnr(image, truth["ideal"]),
            "ideal_ssim": ssim(image, truth["ideal"]),
            "read": read,
        })
    return scores
