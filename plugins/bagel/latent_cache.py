"""The latent cache: the frozen VAE's moments of every VAE image, encoded once, read by the loader.

`bagel-titan-encode-latents` (see `encode_latents.py`) fills it; `[bagel] latent_cache` makes the
collator (in the loader workers) put the stored moments into the batch, and the model then skips
the VAE encoder. The posterior is still sampled in the step (`mean + std * eps` with the step's
generator), so a run with the cache trains bitwise as one without it.

Layout: `<folder>/<vae>/<kk>/<key>.safetensors`, one file per image, where

- `<vae>` = the VAE's identity (architecture + weights digest, `FrozenVAE.identity`) and the dtype
  it encodes in: another VAE, or the same one in another dtype, reads other entries;
- `<key>` = a digest of the processed pixels the encoder sees (values and size): another image,
  another resize rule or resolution gives another key.

So a stale entry is never found; a damaged one (truncated write, edited file) fails its checks
(the stored key, VAE and shape must match) and is reported like a missing one. Entries are
written to a temporary name and renamed into place: a crash never leaves a half entry.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from bagel_titan.errors import UserError

if TYPE_CHECKING:
    from .modeling import Bagel

DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16"}
COMMAND = "bagel-titan-encode-latents"


class LatentCacheMiss(UserError):
    """An image of a batch has no valid entry (with `[bagel] latent_cache_miss = "error"`)."""


def content_key(image_CHW: torch.Tensor) -> str:
    """Digest of the processed pixels (fp32 [3, H, W], values and shape)."""
    pixels = image_CHW.detach().to(torch.float32).cpu().contiguous()
    digest = hashlib.blake2b(f"{tuple(pixels.shape)}".encode(), digest_size=20)
    digest.update(pixels.numpy().tobytes())
    return digest.hexdigest()


def vae_folder_name(vae_identity: str, dtype: torch.dtype) -> str:
    return f"{vae_identity[:24]}-{DTYPE_NAMES[dtype]}"


@dataclass(frozen=True)
class Lookup:
    """One image's entry: `moments` [2z, h, w], or None with the reason (`missing`, `damaged ...`)."""

    moments: torch.Tensor | None
    reason: str = ""


class LatentCache:
    """One VAE's entries in a cache folder (picklable: the collator carries it into the workers)."""

    def __init__(self, folder: str, vae_identity: str, dtype: torch.dtype):
        self.folder = folder
        self.vae_identity = vae_identity
        self.dtype = dtype
        self.root = os.path.join(folder, vae_folder_name(vae_identity, dtype))

    @property
    def tag(self) -> str:
        """What a batch records of the cache it was served from (checked against the model's VAE)."""
        return vae_folder_name(self.vae_identity, self.dtype)

    def path(self, key: str) -> str:
        return os.path.join(self.root, key[:2], f"{key}.safetensors")

    def get(self, key: str, latent_hw: tuple[int, int]) -> Lookup:
        """The stored moments of `key`, checked against the key, the VAE and the latent size."""
        path = self.path(key)
        if not os.path.exists(path):
            return Lookup(None, "missing")
        try:
            tensors = load_file(path)
            with open(path, "rb") as f:  # the header's metadata: what the entry says it is
                header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
            meta = header.get("__metadata__", {})
        except (SafetensorError, OSError, ValueError) as exc:
            return Lookup(None, f"damaged entry {path} ({type(exc).__name__}: {exc})")
        moments = tensors.get("moments")
        if meta.get("key") != key or meta.get("vae") != self.tag or moments is None:
            return Lookup(None, f"damaged entry {path} (its key or VAE does not match its name)")
        if moments.dtype != self.dtype or tuple(moments.shape[1:]) != tuple(latent_hw):
            return Lookup(
                None,
                f"damaged entry {path} ({moments.dtype}, {tuple(moments.shape)}; expected "
                f"{self.dtype}, latent {latent_hw[0]}x{latent_hw[1]})",
            )
        return Lookup(moments)

    def put(self, key: str, moments: torch.Tensor, image_hw: tuple[int, int]) -> None:
        """Write one entry atomically (temporary file in the same folder, then rename)."""
        path = self.path(key)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        meta = {"key": key, "vae": self.tag, "image_hw": f"{image_hw[0]}x{image_hw[1]}"}
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-", suffix=".safetensors")
        os.close(fd)
        try:
            save_file({"moments": moments.detach().to(self.dtype).cpu().contiguous()}, tmp, metadata=meta)
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise

    def write_manifest(self, info: dict) -> None:
        """`vae.json` beside the entries: which VAE, dtype, device and threads encoded them (for a
        reader; lookups never depend on it)."""
        try:
            os.makedirs(self.root, exist_ok=True)
        except OSError as exc:
            raise UserError(
                f"[bagel] latent_cache {self.folder!r}: cannot create {self.root!r} ({exc.strerror}); "
                f"choose a writable folder"
            ) from exc
        path = os.path.join(self.root, "vae.json")
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(
                {"vae_identity": self.vae_identity, "dtype": DTYPE_NAMES[self.dtype], **info}, f, indent=1
            )
        os.replace(tmp, path)


def miss_message(cache: LatentCache, where: str, reason: str, image_hw: tuple[int, int]) -> str:
    return (
        f"[bagel] latent_cache {cache.folder!r}: {reason} for {where} ({image_hw[0]}x{image_hw[1]} px, "
        f"VAE {cache.tag}); run `{COMMAND}` with this run's config (same data, processor and VAE), "
        f'or set [bagel] latent_cache_miss = "encode"'
    )


def for_model(folder: str, model: Bagel, device: str = "auto") -> LatentCache:
    """The cache of `model`'s frozen VAE (as loaded), in the dtype it encodes in on `device`
    (`[training] device`: "auto" is CUDA when present)."""
    vae = model.vae
    if vae is None:
        raise UserError("[bagel] latent_cache is set but [bagel] visual_gen = false: there is no VAE")
    on_gpu = device != "cpu" and torch.cuda.is_available()
    return LatentCache(folder, vae.identity(), vae.dtype_for(torch.device("cuda" if on_gpu else "cpu")))
