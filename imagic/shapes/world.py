"""The shapes world (version 2): seeded scenes with captions, their ideal edits, and the subjects' masks.

A scene is one subject on a textured background. The caption names the subject, its pose
(a stick-figure person: standing, sitting, jumping, lying, the feet on one ground point) or
shape (circle, square, triangle, star), and its colour. Every subject also has an **identity**
that no caption names: an accent colour (a person's head; a shape's inner disc or outline) and
a build (a person slim or stocky; a shape marked with a core or a rim). The classifier reads
identity as it reads the named attributes, so an edit that keeps the pose change but loses
this subject's own look is caught. Everything else (the background's texture and colours, the
subject's position, size and exact line thickness) is detail that no caption mentions.
`edited(scene, attribute, value)` is the truth an edit is scored against: the same scene, same
identity, with one named attribute changed.
"""

import math
from dataclasses import dataclass, replace

import numpy as np
from PIL import Image, ImageChops, ImageDraw

SIZE = 64
SUPERSAMPLE = 4  # drawn at 4x and box-filtered down: smooth edges a small autoencoder can keep

POSES = ("standing", "sitting", "jumping", "lying")
SHAPES = ("circle", "square", "triangle", "star")
FORMS = POSES + SHAPES  # what the classifier's "form" head predicts
COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (40, 70, 230),
    "yellow": (240, 215, 20),
    "purple": (150, 40, 200),
    "orange": (250, 130, 20),
}
# Identity, never named: colours apart from the subject colours and the muted backgrounds. Pink was
# tried as a fourth: after a VAE round trip it read as white one time in ten.
ACCENTS = {
    "white": (245, 245, 245),
    "black": (20, 20, 20),
    "cyan": (0, 215, 225),
}
BUILDS = {"person": ("slim", "stocky"), "shape": ("core", "rim")}  # index 0 or 1: the classifier's build head
BACKGROUNDS = ("stripes", "checks", "dots", "gradient", "blobs")
PERSON_TEMPLATES = ("a photo of a {colour} person {pose}", "a {colour} person {pose}", "a picture of a {colour} person {pose}")
SHAPE_TEMPLATES = ("a photo of a {colour} {shape}", "a {colour} {shape}", "a picture of a {colour} {shape}")
VOCABULARY = sorted(
    {w for t in PERSON_TEMPLATES + SHAPE_TEMPLATES for w in t.split() if not w.startswith("{")}
    | {"person", *POSES, *SHAPES, *COLOURS}
)

# Stick-figure joints in units of the figure's height, x to the right, y down, the ground at y=0; every pose
# has its feet about the same ground point (x=0), so a pose edit keeps where the figure stands.
_LIMBS = (("neck", "hip"), ("hip", "knee_l"), ("knee_l", "foot_l"), ("hip", "knee_r"), ("knee_r", "foot_r"),
          ("shoulder", "elbow_l"), ("elbow_l", "hand_l"), ("shoulder", "elbow_r"), ("elbow_r", "hand_r"))
_POSE_JOINTS = {
    "standing": dict(head=(0, -0.87), neck=(0, -0.74), shoulder=(0, -0.68), hip=(0, -0.42),
                     knee_l=(-0.07, -0.21), foot_l=(-0.14, 0), knee_r=(0.07, -0.21), foot_r=(0.14, 0),
                     elbow_l=(-0.12, -0.53), hand_l=(-0.2, -0.38), elbow_r=(0.12, -0.53), hand_r=(0.2, -0.38)),
    "sitting": dict(head=(-0.27, -0.7), neck=(-0.27, -0.57), shoulder=(-0.27, -0.51), hip=(-0.27, -0.28),
                    knee_l=(0.01, -0.3), foot_l=(0.03, 0), knee_r=(-0.01, -0.26), foot_r=(-0.03, 0),
                    elbow_l=(-0.15, -0.38), hand_l=(0, -0.36), elbow_r=(-0.17, -0.36), hand_r=(-0.03, -0.33)),
    "jumping": dict(head=(0, -0.9), neck=(0, -0.77), shoulder=(0, -0.71), hip=(0, -0.46),
                    knee_l=(-0.2, -0.33), foot_l=(-0.24, -0.12), knee_r=(0.2, -0.33), foot_r=(0.24, -0.12),
                    elbow_l=(-0.17, -0.83), hand_l=(-0.28, -0.97), elbow_r=(0.17, -0.83), hand_r=(0.28, -0.97)),
    # On the back along the ground, feet on the ground point, one knee up, one arm behind the head.
    "lying": dict(head=(-0.8, -0.13), neck=(-0.67, -0.1), shoulder=(-0.62, -0.09), hip=(-0.36, -0.06),
                  knee_l=(-0.17, -0.22), foot_l=(-0.02, 0), knee_r=(-0.18, -0.06), foot_r=(0.03, 0),
                  elbow_l=(-0.5, -0.02), hand_l=(-0.38, 0), elbow_r=(-0.66, -0.25), hand_r=(-0.8, -0.33)),
}
_HEAD_RADIUS = {"slim": 0.11, "stocky": 0.15}
LIMB_WIDTH = {"slim": (2.2, 2.8), "stocky": (4.4, 5.2)}  # limb width in pixels, far apart after a VAE round trip
# Person extents in units of height, over every pose: left, right, up (head and hands).
_REACH_LEFT, _REACH_RIGHT, _REACH_UP = 0.8 + 0.14, 0.3, 1.04
_CORE_RADIUS = 0.35  # of the shape's radius: inside the star's inner corners
_RIM_WIDTH = 0.17  # of the shape's radius: the outline's width, inside the shape


@dataclass(frozen=True)
class Background:
    kind: str
    colours: tuple[tuple[int, int, int], ...]
    angle: float  # stripes, gradient
    period: float  # stripes, checks, dots (pixels at SIZE)
    seed: int  # dots jitter, blobs


@dataclass(frozen=True)
class Scene:
    """One subject on a background. `form` is a pose for a person, the shape otherwise."""

    subject: str  # "person" or "shape"
    form: str
    colour: str
    accent: str  # identity: a person's head, a shape's core or rim (ACCENTS)
    build: str  # identity: BUILDS[subject]
    x: float  # person: the point between the feet on the ground; shape: the centre (pixels at SIZE)
    y: float
    size: float  # person: height; shape: radius
    thickness: float  # person: limb width; shapes ignore it
    rotation: float  # shapes, degrees
    background: Background
    template: int = 0

    @property
    def caption(self) -> str:
        if self.subject == "person":
            return PERSON_TEMPLATES[self.template].format(colour=self.colour, pose=self.form)
        return SHAPE_TEMPLATES[self.template].format(colour=self.colour, shape=self.form)


def _muted_colour(rng: np.random.Generator) -> tuple[int, int, int]:
    """Background colours: low saturation, so no background reads as a subject colour."""
    grey = rng.uniform(50, 215)
    tint = rng.uniform(-1, 1, size=3) * rng.uniform(0, 35)
    return tuple(int(v) for v in np.clip(grey + tint, 0, 255))


def random_background(rng: np.random.Generator) -> Background:
    kind = BACKGROUNDS[rng.integers(len(BACKGROUNDS))]
    count = 4 if kind == "blobs" else 2
    colours = [_muted_colour(rng) for _ in range(count)]
    while abs(sum(colours[0]) - sum(colours[1])) < 60:  # a visible texture, not a flat field
        colours[1] = _muted_colour(rng)
    return Background(kind, tuple(colours), float(rng.uniform(0, 180)), float(rng.uniform(6, 12)),
                      int(rng.integers(2**31)))


def random_scene(rng: np.random.Generator, subject: str | None = None,
                 identity: tuple[str, str] | None = None) -> Scene:
    """A scene with every attribute and detail drawn from `rng`; it fits the frame in any of its forms.
    `identity` (accent, build) sets the identity instead; it is still drawn, so the rest of the scene is the
    same draw either way."""
    subject = subject or ("person" if rng.random() < 0.5 else "shape")
    colour = list(COLOURS)[rng.integers(len(COLOURS))]
    accent = list(ACCENTS)[rng.integers(len(ACCENTS))]
    build = BUILDS[subject][rng.integers(2)]
    if identity is not None:
        accent, build = identity
        if accent not in ACCENTS or build not in BUILDS[subject]:
            raise ValueError(f"{identity} is not an identity of a {subject}")
    template = int(rng.integers(len(PERSON_TEMPLATES)))
    background = random_background(rng)
    if subject == "person":
        height, thickness = rng.uniform(30, 40), rng.uniform(*LIMB_WIDTH[build])
        x = rng.uniform(_REACH_LEFT * height + thickness, SIZE - _REACH_RIGHT * height - thickness)
        y = rng.uniform(_REACH_UP * height + thickness, SIZE - thickness)
        return Scene("person", POSES[rng.integers(len(POSES))], colour, accent, build, float(x), float(y),
                     float(height), float(thickness), 0.0, background, template)
    radius = rng.uniform(11, 17)
    margin = 1.1 * radius + 2  # the star's and triangle's points reach 1.1 radii
    x, y = rng.uniform(margin, SIZE - margin, size=2)
    return Scene("shape", SHAPES[rng.integers(len(SHAPES))], colour, accent, build, float(x), float(y),
                 float(radius), 0.0, float(rng.uniform(-20, 20)), background, template)


def edited(scene: Scene, attribute: str, value: str) -> Scene:
    """The ideal edit: the same scene with `attribute` ("pose", "shape" or "colour") set to `value`."""
    if attribute == "colour" and value in COLOURS:
        return replace(scene, colour=value)
    if attribute == "pose" and scene.subject == "person" and value in POSES:
        return replace(scene, form=value)
    if attribute == "shape" and scene.subject == "shape" and value in SHAPES:
        return replace(scene, form=value)
    raise ValueError(f"cannot set {attribute}={value!r} on a {scene.subject} scene")


def render_background(background: Background) -> np.ndarray:
    """The background as float RGB in [0, 255], SIZE x SIZE."""
    y, x = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32) + 0.5
    c = np.array(background.colours, np.float32)
    theta = math.radians(background.angle)
    along = x * math.cos(theta) + y * math.sin(theta)
    # Edges about a pixel soft: crisp to the eye, within reach of a small autoencoder.
    if background.kind == "stripes":
        weight = _soft_step(np.sin(2 * math.pi * along / (2 * background.period)))
    elif background.kind == "checks":
        wave = np.sin(math.pi * x / background.period) * np.sin(math.pi * y / background.period)
        weight = _soft_step(wave)
    elif background.kind == "dots":
        rng = np.random.default_rng(background.seed)
        p = background.period * 1.3
        jx, jy = rng.uniform(0, p, size=2)
        dx, dy = (x + jx) % p - p / 2, (y + jy) % p - p / 2
        weight = (dx**2 + dy**2 < (0.3 * p) ** 2).astype(np.float32)
    elif background.kind == "gradient":
        weight = (along - along.min()) / (along.max() - along.min())
    else:  # blobs: large soft ellipses in the extra colours over the first
        rng = np.random.default_rng(background.seed)
        image = np.broadcast_to(c[0], (SIZE, SIZE, 3)).copy()
        for colour in c[1:]:
            cx, cy = rng.uniform(0, SIZE, size=2)
            rx, ry = rng.uniform(10, 24, size=2)
            inside = (((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2 < 1)[..., None]
            image = np.where(inside, colour, image)
        return image
    return c[0] * (1 - weight[..., None]) + c[1] * weight[..., None]


def _soft_step(wave: np.ndarray) -> np.ndarray:
    return np.clip(wave * 2.5 + 0.5, 0, 1)


def subject_layers(scene: Scene) -> tuple[np.ndarray, np.ndarray]:
    """How much of each pixel the subject covers, and how much of it is in the accent colour, in [0, 1]."""
    scale = SUPERSAMPLE
    whole = Image.new("L", (SIZE * scale, SIZE * scale), 0)
    accent = Image.new("L", whole.size, 0)
    if scene.subject == "person":
        _draw_person(ImageDraw.Draw(whole), ImageDraw.Draw(accent), scene, scale)
    else:
        _draw_shape(ImageDraw.Draw(whole), ImageDraw.Draw(accent), scene, scale)
    accent = ImageChops.darker(accent, whole)  # the accent lies on the subject only
    return tuple(np.asarray(layer.resize((SIZE, SIZE), Image.Resampling.BOX), np.float32) / 255.0
                 for layer in (whole, accent))


def subject_coverage(scene: Scene) -> np.ndarray:
    """How much of each pixel the subject covers, in [0, 1] (antialiased)."""
    return subject_layers(scene)[0]


def _draw_person(whole: ImageDraw.ImageDraw, accent: ImageDraw.ImageDraw, scene: Scene, scale: int) -> None:
    joints = {name: ((scene.x + jx * scene.size) * scale, (scene.y + jy * scene.size) * scale)
              for name, (jx, jy) in _POSE_JOINTS[scene.form].items()}
    width = scene.thickness * scale
    for a, b in _LIMBS:
        whole.line([joints[a], joints[b]], fill=255, width=round(width))
    for name in ("hip", "knee_l", "knee_r", "elbow_l", "elbow_r", "neck", "foot_l", "foot_r", "hand_l", "hand_r"):
        _disc(whole, joints[name], width / 2)  # round joints and ends
    head = _HEAD_RADIUS[scene.build] * scene.size * scale
    for layer in (whole, accent):
        _disc(layer, joints["head"], head)


def _disc(draw: ImageDraw.ImageDraw, centre: tuple[float, float], radius: float) -> None:
    x, y = centre
    draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=255)


def _draw_shape(whole: ImageDraw.ImageDraw, accent: ImageDraw.ImageDraw, scene: Scene, scale: int) -> None:
    """The shape drawn whole; the accent is a core disc, or a stroke along the outline (cut to the shape by render)."""
    cx, cy, r = scene.x * scale, scene.y * scale, scene.size * scale
    outline = _shape_outline(scene, cx, cy, r)
    whole.polygon(outline, fill=255)
    if scene.build == "core":
        _disc(accent, (cx, cy), _CORE_RADIUS * r)
    elif scene.form == "circle":
        accent.ellipse([cx - r, cy - r, cx + r, cy + r], outline=255, width=round(_RIM_WIDTH * r))
    else:
        accent.line([*outline, outline[0], outline[1]], fill=255, width=round(2 * _RIM_WIDTH * r), joint="curve")


def _shape_outline(scene: Scene, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if scene.form == "circle":
        return [(cx + r * math.cos(2 * math.pi * k / 360), cy + r * math.sin(2 * math.pi * k / 360)) for k in range(360)]
    if scene.form == "square":
        corners = [(45 + 90 * k, r) for k in range(4)]
    elif scene.form == "triangle":
        corners = [(-90 + 120 * k, r * 1.1) for k in range(3)]
    else:  # star: five points, inner radius 45% of the outer
        corners = [(-90 + 36 * k, r * 1.1 if k % 2 == 0 else r * 0.5) for k in range(10)]
    return [(cx + d * math.cos(math.radians(a + scene.rotation)), cy + d * math.sin(math.radians(a + scene.rotation)))
            for a, d in corners]


def render(scene: Scene) -> tuple[Image.Image, np.ndarray]:
    """The scene as a SIZE x SIZE RGB image, and the subject's mask (pixels at least half covered)."""
    coverage, accent = (layer[..., None] for layer in subject_layers(scene))
    subject = np.array(COLOURS[scene.colour], np.float32) * (coverage - accent) + np.array(ACCENTS[scene.accent]) * accent
    pixels = render_background(scene.background) * (1 - coverage) + subject
    image = Image.fromarray(np.clip(pixels + 0.5, 0, 255).astype(np.uint8))
    return image, coverage[..., 0] >= 0.5


def labels(scene: Scene) -> tuple[int, int, int, int]:
    """The classifier's targets: indices of the form (FORMS), colour (COLOURS), accent (ACCENTS) and build."""
    return (FORMS.index(scene.form), list(COLOURS).index(scene.colour), list(ACCENTS).index(scene.accent),
            BUILDS[scene.subject].index(scene.build))
