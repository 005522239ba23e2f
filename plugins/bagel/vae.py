"""The FLUX autoencoder (frozen): encoder to scaled latents, decoder back to pixels.

Key names equal FLUX's `ae.safetensors` (`encoder.down.{i}.block.{j}.conv1`, ...). `FrozenVAE`
keeps it outside the trained module tree, so neither FSDP nor the optimizer ever sees it.
"""

from __future__ import annotations

import hashlib

import torch
import torch.nn.functional as F
from torch import nn

from .config import VAEArgs


MEMORY_FORMAT = torch.channels_last
"""The frozen VAE's layout for its weights and activations: oneDNN (and cuDNN, for bf16) run
convolutions fastest channels-last (NHWC). `benchmarks/bench_vae_layout.py`, one CPU thread: the
full FLUX encoder at 256x256 1.1x faster in fp32 and 2.9x in bf16, the anchors' tiny VAE 2.2-3.7x."""


def _group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


class AttnBlock(nn.Module):
    """Single-head self-attention over all spatial positions (1x1 conv projections)."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = _group_norm(channels)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(channels, channels, 1) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        b, c, hh, ww = h.shape
        q, k, v = (t.reshape(b, 1, c, hh * ww).transpose(2, 3) for t in (self.q(h), self.k(h), self.v(h)))
        out = F.scaled_dot_product_attention(q, k, v).transpose(2, 3).reshape(b, c, hh, ww)
        return x + self.proj_out(out)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.norm1 = _group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _group_norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        if hasattr(self, "nin_shortcut"):
            x = self.nin_shortcut(x)
        return x + h


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # FLUX pads one zero row and column at the end. F.pad writes its whole output twice (a
        # zero fill, then the copy): zeroing only the border saves a pass over the image.
        n, c, h, w = x.shape
        layout = (
            torch.channels_last
            if x.is_contiguous(memory_format=torch.channels_last)
            else torch.contiguous_format
        )
        padded = torch.empty((n, c, h + 1, w + 1), dtype=x.dtype, device=x.device, memory_format=layout)
        padded[:, :, h].zero_()
        padded[:, :, :h, w].zero_()
        padded[:, :, :h, :w].copy_(x)
        return self.conv(padded)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Mid(nn.Module):
    """The middle blocks (`mid.block_1`, `mid.attn_1`, `mid.block_2` in FLUX's key layout)."""

    def __init__(self, channels: int):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = ResnetBlock(channels, channels)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(h)))


class _Level(nn.Module):
    """One resolution level (`down.<i>.block.<j>`, `down.<i>.downsample`, likewise `up.<i>`)."""

    downsample: nn.Module | None
    upsample: nn.Module | None

    def __init__(self, blocks: nn.ModuleList):
        super().__init__()
        self.block = blocks
        self.downsample = self.upsample = None  # plain attributes until a resampler is set


class Encoder(nn.Module):
    """Pixels [B, 3, H, W] -> moments [B, 2*z, H/ds, W/ds] (mean and log-variance)."""

    def __init__(self, a: VAEArgs):
        super().__init__()
        self.conv_in = nn.Conv2d(a.in_channels, a.ch, 3, padding=1)
        in_mult = (1,) + tuple(a.ch_mult)
        self.down = nn.ModuleList()
        block_in = a.ch
        for level, mult in enumerate(a.ch_mult):
            block_in = a.ch * in_mult[level]
            blocks = nn.ModuleList()
            for _ in range(a.num_res_blocks):
                blocks.append(ResnetBlock(block_in, a.ch * mult))
                block_in = a.ch * mult
            down = _Level(blocks)
            if level != len(a.ch_mult) - 1:
                down.downsample = Downsample(block_in)
            self.down.append(down)
        self.mid = _Mid(block_in)
        self.norm_out = _group_norm(block_in)
        self.conv_out = nn.Conv2d(block_in, 2 * a.z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for down in self.down:
            assert isinstance(down, _Level)
            for block in down.block:
                h = block(h)
            if down.downsample is not None:
                h = down.downsample(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """Latents [B, z, h, w] (unscaled) -> pixels [B, 3, h*ds, w*ds]."""

    def __init__(self, a: VAEArgs):
        super().__init__()
        block_in = a.ch * a.ch_mult[-1]
        self.conv_in = nn.Conv2d(a.z_channels, block_in, 3, padding=1)
        self.mid = _Mid(block_in)
        ups: list[nn.Module] = []
        for level in reversed(range(len(a.ch_mult))):
            blocks = nn.ModuleList()
            for _ in range(a.num_res_blocks + 1):
                blocks.append(ResnetBlock(block_in, a.ch * a.ch_mult[level]))
                block_in = a.ch * a.ch_mult[level]
            up = _Level(blocks)
            if level != 0:
                up.upsample = Upsample(block_in)
            ups.insert(0, up)
        self.up = nn.ModuleList(ups)
        self.norm_out = _group_norm(block_in)
        self.conv_out = nn.Conv2d(block_in, a.out_ch, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for up in reversed(self.up):
            assert isinstance(up, _Level)
            for block in up.block:
                h = block(h)
            if up.upsample is not None:
                h = up.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class AutoEncoder(nn.Module):
    """FLUX AE with its scale/shift: `encode` gives the latents BAGEL trains on."""

    def __init__(self, args: VAEArgs):
        super().__init__()
        self.args = args
        self.encoder = Encoder(args)
        self.decoder = Decoder(args)

    def moments(self, images: torch.Tensor) -> torch.Tensor:
        return self.encoder(images)

    def encode(
        self, images: torch.Tensor, generator: torch.Generator | None = None, eps: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Sample the posterior (mean + std * eps) and scale/shift it; `eps` overrides the draw."""
        return self.sample(self.moments(images), generator, eps)

    def sample(
        self, moments: torch.Tensor, generator: torch.Generator | None = None, eps: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Moments [n, 2z, h, w] -> scaled latents: mean + std * eps, eps drawn here unless given.

        The one place the posterior is sampled, so that encoded and cached moments (the latent
        cache stores moments, not samples) give the same bits for the same draw."""
        mean, logvar = moments.chunk(2, dim=1)
        if eps is None:
            eps = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        z = mean + torch.exp(0.5 * logvar) * eps
        return self.args.scale_factor * (z - self.args.shift_factor)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.decoder(latents / self.args.scale_factor + self.args.shift_factor)


class FrozenVAE:
    """Holds the autoencoder outside the trained module tree (a plain attribute of the model).

    FSDP, `model.to_empty`, the optimizer and `model.state_dict()` never see it; the model spec
    materialises it, loads `ae.safetensors` into it and moves it to the compute device on use
    (bfloat16 on GPU unless `[bagel] vae_dtype` says otherwise).
    """

    def __init__(self, args: VAEArgs, dtype_policy: str = "auto"):
        self.args = args
        self.dtype_policy = dtype_policy
        self.module = AutoEncoder(args).requires_grad_(False).eval()
        self._identity: tuple[tuple, str] | None = None

    def _stamp(self) -> tuple:
        """Changes whenever a parameter is replaced or written in place (weights loaded)."""
        return tuple((p.data_ptr(), p._version, p.dtype) for p in self.module.parameters())

    def identity(self) -> str:
        """Hex digest of the architecture and the weights as loaded: what a latent cache names
        its VAE by, so that another VAE (or the same one at another size) never reads its entries.

        Computed from the weights before `on` first casts them (the cast is ours, not a change of
        VAE) and kept until a parameter changes."""
        stamp = self._stamp()
        if self._identity is None or self._identity[0] != stamp:
            digest = hashlib.blake2b(repr(self.args).encode(), digest_size=16)
            for name, tensor in sorted(self.module.state_dict().items()):
                digest.update(f"{name}:{tuple(tensor.shape)}".encode())
                digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
            self._identity = (stamp, digest.hexdigest())
        return self._identity[1]

    def dtype_for(self, device: torch.device) -> torch.dtype:
        policy = {"float32": torch.float32, "bfloat16": torch.bfloat16}
        if self.dtype_policy in policy:
            return policy[self.dtype_policy]
        return torch.bfloat16 if device.type == "cuda" else torch.float32

    def materialize(self, device: torch.device | str) -> None:
        """Allocate storage (after a meta-device build) and give it PyTorch's default init."""
        device = torch.device(device)
        if any(p.is_meta for p in self.module.parameters()):
            self.module.to_empty(device=device)
            for m in self.module.modules():
                if isinstance(m, (nn.Conv2d, nn.GroupNorm)):
                    m.reset_parameters()

    def on(self, device: torch.device) -> AutoEncoder:
        """The module on `device` in its dtype and `MEMORY_FORMAT` (moved once, then a no-op)."""
        p = self.module.encoder.conv_in.weight
        dtype = self.dtype_for(device)
        if p.device != device or p.dtype != dtype or not p.is_contiguous(memory_format=MEMORY_FORMAT):
            known = self.identity() if not p.is_meta else None
            self.module.to(device=device, dtype=dtype)
            self.module.to(memory_format=MEMORY_FORMAT)  # type: ignore[call-overload]  # real, absent from torch's stubs
            if known is not None:
                self._identity = (self._stamp(), known)
        return self.module

    @torch.no_grad()
    def encode(
        self, images: torch.Tensor, generator: torch.Generator | None = None, eps: torch.Tensor | None = None
    ) -> torch.Tensor:
        """[n, 3, H, W] pixels in [-1, 1] -> fp32 latents [n, z, H/ds, W/ds] (scaled and shifted)."""
        ae = self.on(images.device)
        dtype = next(ae.parameters()).dtype
        eps = None if eps is None else eps.to(dtype)
        images = images.to(dtype).contiguous(memory_format=MEMORY_FORMAT)
        return ae.encode(images, generator=generator, eps=eps).float().contiguous()

    @torch.no_grad()
    def moments_of(self, image_CHW: torch.Tensor) -> torch.Tensor:
        """One image [3, H, W] (no padding) -> its moments [2z, H/ds, W/ds] in the VAE's dtype.

        Always one image per encoder call: GroupNorm's statistics would include a pack-mate's
        padding, and on CPU even a batch of equal-sized images differs from single calls in the
        last bits, so only batch-1 calls make an image's moments independent of its pack (and
        equal to what `bagel-titan-encode-latents` stored)."""
        ae = self.on(image_CHW.device)
        dtype = next(ae.parameters()).dtype
        image = image_CHW[None].to(dtype).contiguous(memory_format=MEMORY_FORMAT)  # may be a crop (a view)
        return ae.moments(image)[0].contiguous()

    @torch.no_grad()
    def sample_padded(self, moments: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Padded moments [n, 2z, h, w] (VAE dtype) -> fp32 scaled latents [n, z, h, w].

        eps is drawn over the whole padded shape, as the release's padded encode draws it, so the
        generator advances by the same amount whether the moments were encoded or cached."""
        ae = self.on(moments.device)
        return ae.sample(moments.to(next(ae.parameters()).dtype), generator).float()

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        ae = self.on(latents.device)
        latents = latents.to(next(ae.parameters()).dtype).contiguous(memory_format=MEMORY_FORMAT)
        return ae.decode(latents).float().contiguous()
