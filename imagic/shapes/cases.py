"""The quality benchmark's edit cases: seeded, balanced over edit kinds, each with its truth.

A case is an input scene, one attribute to change (pose, shape or colour) and the new value.
Its target text is the edited scene's caption (same template as the input's), and its truth
is the edited scene rendered: the ideal output, the same subject (its identity, which the text
never names, kept) with the one attribute changed, plus the subjects' masks.
"""

from dataclasses import dataclass

import numpy as np
from PIL import Image

from .world import COLOURS, POSES, SHAPES, Scene, edited, random_scene, render

EDIT_KINDS = ("pose", "shape", "colour")
_SUBJECT_FOR_KIND = {"pose": "person", "shape": "shape"}
# The masks keep pixels at least half covered; antialiased edges reach a pixel or two beyond.
MASK_MARGIN = 2


@dataclass(frozen=True)
class EditCase:
    index: int
    kind: str  # "pose", "shape" or "colour"
    scene: Scene
    target: Scene

    @property
    def name(self) -> str:
        return f"{self.index:03d}-{self.kind}"

    @property
    def target_text(self) -> str:
        return self.target.caption

    def render(self) -> dict[str, Image.Image | np.ndarray]:
        """The input image, the ideal edit, both subjects' masks together grown by MASK_MARGIN pixels (what
        preservation leaves out), and the ideal edit's own subject mask (where identity is measured)."""
        image, mask = render(self.scene)
        ideal, ideal_mask = render(self.target)
        return {"input": image, "ideal": ideal, "subjects": _grow(mask | ideal_mask, MASK_MARGIN),
                "ideal_subject": ideal_mask}


def _grow(mask: np.ndarray, pixels: int) -> np.ndarray:
    """Dilate by `pixels` (a square neighbourhood)."""
    padded = np.pad(mask, pixels)
    grown = np.zeros_like(mask)
    for dy in range(2 * pixels + 1):
        for dx in range(2 * pixels + 1):
            grown |= padded[dy : dy + mask.shape[0], dx : dx + mask.shape[1]]
    return grown


def _new_value(kind: str, scene: Scene, rng: np.random.Generator) -> str:
    pool = {"pose": POSES, "shape": SHAPES, "colour": tuple(COLOURS)}[kind]
    current = scene.colour if kind == "colour" else scene.form
    choices = [value for value in pool if value != current]
    return choices[rng.integers(len(choices))]


def edit_cases(count: int = 102, seed: int = 2210) -> list[EditCase]:
    """`count` cases, the kinds taking turns (pose, shape, colour, pose, ...); colour edits alternate subjects."""
    rng = np.random.default_rng(seed)
    cases = []
    for index in range(count):
        kind = EDIT_KINDS[index % len(EDIT_KINDS)]
        subject = _SUBJECT_FOR_KIND.get(kind, ("person", "shape")[(index // len(EDIT_KINDS)) % 2])
        scene = random_scene(rng, subject)
        target = edited(scene, kind, _new_value(kind, scene, rng))
        cases.append(EditCase(index, kind, scene, target))
    return cases
