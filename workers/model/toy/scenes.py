"""Generated scenes with known captions, for the toy captioner (a model whose captions can be right
or wrong, so precision modes can be judged by more than agreement on noise).

A scene is a group of one to three equal shapes (same colour) and one other shape, placed on
either side of the image's midline; the caption names both and where the group is relative to
the single shape (with one shape on each side, the top or left one is named first): "two red
circles above a blue square", "a green triangle left of a yellow circle". Everything is drawn
from a seeded generator: the same seed gives the same images.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np

IMAGE_SIZE = 48
COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 220), "yellow": (235, 200, 30)}
SHAPES = ("circle", "square", "triangle")
COUNTS = ("a", "two", "three")
RELATIONS = ("above", "below", "left of", "right of")
BACKGROUND = (245, 245, 240)
WORDS = [*COUNTS, *COLOURS, *SHAPES, *(s + "s" for s in SHAPES), "above", "below", "left", "right", "of"]


@dataclass(frozen=True)
class Scene:
    count: int  # 1..3 shapes in the group
    colour: str
    shape: str
    relation: str  # where the group is relative to the single shape
    other_colour: str
    other_shape: str

    @property
    def caption(self) -> str:
        group = f"{COUNTS[self.count - 1]} {self.colour} {self.shape}{'s' if self.count > 1 else ''}"
        return f"{group} {self.relation} a {self.other_colour} {self.other_shape}"


def random_scene(rng: np.random.Generator) -> Scene:
    colours = list(COLOURS)
    count = int(rng.integers(1, 4))
    # With one shape on each side either could be named first; naming the top or left one first
    # ("above", "left of") makes the caption a function of the image.
    relations = RELATIONS if count > 1 else ("above", "left of")
    return Scene(
        count=count,
        colour=colours[rng.integers(len(colours))],
        shape=SHAPES[rng.integers(len(SHAPES))],
        relation=relations[rng.integers(len(relations))],
        other_colour=colours[rng.integers(len(colours))],
        other_shape=SHAPES[rng.integers(len(SHAPES))],
    )


def _stamp(image: np.ndarray, shape: str, colour: tuple[int, int, int], cy: float, cx: float, radius: float) -> None:
    size = image.shape[0]
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    dy, dx = y - cy, x - cx
    if shape == "circle":
        mask = dy**2 + dx**2 <= radius**2
    elif shape == "square":
        half = radius * 0.85
        mask = (np.abs(dy) <= half) & (np.abs(dx) <= half)
    else:  # an upward triangle: below the apex, inside both slanted sides
        mask = (dy >= -radius) & (dy <= radius * 0.8) & (np.abs(dx) <= (dy + radius) * 0.62)
    image[mask] = colour


def render(scene: Scene, rng: np.random.Generator, size: int = IMAGE_SIZE) -> np.ndarray:
    """uint8 size×size×3: the group in one half, the single shape in the other, jittered."""
    image = np.empty((size, size, 3), np.uint8)
    image[:] = BACKGROUND
    radius = size * 0.1 * rng.uniform(0.9, 1.1)
    half = size / 2
    # Along the relation's axis the group sits in one half; across it, the shapes spread out.
    group_first = scene.relation in ("above", "left of")
    along = [half * 0.5, half * 1.5] if group_first else [half * 1.5, half * 0.5]
    along = [a + rng.uniform(-2.5, 2.5) for a in along]
    slots = {1: [0.5], 2: [0.28, 0.72], 3: [0.17, 0.5, 0.83]}[scene.count]
    across_group = [size * s + rng.uniform(-1.5, 1.5) for s in slots]
    across_other = size * rng.uniform(0.3, 0.7)
    vertical = scene.relation in ("above", "below")

    def place(a: float, c: float) -> tuple[float, float]:
        return (a, c) if vertical else (c, a)

    for c in across_group:
        _stamp(image, scene.shape, COLOURS[scene.colour], *place(along[0], c), radius)
    _stamp(image, scene.other_shape, COLOURS[scene.other_colour], *place(along[1], across_other), radius * 1.1)
    noise = rng.integers(-12, 13, image.shape)
    return np.clip(image.astype(np.int16) + noise, 0, 255).astype(np.uint8)


def labelled_pngs(n: int, seed: int) -> list[tuple[str, bytes, str]]:
    """n scenes as PNG files: (name, bytes, true caption), named scene-01.png, scene-02.png, …"""
    from PIL import Image

    images, captions = dataset(n, seed)
    out = []
    for i, (image, caption) in enumerate(zip(images, captions, strict=True)):
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="PNG")
        out.append((f"scene-{i + 1:02d}.png", buffer.getvalue(), caption))
    return out


def dataset(n: int, seed: int, size: int = IMAGE_SIZE) -> tuple[np.ndarray, list[str]]:
    """n images (uint8 n×size×size×3) and their captions from one seed."""
    rng = np.random.default_rng(seed)
    scenes = [random_scene(rng) for _ in range(n)]
    return np.stack([render(s, rng, size) for s in scenes]), [s.caption for s in scenes]
