"""A simple, non-learned checker of example-data images: which background, shape colour and shape
an image shows, to score generated images against their prompts (`benchmarks/eval_example_gen.py`).

- background: the colour of the border pixels (the majority of their nearest palette colours);
- the blob: the largest 4-connected region of pixels whose nearest palette colour is not the
  background's; its colour is the majority of its pixels' nearest palette colours;
- shape: two measures of the blob against its bounding box, the fill ratio (about 0.785 for a
  circle, 1.0 for a square, 0.5 for a triangle) and how full its four corner cells are (the
  corners: 4 for a square, 2 half-filled for a triangle, none for a circle); the shape whose
  cleanly rendered image measures nearest wins.

An image without a blob (all background) gets shape and shape colour None (wrong), and so does a
blob whose most common colour covers less than `MIN_BLOB_PURITY` of it: a patch of mixed-colour
noise is no shape (its bounding box is full, so it would otherwise read as a square).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from .example_data import COLOURS, SHAPES, Scene, render

CORNER_FRACTION = 0.2
"""Side of a corner cell as a fraction of the blob's bounding box side."""
MIN_BLOB_PURITY = 0.5
"""Least share of the blob's pixels of its own (most common) colour for it to count as a shape."""


@dataclass(frozen=True)
class ImageReading:
    """What the checker sees in one image."""

    background: str
    colour: str | None
    shape: str | None
    fill_ratio: float
    corner_fill: float


def palette_labels(image_HW3: np.ndarray) -> np.ndarray:
    """Index into `COLOURS` (in its order) of each pixel's nearest palette colour, [H, W]."""
    palette_K3 = np.array(list(COLOURS.values()), dtype=np.float32)
    distance_HWK = np.linalg.norm(image_HW3[:, :, None, :].astype(np.float32) - palette_K3, axis=-1)
    return distance_HWK.argmin(-1)


def largest_region(mask_HW: np.ndarray) -> np.ndarray:
    """The largest 4-connected region of `mask_HW` as a boolean mask (all False when empty)."""
    height, width = mask_HW.shape
    region = np.zeros_like(mask_HW, dtype=np.int32)
    best, best_size, label = 0, 0, 0
    for start in zip(*np.nonzero(mask_HW)):
        if region[start]:
            continue
        label += 1
        stack, size = [start], 0
        region[start] = label
        while stack:
            y, x = stack.pop()
            size += 1
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < height and 0 <= nx < width and mask_HW[ny, nx] and not region[ny, nx]:
                    region[ny, nx] = label
                    stack.append((ny, nx))
        if size > best_size:
            best, best_size = label, size
    return region == best if best else np.zeros_like(mask_HW, dtype=bool)


def shape_measures(blob_HW: np.ndarray) -> tuple[float, float]:
    """(fill ratio, mean fill of the four corner cells) of a blob within its bounding box."""
    ys, xs = np.nonzero(blob_HW)
    box = blob_HW[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1].astype(np.float32)
    h, w = box.shape
    ch, cw = max(1, round(CORNER_FRACTION * h)), max(1, round(CORNER_FRACTION * w))
    corners = [box[:ch, :cw], box[:ch, -cw:], box[-ch:, :cw], box[-ch:, -cw:]]
    return float(box.mean()), float(np.mean([c.mean() for c in corners]))


@lru_cache(maxsize=None)
def shape_prototypes(height: int, width: int) -> dict[str, tuple[float, float]]:
    """The measures of each shape rendered cleanly (large, centred) at this image size."""
    from io import BytesIO

    from PIL import Image

    prototypes = {}
    for shape in SHAPES:
        png = render(Scene(shape, "red", "white", "large", 0.5, 0.5), width, height)
        image = np.asarray(Image.open(BytesIO(png)).convert("RGB"))
        prototypes[shape] = shape_measures(palette_labels(image) == list(COLOURS).index("red"))
    return prototypes


def read_image(image_HW3: np.ndarray) -> ImageReading:
    """Background, shape colour and shape of a uint8 [H, W, 3] image (see the module doc)."""
    names = list(COLOURS)
    labels_HW = palette_labels(image_HW3)
    border = np.concatenate([labels_HW[0], labels_HW[-1], labels_HW[1:-1, 0], labels_HW[1:-1, -1]])
    background = int(np.bincount(border, minlength=len(names)).argmax())
    blob_HW = largest_region(labels_HW != background)
    if not blob_HW.any():
        return ImageReading(names[background], None, None, 0.0, 0.0)
    counts = np.bincount(labels_HW[blob_HW], minlength=len(names))
    colour = int(counts.argmax())
    if counts[colour] < MIN_BLOB_PURITY * counts.sum():
        return ImageReading(names[background], None, None, 0.0, 0.0)
    fill, corners = shape_measures(blob_HW)
    prototypes = shape_prototypes(*labels_HW.shape)
    shape = min(prototypes, key=lambda s: (fill - prototypes[s][0]) ** 2 + (corners - prototypes[s][1]) ** 2)
    return ImageReading(names[background], names[colour], shape, fill, corners)
