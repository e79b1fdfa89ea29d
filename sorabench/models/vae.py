"""A KL-regularised, causal (2+1)D convolutional video VAE (the latent space the DiT is trained in).

Shape rule. A clip of T frames, H x W pixels, maps to latents of shape

    (latent_channels, 1 + (T - 1) / temporal_factor, H / spatial_factor, W / spatial_factor)

so T must be 1 + k * temporal_factor (any T >= 1 when temporal_factor is 1) and H, W multiples of spatial_factor.
The first frame is encoded on its own (CogVideoX / Open-Sora style): latent frame 0 sees only frame 0, so a single
image is a valid 1-frame video; latent frame j >= 1 stands for frames (j-1)*f_t + 1 .. j*f_t (and may read earlier
ones). Decoding inverts the rule: T' latent frames give 1 + (T' - 1) * temporal_factor frames.

Causality. Every temporal convolution pads only on the past side, by repeating the first frame, and normalisation
is per frame, so latent frame j depends only on input frames 0 .. j * temporal_factor. The decoder is causal in the
same way (output frame t only sees latent frames <= ceil(t / temporal_factor)).

Efficiency (CPU training in minutes). Three choices, each measured on 8x32x32 `shapes` clips:
- A space-to-depth stem (`patch_size`, 2 by default): each frame's p x p pixel patches are folded into channels before
  the first conv, and the decoder ends with the inverse depth-to-space, so no layer runs at full resolution (as in
  DC-AE and ViT-VAEs). Steps are cheaper than with a full-resolution first level, and PSNR after a fixed time is
  higher.
- Factorised (2+1)D convolutions, as in R(2+1)D: a 1xkxk conv on each frame and a kx1x1 causal conv over time,
  about a third of the cost of a full kxkxk conv. One temporal conv per ResBlock: a second one made steps
  slower and PSNR after a fixed time lower.
- Conv3d kernels on tensors in channels_last_3d memory layout, the fastest CPU path we measured (faster than
  folding frames into the batch for Conv2d, or pixels into the batch for Conv1d). No attention: at these sizes it
  costs more than it gives.
The figures behind these choices: benchmarks/RESULTS.md, "Figures moved out of code comments".
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torchmetrics.functional.image import structural_similarity_index_measure

from sorabench.registry import lookup, registrar

VAES: dict[str, type[nn.Module]] = {}
register = registrar(VAES, "vae factor")  # @register("name"): `vae.model.factor: <name>`

SPATIAL_FACTORS = (1, 2, 4, 8)
TEMPORAL_FACTORS = (1, 2, 4)
LOGVAR_RANGE = (-30.0, 20.0)  # as in Stable Diffusion's VAE: keeps exp(logvar) finite in the KL term


def _channels_last(x: Tensor) -> Tensor:
    return x.contiguous(memory_format=torch.channels_last_3d)


def _num_groups(channels: int) -> int:
    return math.gcd(32, channels)  # GroupNorm(32) where the width allows it, fewer groups for narrow layers


class FrameGroupNorm(nn.GroupNorm):
    """GroupNorm with statistics computed on each frame separately.

    A GroupNorm over (T, H, W) jointly would let later frames shift the normalisation of earlier ones and break
    causality; per-frame statistics also make a 1-frame image normalise exactly like the first frame of a video.
    """

    def forward(self, x: Tensor) -> Tensor:
        b, c, t, h, w = x.shape
        # PyTorch's CPU GroupNorm is much slower on channels-last input than a copy to contiguous and back
        # (benchmarks/RESULTS.md).
        frames = x.transpose(1, 2).reshape(b * t, c, h, w).contiguous()
        return _channels_last(super().forward(frames).reshape(b, t, c, h, w).transpose(1, 2))


class SpatialConv(nn.Conv3d):
    """A k x k convolution applied to every frame on its own (a Conv3d with a 1 x k x k kernel)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1):
        super().__init__(
            in_channels,
            out_channels,
            kernel_size=(1, kernel_size, kernel_size),
            stride=(1, stride, stride),
            padding=(0, kernel_size // 2, kernel_size // 2),
        )


class CausalTemporalConv(nn.Conv3d):
    """A channels -> channels convolution over time only (k x 1 x 1 kernel), padded with k - 1 copies of the first
    frame on the past side.

    With stride s, output frame i reads input frames i*s - (k-1) .. i*s, clamped at 0: never a later frame. For k = 3,
    s = 2 that is frames (2i-2, 2i-1, 2i), and T = 1 + 2m input frames give 1 + m outputs, output 0 from frame 0 alone.
    """

    def __init__(self, channels: int, kernel_size: int = 3, stride: int = 1):
        super().__init__(channels, channels, kernel_size=(kernel_size, 1, 1), stride=(stride, 1, 1))
        # Start as the identity on the newest frame (as when inflating 2D weights to video): the network begins as a
        # per-frame image autoencoder and learns its temporal mixing on top.
        nn.init.zeros_(self.weight)
        nn.init.zeros_(self.bias)
        with torch.no_grad():
            self.weight[:, :, -1, 0, 0].copy_(torch.eye(channels))

    def forward(self, x: Tensor) -> Tensor:
        past = x[:, :, :1].expand(-1, -1, self.kernel_size[0] - 1, -1, -1)
        return super().forward(_channels_last(torch.cat([past, x], dim=2)))


class ResBlock(nn.Module):
    """Pre-norm residual block: norm, SiLU, spatial conv, causal temporal conv, norm, SiLU, spatial conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm1 = FrameGroupNorm(_num_groups(channels), channels)
        self.spatial1 = SpatialConv(channels, channels)
        self.temporal1 = CausalTemporalConv(channels)
        self.norm2 = FrameGroupNorm(_num_groups(channels), channels)
        self.spatial2 = SpatialConv(channels, channels)
        # Zero the last conv so every block starts as the identity: a stack of fresh blocks passes the signal through
        # unchanged, which makes early training fast.
        nn.init.zeros_(self.spatial2.weight)
        nn.init.zeros_(self.spatial2.bias)

    def forward(self, x: Tensor) -> Tensor:
        h = self.temporal1(self.spatial1(F.silu(self.norm1(x))))
        return x + self.spatial2(F.silu(self.norm2(h)))


class Downsample(nn.Module):
    """Halve H and W (stride-2 3x3 conv) and/or T (stride-2 causal temporal conv, keeping the first frame alone)."""

    def __init__(self, in_channels: int, out_channels: int, spatial: bool, temporal: bool):
        super().__init__()
        self.spatial = SpatialConv(in_channels, out_channels, stride=2 if spatial else 1)
        self.temporal = CausalTemporalConv(out_channels, stride=2) if temporal else None

    def forward(self, x: Tensor) -> Tensor:
        x = self.spatial(x)
        return x if self.temporal is None else self.temporal(x)


class Upsample(nn.Module):
    """Double T (1 + m frames -> 1 + 2m) and/or H, W by nearest-neighbour repetition, then a (2+1)D conv.

    In time, latent frame 0 becomes one frame and every later one two, mirroring the encoder's first-frame rule.
    """

    def __init__(self, in_channels: int, out_channels: int, spatial: bool, temporal: bool):
        super().__init__()
        self.spatial_up, self.temporal_up = spatial, temporal
        self.spatial = SpatialConv(in_channels, out_channels)
        self.temporal = CausalTemporalConv(out_channels) if temporal else None

    def forward(self, x: Tensor) -> Tensor:
        if self.temporal_up:
            x = x.repeat_interleave(2, dim=2)[:, :, 1:]
        if self.spatial_up:
            x = F.interpolate(x, scale_factor=(1.0, 2.0, 2.0), mode="nearest")
        x = self.spatial(_channels_last(x))
        return x if self.temporal is None else self.temporal(x)


def space_to_depth(x: Tensor, p: int) -> Tensor:
    """(B, C, T, H, W) -> (B, C*p*p, T, H/p, W/p): fold each frame's p x p pixel patches into channels."""
    b, c, t, h, w = x.shape
    x = x.reshape(b, c, t, h // p, p, w // p, p).permute(0, 1, 4, 6, 2, 3, 5)
    return x.reshape(b, c * p * p, t, h // p, w // p)


def depth_to_space(x: Tensor, p: int) -> Tensor:
    """The inverse of space_to_depth: (B, C*p*p, T, H, W) -> (B, C, T, H*p, W*p)."""
    b, c, t, h, w = x.shape
    x = x.reshape(b, c // (p * p), p, p, t, h, w).permute(0, 1, 4, 5, 2, 6, 3)
    return x.reshape(b, c // (p * p), t, h * p, w * p)


@register("causal")
class CausalVideoVAE(nn.Module):
    """Encoder and decoder around a stem of space-to-depth by p = min(patch_size, spatial_factor).

    After the stem there are `levels` = log2(max(spatial_factor / p, temporal_factor)) resolution levels. Level i
    works at base_channels * min(2^i, 4) channels with `num_res_blocks` ResBlocks, then downsamples: in space while
    i < log2(spatial_factor / p), in time while i < log2(temporal_factor) (time first, as CogVideoX does, because
    early temporal compression makes every later level cheaper). `num_res_blocks` more ResBlocks at the lowest
    resolution precede the latent projection. The decoder mirrors the encoder.
    """

    def __init__(
        self,
        in_channels: int = 3,
        latent_channels: int = 4,
        spatial_factor: int = 4,
        temporal_factor: int = 1,
        base_channels: int = 32,
        num_res_blocks: int = 1,
        patch_size: int = 2,
    ):
        super().__init__()
        if spatial_factor not in SPATIAL_FACTORS:
            raise ValueError(f"spatial_factor={spatial_factor} must be one of {SPATIAL_FACTORS}")
        if temporal_factor not in TEMPORAL_FACTORS:
            raise ValueError(f"temporal_factor={temporal_factor} must be one of {TEMPORAL_FACTORS}")
        if patch_size not in SPATIAL_FACTORS:
            raise ValueError(f"patch_size={patch_size} must be one of {SPATIAL_FACTORS}")
        self.in_channels, self.latent_channels = in_channels, latent_channels
        self.spatial_factor, self.temporal_factor = spatial_factor, temporal_factor
        self.patch_size = p = min(patch_size, spatial_factor)
        n_spatial, n_temporal = int(math.log2(spatial_factor // p)), int(math.log2(temporal_factor))
        levels = max(n_spatial, n_temporal)
        ch = [base_channels * min(2**i, 4) for i in range(levels + 1)]

        enc: list[nn.Module] = [SpatialConv(in_channels * p * p, ch[0])]
        for i in range(levels):
            enc += [ResBlock(ch[i]) for _ in range(num_res_blocks)]
            enc.append(Downsample(ch[i], ch[i + 1], spatial=i < n_spatial, temporal=i < n_temporal))
        enc += [ResBlock(ch[-1]) for _ in range(num_res_blocks)]
        enc += [FrameGroupNorm(_num_groups(ch[-1]), ch[-1]), nn.SiLU(), SpatialConv(ch[-1], 2 * latent_channels)]
        self.encoder = nn.Sequential(*enc)  # -> mean and log-variance, concatenated along channels

        dec: list[nn.Module] = [SpatialConv(latent_channels, ch[-1])]
        dec += [ResBlock(ch[-1]) for _ in range(num_res_blocks)]
        for i in reversed(range(levels)):
            dec.append(Upsample(ch[i + 1], ch[i], spatial=i < n_spatial, temporal=i < n_temporal))
            dec += [ResBlock(ch[i]) for _ in range(num_res_blocks)]
        dec += [FrameGroupNorm(_num_groups(ch[0]), ch[0]), nn.SiLU(), SpatialConv(ch[0], in_channels * p * p)]
        self.decoder = nn.Sequential(*dec)
        self.to(memory_format=torch.channels_last_3d)

    def latent_frames(self, num_frames: int) -> int:
        f = self.temporal_factor
        if num_frames < 1 or (num_frames - 1) % f:
            valid = 1 + max(1, math.ceil((num_frames - 1) / f)) * f
            raise ValueError(
                f"num_frames={num_frames} is incompatible with temporal_factor={f}: need 1 + k*{f} frames (e.g. {valid})"
            )
        return 1 + (num_frames - 1) // f

    def latent_shape(self, num_frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        s = self.spatial_factor
        if height % s or width % s:
            raise ValueError(f"height={height}, width={width} must both be divisible by spatial_factor={s}")
        return self.latent_channels, self.latent_frames(num_frames), height // s, width // s

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if x.dim() != 5 or x.shape[1] != self.in_channels:
            raise ValueError(f"expected a video (B, {self.in_channels}, T, H, W), got {tuple(x.shape)}")
        self.latent_shape(*x.shape[2:])
        mean, logvar = self.encoder(_channels_last(space_to_depth(x, self.patch_size))).chunk(2, dim=1)
        return mean, logvar.clamp(*LOGVAR_RANGE)

    def decode(self, z: Tensor) -> Tensor:
        if z.dim() != 5 or z.shape[1] != self.latent_channels:
            raise ValueError(f"expected latents (B, {self.latent_channels}, T', H', W'), got {tuple(z.shape)}")
        return depth_to_space(self.decoder(_channels_last(z)), self.patch_size)

    def forward(self, x: Tensor, sample: bool = True) -> tuple[Tensor, Tensor, Tensor]:
        mean, logvar = self.encode(x)
        z = mean + torch.randn_like(mean) * (0.5 * logvar).exp() if sample else mean
        return self.decode(z), mean, logvar


@register("none")
class IdentityVAE(nn.Module):
    """`factor: none`: diffusion directly in pixel space, for debugging. The latent is the video itself.

    encode returns (x, logvar) with a logvar of LOGVAR_RANGE[0] (a variance of ~1e-13), and forward never samples,
    so the round trip is exact.
    """

    spatial_factor = 1
    temporal_factor = 1

    def __init__(self, in_channels: int = 3):
        super().__init__()
        self.in_channels = self.latent_channels = in_channels

    def latent_frames(self, num_frames: int) -> int:
        if num_frames < 1:
            raise ValueError(f"num_frames={num_frames} must be >= 1")
        return num_frames

    def latent_shape(self, num_frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        return self.latent_channels, self.latent_frames(num_frames), height, width

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return x, torch.full_like(x, LOGVAR_RANGE[0])

    def decode(self, z: Tensor) -> Tensor:
        return z

    def forward(self, x: Tensor, sample: bool = True) -> tuple[Tensor, Tensor, Tensor]:
        mean, logvar = self.encode(x)
        return self.decode(mean), mean, logvar


def build_vae(factor: str = "causal", **kwargs) -> nn.Module:
    """The VAE of a `conf/vae` group's `model` fields: `factor: causal` -> CausalVideoVAE, `none` -> IdentityVAE."""
    return lookup(VAES, "vae factor", factor)(**kwargs)


def vae_loss(
    recon: Tensor,
    x: Tensor,
    mean: Tensor,
    logvar: Tensor,
    kl_weight: float,
    recon_loss: str = "l1",
    ssim_weight: float = 0.0,
) -> dict[str, Tensor]:
    """loss = recon + kl_weight * KL (+ ssim_weight * (1 - SSIM)); every term a mean per element.

    Means rather than the sums of Stable Diffusion's VAE make kl_weight independent of the clip and latent sizes.
    KL is that of N(mean, exp(logvar)) from N(0, 1). SSIM is computed per frame on [-1, 1] (data_range 2).

    On sparse content (small shapes on a plain background) "l2" trains far faster than "l1": L1's gradient has the
    same size at every pixel, so the many almost-right background pixels drown out the few wrong shape pixels and
    the model sits near the all-background median (~18 dB after minutes), while L2's vanishes where the error does.
    """
    if recon_loss == "l1":
        rec = (recon - x).abs().mean()
    elif recon_loss == "l2":
        rec = (recon - x).pow(2).mean()
    else:
        raise ValueError(f"recon_loss={recon_loss!r} must be 'l1' or 'l2'")
    kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).mean()
    out = {"recon": rec, "kl": kl, "loss": rec + kl_weight * kl}
    if ssim_weight > 0:
        out["ssim"] = structural_similarity_index_measure(video_frames(recon), video_frames(x), data_range=2.0)
        out["loss"] = out["loss"] + ssim_weight * (1.0 - out["ssim"])
    return out


def video_frames(video: Tensor) -> Tensor:
    """(B, C, T, H, W) -> (B*T, C, H, W), for image losses and metrics applied per frame."""
    b, c, t, h, w = video.shape
    return video.transpose(1, 2).reshape(b * t, c, h, w)
