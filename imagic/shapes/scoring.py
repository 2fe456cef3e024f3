"""Scoring an edit of the shapes world against its truth.

- success: the classifier reads the target scene's subject, form and colour in the output (the
  asked-for attribute changed, the other named ones kept) and the input's identity (accent and
  build, which no caption names): the same subject, edited;
- named_success: the first part alone, what the world's version 1 scored;
- preservation: PSNR and SSIM between output and input outside both subjects' masks (the
  background, which no caption mentions);
- identity: PSNR and SSIM between output and the ideal edit inside the ideal edit's subject mask
  (the subject as it should look after the edit);
- closeness: PSNR and SSIM between output and the ideal edit, over the whole image.
"""

from PIL import Image

from ..metrics import psnr, ssim
from .cases import EditCase
from .classifier import AttributeClassifier, classify

METRICS = ("success", "named_success", "background_psnr", "background_ssim", "identity_psnr", "identity_ssim",
           "ideal_psnr", "ideal_ssim")
NAMED = ("subject", "form", "colour")
IDENTITY = ("accent", "build")


def score_outputs(case: EditCase, outputs: list[Image.Image], classifier: AttributeClassifier) -> list[dict]:
    """One dict of METRICS (plus what the classifier read) per output image."""
    truth = case.render()
    background = ~truth["subjects"]
    wanted = {key: getattr(case.target, key) for key in NAMED + IDENTITY}
    scores = []
    for image, read in zip(outputs, classify(classifier, outputs)):
        image = image.convert("RGB")
        named = all(read[key] == wanted[key] for key in NAMED)
        scores.append({
            "success": float(named and all(read[key] == wanted[key] for key in IDENTITY)),
            "named_success": float(named),
            "background_psnr": psnr(image, truth["input"], background),
            "background_ssim": ssim(image, truth["input"], background),
            "identity_psnr": psnr(image, truth["ideal"], truth["ideal_subject"]),
            "identity_ssim": ssim(image, truth["ideal"], truth["ideal_subject"]),
            "ideal_psnr": psnr(image, truth["ideal"]),
            "ideal_ssim": ssim(image, truth["ideal"]),
            "read": read,
        })
    return scores
