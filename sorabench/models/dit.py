"""A diffusion transformer (DiT, Peebles & Xie 2023) over spacetime patches of a video latent.

    latent (B, C, T, H, W) --patchify--> (B, N, C·pt·ph·pw) --Linear--> (B, N, D) + fixed sin-cos position
    --> depth × block(x, cond) --> final layer --> (B, N, C·pt·ph·pw) --unpatchify--> (B, C, T, H, W)

N = T'·H'·W' tokens with T' = T/pt, H' = H/ph, W' = W/pw, in (t, h, w) raster order. How the timestep and the
text enter is entirely the conditioning strategy's business (`conditioning.py`); this file only wires it in.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from sorabench.models.conditioning import build_strategy
from sorabench.models.layers import BlockSpec
from sorabench.models.text import TextEmbedding


def check_patch_size(size: tuple[int, int, int], patch_size: tuple[int, int, int]) -> None:
    if any(s % p for s, p in zip(size, patch_size)):
        raise ValueError(
            f"patch size (p_t, p_h, p_w) = {tuple(patch_size)} does not divide the latent (T, H, W) = {tuple(size)}"
        )


def patchify(x: Tensor, patch_size: tuple[int, int, int]) -> Tensor:
    """(B, C, T, H, W) -> (B, T'·H'·W', C·pt·ph·pw): one token per spacetime patch, patch values in (c, t, h, w)
    order (the order a Conv3d weight is flattened in)."""
    B, C, T, H, W = x.shape
    check_patch_size((T, H, W), patch_size)
    pt, ph, pw = patch_size
    x = x.reshape(B, C, T // pt, pt, H // ph, ph, W // pw, pw)
    x = x.permute(0, 2, 4, 6, 1, 3, 5, 7)  # B, T', H', W', C, pt, ph, pw
    return x.reshape(B, (T // pt) * (H // ph) * (W // pw), C * pt * ph * pw)


def unpatchify(tokens: Tensor, patch_size: tuple[int, int, int], latent_shape: tuple[int, int, int, int]) -> Tensor:
    """The exact inverse of `patchify`: (B, T'·H'·W', C·pt·ph·pw) -> (B, C, T, H, W)."""
    C, T, H, W = latent_shape
    pt, ph, pw = patch_size
    x = tokens.reshape(tokens.shape[0], T // pt, H // ph, W // pw, C, pt, ph, pw)
    x = x.permute(0, 4, 1, 5, 2, 6, 3, 7)  # B, C, T', pt, H', ph, W', pw
    return x.reshape(tokens.shape[0], C, T, H, W)


def sincos_1d(dim: int, positions: Tensor) -> Tensor:
    """(n,) integer positions -> (n, dim) [sin | cos] features at geometric frequencies (DiT / MAE)."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim // 2))
    angles = positions.double()[:, None] * omega[None]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def sincos_3d(width: int, grid: tuple[int, int, int]) -> Tensor:
    """Fixed position embedding (T'·H'·W', width), factorised over the axes: the channels are split into a time
    part (~1/4: there are few frames) and equal height and width parts, each a 1D sin-cos embedding, concatenated
    (DiT's 2D embedding extended by a time axis)."""
    dim_t = 2 * (width // 8)
    dim_h = 2 * ((width - dim_t) // 4)
    dim_w = width - dim_t - dim_h
    t, h, w = torch.meshgrid(*(torch.arange(n) for n in grid), indexing="ij")
    parts = [sincos_1d(dim_t, t.flatten()), sincos_1d(dim_h, h.flatten()), sincos_1d(dim_w, w.flatten())]
    return torch.cat(parts, dim=1).float()


class TimestepEmbedder(nn.Module):
    """Scalar timesteps (B,) -> (B, width), as DiT: 256 sinusoidal features -> Linear -> SiLU -> Linear.

    `scale` maps the diffusion's time units onto the ~[0, 1000] range the frequencies are designed for:
    1000 for flow matching (t in [0, 1]), 1 for DDPM (integer steps 0..999 as floats)."""

    def __init__(self, width: int, scale: float, frequency_dim: int = 256):
        super().__init__()
        self.scale = scale
        half = frequency_dim // 2
        self.register_buffer("freqs", torch.exp(-math.log(10000) * torch.arange(half) / half), persistent=False)
        self.mlp = nn.Sequential(nn.Linear(frequency_dim, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, t: Tensor) -> Tensor:
        args = (t.float() * self.scale)[:, None] * self.freqs[None]
        return self.mlp(torch.cat([args.cos(), args.sin()], dim=1))


class DiT(nn.Module):
    """Text-conditioned video DiT. Predicts, for a noisy latent x (B, C, T, H, W) at timesteps t (B,), a tensor
    of x's shape (velocity, ε or v - whatever the diffusion objective trains it on).

    conditioning: the registered strategy's name (in_context, cross_attention, adaln_zero, adaln, hybrid, ...);
        `conditioning_kwargs` are its options (conf/conditioning/<name>.yaml minus `name`).
    attention: "full" joint spacetime attention, or "factorised" spatial-then-temporal attention in every block.
    text_dim: width of the text encoder's tokens and pooled vector; max_text_len: the most text tokens accepted.
    timestep_scale: see `TimestepEmbedder`; pass the diffusion's `timestep_scale`.

    Classifier-free guidance: the model owns a learned null condition (one null token and a null pooled vector in
    text space, std 0.02). It is applied *outside* `forward`, by two helpers:
      `drop_text(text, drop)` - training: rows where drop (B,) is True are replaced by the null condition;
      `null_text(batch_size)` - sampling: the unconditional input to pair with the text in `diffusion.sample`.
    The null token is one valid token followed by padding, so it is the same condition at any padded length.
    """

    def __init__(
        self,
        latent_shape: tuple[int, int, int, int],
        patch_size: tuple[int, int, int] = (1, 2, 2),
        width: int = 128,
        depth: int = 4,
        heads: int = 4,
        mlp_ratio: float = 4.0,
        attention: str = "full",
        conditioning: str = "adaln_zero",
        text_dim: int = 384,
        max_text_len: int = 32,
        timestep_scale: float = 1000.0,
        **conditioning_kwargs,
    ):
        super().__init__()
        self.latent_shape = tuple(int(s) for s in latent_shape)
        self.patch_size = tuple(int(p) for p in patch_size)
        C, T, H, W = self.latent_shape
        check_patch_size((T, H, W), self.patch_size)
        if width % heads or width % 2:
            raise ValueError(f"width {width} must be even and divisible by heads {heads}")
        if attention not in ("full", "factorised"):
            raise ValueError(f"attention must be 'full' or 'factorised', got {attention!r}")
        pt, ph, pw = self.patch_size
        grid = (T // pt, H // ph, W // pw)
        patch_dim = C * pt * ph * pw
        self.text_dim = text_dim
        self.max_text_len = max_text_len

        self.patch_embed = nn.Linear(patch_dim, width)
        self.register_buffer("pos_embed", sincos_3d(width, grid), persistent=False)
        self.t_embedder = TimestepEmbedder(width, timestep_scale)
        spec = BlockSpec(width, heads, mlp_ratio, attention, frames=grid[0], positions=grid[1] * grid[2])
        self.conditioning = build_strategy(conditioning, spec, text_dim, **conditioning_kwargs)
        self.blocks = self.conditioning.blocks(depth)
        self.final_layer = self.conditioning.final_layer(patch_dim)
        self.null_tokens = nn.Parameter(torch.randn(1, text_dim) * 0.02)
        self.null_pooled = nn.Parameter(torch.randn(text_dim) * 0.02)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        # Generic (facebookresearch/DiT): xavier-uniform Linear weights and zero biases everywhere - the patch
        # embedding is a Linear on flattened patches, i.e. DiT's xavier on the flattened Conv weight - and a
        # normal(0.02) timestep MLP; then the strategy's own inits (zero gates, zero output layers, ...).
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        self.conditioning.initialize(self.blocks, self.final_layer)

    def forward(self, x: Tensor, t: Tensor, text: TextEmbedding) -> Tensor:
        """x (B, C, T, H, W), t (B,) float timesteps in the diffusion's units, text with B rows -> x's shape."""
        if x.shape[1:] != self.latent_shape:
            raise ValueError(f"expected latents (B, *{self.latent_shape}), got {tuple(x.shape)}")
        if text.tokens.shape[1] > self.max_text_len:
            raise ValueError(f"{text.tokens.shape[1]} text tokens exceed max_text_len={self.max_text_len}")
        tokens = self.patch_embed(patchify(x, self.patch_size)) + self.pos_embed
        cond = self.conditioning(self.t_embedder(t), text)
        tokens = self.conditioning.prepend_tokens(tokens, cond)
        for block in self.blocks:
            tokens = block(tokens, cond)
        tokens = self.conditioning.drop_tokens(tokens, cond)
        return unpatchify(self.final_layer(tokens, cond), self.patch_size, self.latent_shape)

    def null_text(self, batch_size: int) -> TextEmbedding:
        """The learned unconditional input, (batch_size, 1 token)."""
        tokens = self.null_tokens.expand(batch_size, 1, -1)
        mask = torch.ones(batch_size, 1, dtype=torch.bool, device=tokens.device)
        return TextEmbedding(tokens, mask, self.null_pooled.expand(batch_size, -1))

    def drop_text(self, text: TextEmbedding, drop: Tensor) -> TextEmbedding:
        """Caption dropout for classifier-free guidance: rows where drop (B,) bool is True get the null condition."""
        null = self.null_text(len(text)).pad_to(text.tokens.shape[1])
        return TextEmbedding(
            torch.where(drop[:, None, None], null.tokens, text.tokens),
            torch.where(drop[:, None], null.mask, text.mask),
            torch.where(drop[:, None], null.pooled, text.pooled),
        )

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def forward_flops(model: DiT, batch_size: int = 1, text_len: int | None = None) -> float:
    """GFLOPs of one forward pass per clip (a multiply-add counts 2), counted by torch's FlopCounterMode on dummy
    inputs with `text_len` valid text tokens (default `max_text_len`). Matmuls and attention are counted;
    elementwise ops (norms, activations) are not, as in the DiT paper's Gflops. Attention runs on the math
    backend here because the counter has no formula for the CPU flash kernel (it would count attention as 0)."""
    p = next(model.parameters())
    length = text_len or model.max_text_len
    x = torch.zeros(batch_size, *model.latent_shape, device=p.device, dtype=p.dtype)
    t = torch.full((batch_size,), 0.5, device=p.device)
    text = TextEmbedding(
        torch.zeros(batch_size, length, model.text_dim, device=p.device, dtype=p.dtype),
        torch.ones(batch_size, length, dtype=torch.bool, device=p.device),
        torch.zeros(batch_size, model.text_dim, device=p.device, dtype=p.dtype),
    )
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(x, t, text)
    return counter.get_total_flops() / batch_size / 1e9


def caption_flops(model: DiT, text_lengths) -> float:
    """Forward GFLOPs per clip at the data's real caption lengths: the mean over captions of `forward_flops` at each
    caption's own token count (`text_lengths`, e.g. `TextEmbedding.mask.sum(1)` over a split). This is the one
    figure the training log (`model/gflops`), the FLOP budget (`budget=flops`), the report and benchmarks/ use:
    counting at `max_text_len` would charge in-context and cross-attention for padding tokens a caption does not
    have. Lengths above `max_text_len` are clipped to it (the encoder truncates them)."""
    lengths = torch.as_tensor(list(text_lengths)).long().clamp(1, model.max_text_len)
    if lengths.numel() == 0:
        raise ValueError("caption_flops needs at least one caption length")
    values, counts = lengths.unique(return_counts=True)  # a few distinct lengths: one count each
    total = sum(int(c) * forward_flops(model, text_len=int(v)) for v, c in zip(values, counts))
    return total / lengths.numel()
