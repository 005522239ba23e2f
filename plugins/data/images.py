"""Image sources and resizing shared by processors.

A source is a path (relative to the dataset's `data_folder`, or absolute), a `data:` URL,
raw bytes, or the `{"bytes": ..., "path": ...}` struct that HF datasets writes into parquet and
arrow. Every failure becomes a `BadSampleError` with the reason the loader counts.
"""

from __future__ import annotations

import base64
import binascii
import io
import math
import os
import warnings
from typing import Any

import numpy as np
import torch
from PIL import Image

from .bad_samples import BadSampleError


def _open(file: Any, what: str) -> Image.Image:
    """PIL's lazy open (it reads the header only). The pixel cap is the caller's
    (`max_pixels`), so PIL's own decompression-bomb warning is silenced, and its bomb error is a
    too-large image, not a corrupt one."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(file)
    except Image.DecompressionBombError as exc:
        raise BadSampleError("image_too_large", f"{what}: {exc}") from None
    except Exception as exc:
        raise BadSampleError("image_corrupt", f"{what}: {type(exc).__name__}: {exc}") from None


def _open_bytes(data: bytes, what: str) -> Image.Image:
    return _open(io.BytesIO(data), what)


def open_image(source: Any, data_folder: str) -> Image.Image:
    """A lazily decoded PIL image (header read only) from any supported source."""
    if isinstance(source, dict):
        if source.get("bytes"):
            return _open_bytes(source["bytes"], f"embedded image {source.get('path') or ''}".strip())
        if source.get("path"):
            return open_image(source["path"], data_folder)
        raise BadSampleError("image_missing", f"image struct without bytes or path: {sorted(source)}")
    if isinstance(source, (bytes, bytearray, memoryview)):
        return _open_bytes(bytes(source), "embedded image bytes")
    if not isinstance(source, str) or not source:
        raise BadSampleError(
            "unknown_content",
            f"an image source must be a path, data: URL, bytes or "
            f"{{bytes, path}} struct, got {type(source).__name__}",
        )
    if source.startswith("data:"):
        header, _, payload = source.partition(",")
        try:
            data = (
                base64.b64decode(payload, validate=True) if header.endswith(";base64") else payload.encode()
            )
        except (binascii.Error, ValueError) as exc:
            raise BadSampleError("image_corrupt", f"data: URL does not decode: {exc}") from None
        return _open_bytes(data, "data: URL")
    if source.startswith(("http://", "https://")):
        raise BadSampleError(
            "unknown_content",
            f"remote image {source!r}: download images first and point `data_folder` at them",
        )
    path = source[len("file://") :] if source.startswith("file://") else source
    full = path if os.path.isabs(path) else os.path.join(data_folder, path)
    if not os.path.isfile(full):
        raise BadSampleError("image_missing", f"{full!r} does not exist (data_folder={data_folder!r})")
    # Opened by path: PIL reads the header only, so a huge or non-image file is never read whole.
    return _open(full, full)


def load_rgb(source: Any, data_folder: str, *, min_side: int, max_pixels: int) -> Image.Image:
    """Decode to RGB after checking the size from the header (no decode of a too-large image).
    16-bit and 32-bit integer greyscale are scaled to 8 bits; float images are skipped
    ("image_unsupported_mode"): PIL's own conversion would clip them to white."""
    image = open_image(source, data_folder)
    try:
        return _to_rgb(image, min_side=min_side, max_pixels=max_pixels)
    finally:
        image.close()


def _to_rgb(image: Image.Image, *, min_side: int, max_pixels: int) -> Image.Image:
    w, h = image.size
    if min(w, h) < min_side:
        raise BadSampleError("image_too_small", f"{w}x{h} px, shorter side < min_image_side {min_side}")
    if w * h > max_pixels:
        raise BadSampleError("image_too_large", f"{w}x{h} px > max_image_pixels {max_pixels}")
    if image.mode == "F" or image.mode.startswith("BGR"):
        raise BadSampleError(
            "image_unsupported_mode", f"pixel mode {image.mode!r} has no faithful 8-bit RGB form"
        )
    try:
        if image.mode.startswith("I"):  # "I;16*" (16-bit) and "I" (32-bit integer) greyscale
            pixels = np.asarray(image).astype(np.float64)
            scale = (
                65535.0 if image.mode.startswith("I;16") or pixels.max(initial=0) <= 65535 else pixels.max()
            )
            grey = np.clip(pixels / scale * 255.0 + 0.5, 0, 255).astype(np.uint8)
            return Image.fromarray(grey).convert("RGB")
        if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
            rgba = image.convert("RGBA")  # transparent pixels become white, as in the release
            white = Image.new("RGB", rgba.size, (255, 255, 255))
            white.paste(rgba, mask=rgba.getchannel("A"))
            return white
        return image.convert("RGB")
    except Exception as exc:  # truncated or corrupt payload behind a valid header
        raise BadSampleError("image_corrupt", f"{type(exc).__name__}: {exc}") from None


def fit_size(
    width: int,
    height: int,
    *,
    min_size: int,
    max_size: int,
    stride: int,
    max_side: int,
    max_pixels: int | None = None,
) -> tuple[int, int]:
    """(W, H) keeping the aspect ratio: the long side <= max_size, the short side >= min_size where
    the long side allows it, W*H <= max_pixels, each side a multiple of `stride` (rounded to the
    nearest) and at most `max_side` px."""
    scale = min(max_size / max(width, height), 1.0)
    scale = max(scale, min_size / min(width, height))
    scale = min(scale, max_size / max(width, height), max_side / max(width, height))
    if max_pixels is not None and width * height * scale * scale > max_pixels:
        scale = math.sqrt(max_pixels / (width * height))
    limit = max(stride, min(max_size, max_side) // stride * stride)

    def side(x: int) -> int:
        return int(min(limit, max(stride, math.floor(x * scale / stride + 0.5) * stride)))

    w, h = side(width), side(height)
    while max_pixels is not None and w * h > max_pixels and max(w, h) > stride:  # rounding went up
        if w >= h:
            w -= stride
        else:
            h -= stride
    return w, h


def to_tensor(image: Image.Image, size: tuple[int, int], mean: float, std: float) -> torch.Tensor:
    """[3, H, W] float32 `(pixels/255 - mean) / std` after a bicubic resize to `size` (W, H)."""
    if image.size != size:
        image = image.resize(size, Image.Resampling.BICUBIC)
    array = np.asarray(image, dtype=np.uint8)
    pixels = torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(255.0)
    return pixels.sub_(mean).div_(std)
