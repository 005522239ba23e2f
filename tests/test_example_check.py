"""The non-learned checker of example images (`benchmarks/eval_example_gen.py` scores generated
images with it): right on clean renders, robust to noise and blur, and never crediting noise."""

from __future__ import annotations

import io
import itertools
import random

import numpy as np
from PIL import Image, ImageFilter

from bagel_titan_plugins.data.example_check import largest_region, read_image, shape_prototypes
from bagel_titan_plugins.data.example_data import COLOURS, SHAPES, SIZES, Scene, random_scene, render


def pixels(scene: Scene, size: tuple[int, int] = (32, 32)) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(render(scene, *size))).convert("RGB"))


def test_reads_every_rendered_scene_right():
    rng = random.Random(0)
    for _ in range(150):
        scene = random_scene(rng)
        for size in ((32, 32), (64, 48)):
            reading = read_image(pixels(scene, size))
            assert (reading.background, reading.colour, reading.shape) == (
                scene.background,
                scene.colour,
                scene.shape,
            ), (scene, size, reading)


def test_reads_every_kind_of_clean_scene_at_every_corner_of_the_position_range():
    """Every shape, colour, background and size, at the centre and at the four extreme positions
    `random_scene` draws (0.45-0.55 of each side), at the example data's 32 px."""
    positions = [(0.5, 0.5), *itertools.product((0.45, 0.55), repeat=2)]
    wrong = []
    for shape, colour, background, size in itertools.product(SHAPES, COLOURS, COLOURS, SIZES):
        if colour == background:
            continue
        for cx, cy in positions:
            scene = Scene(shape, colour, background, size, cx, cy)
            reading = read_image(pixels(scene))
            if (reading.background, reading.colour, reading.shape) != (background, colour, shape):
                wrong.append((scene, reading))
    assert wrong == []


def test_fill_ratios_are_the_shapes_areas():
    prototypes = shape_prototypes(64, 64)
    assert abs(prototypes["circle"][0] - np.pi / 4) < 0.03
    assert prototypes["square"] == (1.0, 1.0)
    assert abs(prototypes["triangle"][0] - 0.5) < 0.05
    assert prototypes["circle"][1] < 0.15 < prototypes["triangle"][1] < 0.8


def test_robust_to_soft_edges_and_pixel_noise():
    rng, noise = random.Random(1), np.random.default_rng(1)
    for _ in range(60):
        scene = random_scene(rng)
        blurred = Image.fromarray(pixels(scene)).filter(ImageFilter.GaussianBlur(0.7))
        noisy = np.clip(np.asarray(blurred, dtype=np.float32) + noise.normal(0, 12, (32, 32, 3)), 0, 255)
        reading = read_image(noisy.astype(np.uint8))
        assert (reading.background, reading.colour, reading.shape) == (
            scene.background,
            scene.colour,
            scene.shape,
        )


def test_a_plain_image_has_no_shape_and_noise_is_not_a_square():
    plain = read_image(np.full((32, 32, 3), (40, 80, 220), dtype=np.uint8))
    assert (plain.background, plain.colour, plain.shape) == ("blue", None, None)
    rng = np.random.default_rng(0)
    shapes = [read_image(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).shape for _ in range(20)]
    assert shapes == [None] * 20  # mixed-colour noise is no shape (its full bounding box read as a square)


def test_largest_region_is_four_connected():
    mask = np.zeros((6, 6), dtype=bool)
    mask[0, 0] = mask[1, 1] = True  # diagonal neighbours: two regions of one pixel
    mask[3:6, 3:5] = True
    assert largest_region(mask).sum() == 6 and not largest_region(mask)[0, 0]
    assert not largest_region(np.zeros((3, 3), dtype=bool)).any()
