"""The quality benchmark's edit cases: seeded, balanced over edit kinds, each with its truth, in two splits.

A case is an input scene, one attribute to change (pose, shape or colour) and the new value.
Its target text is the edited scene's caption (same template as the input's), and its truth
is the edited scene rendered: the ideal output, the same subject (its identity, which the text
never names, kept) with the one attribute changed, plus the subjects' masks.

Two splits: configurations are chosen on the **tuning** split and confirmed on the **confirmation**
split, which no choice looked at. The confirmation split mirrors the tuning split's mix case by case
(the same kind of edit, subject and identity) and draws everything else afresh from its own seed:
the model's prior over identities is far from uniform, so a split with another identity mix would
move every method's success.
"""

from dataclasses import dataclass

import numpy as np
from PIL import Image

from .world import COLOURS, POSES, SHAPES, Scene, edited, random_scene, render

EDIT_KINDS = ("pose", "shape", "colour")
_SUBJECT_FOR_KIND = {"pose": "person", "shape": "shape"}
# The masks keep pixels at least half covered; antialiased edges reach a pixel or two beyond.
MASK_MARGIN = 2


# Each split's seed. The tuning split is the one every earlier figure used; the confirmation split's seed was
# never used to choose anything.
SPLITS = {"tuning": 2210, "confirmation": 20261206}
CASE_COUNT = 102  # per split: 34 of each kind


@dataclass(frozen=True)
class EditCase:
    index: int
    kind: str  # "pose", "shape" or "colour"
    scene: Scene
    target: Scene
    split: str = "tuning"

    @property
    def name(self) -> str:
        return f"{self.index:03d}-{self.kind}"

    @property
    def identity(self) -> str:
        """The identity no caption names, as one label: "cyan stocky"."""
        return f"{self.scene.accent} {self.scene.build}"

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


def edit_cases(split: str = "tuning", count: int = CASE_COUNT) -> list[EditCase]:
    """`count` cases of a split (SPLITS), the kinds taking turns (pose, shape, colour, pose, ...); colour edits
    alternate subjects. The confirmation split's case i has the kind, subject and identity of the tuning
    split's case i; the rest is drawn from its own seed."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}: one of {', '.join(SPLITS)}")
    mirrored = edit_cases("tuning", count) if split != "tuning" else None
    rng = np.random.default_rng(SPLITS[split])
    cases = []
    for index in range(count):
        kind = EDIT_KINDS[index % len(EDIT_KINDS)]
        subject = _SUBJECT_FOR_KIND.get(kind, ("person", "shape")[(index // len(EDIT_KINDS)) % 2])
        identity = None if mirrored is None else (mirrored[index].scene.accent, mirrored[index].scene.build)
        scene = random_scene(rng, subject, identity)
        target = edited(scene, kind, _new_value(kind, scene, rng))
        cases.append(EditCase(index, kind, scene, target, split))
    return cases
