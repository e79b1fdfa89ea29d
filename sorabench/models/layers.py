"""The layers the transformer blocks are built from: modulation, MLP, attention (self, cross, joint) and the
backbone facts every block needs (`BlockSpec`). Shapes: tokens (B, N, D); attention heads (B, H, N, D/H)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True)
class BlockSpec:
    """What every block needs to know about the backbone.

    frames, positions: the video token grid, T' frames of H'·W' positions, in (t, h, w) raster order.
    attention: "full" (joint spacetime attention) or "factorised" (spatial then temporal attention per block).
    """

    width: int
    heads: int
    mlp_ratio: float
    attention: str
    frames: int
    positions: int


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    # 1 + scale, so that a zero modulation leaves the normalised tokens unchanged (DiT).
    return x * (1 + scale) + shift


class Mlp(nn.Module):
    """Linear -> GELU(tanh) -> Linear (the DiT/ViT MLP; also PixArt's caption projection)."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(in_dim, hidden_dim)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden_dim, out_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


def attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
    """SDPA on (B, H, N, d). On the CPU in bf16 it runs in fp32: PyTorch's CPU flash-attention kernel is several
    times slower in bf16 than in fp32 at these shapes, and took more than every bf16 matmul saved (measured per op:
    benchmarks/RESULTS.md, "Precision"). On a GPU, bf16 attention is the fast path and stays."""
    if q.device.type == "cpu" and q.dtype == torch.bfloat16:
        with torch.autocast("cpu", enabled=False):
            return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask).to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


class SelfAttention(nn.Module):
    """Multi-head self-attention with a fused QKV projection, along one axis of the token grid.

    Input x (B, M + T'·S, D): M condition tokens (in-context only, M = 0 otherwise) then the video tokens frame
    by frame; prefix_mask (B, M) bool marks the valid condition tokens (None when M = 0).
      axis "spacetime": every token attends to every valid token (joint attention, the default layout);
      axis "space": video tokens attend within their frame. Condition tokens join every frame's attention (each
          frame sees the whole text), and their own update is the mean of their per-frame updates;
      axis "time": each spatial position attends across the T' frames. Condition tokens have no time axis: their
          update is zero.
    """

    def __init__(self, spec: BlockSpec, axis: str):
        super().__init__()
        self.axis = axis
        self.heads = spec.heads
        self.frames, self.positions = spec.frames, spec.positions
        self.qkv = nn.Linear(spec.width, 3 * spec.width)
        self.proj = nn.Linear(spec.width, spec.width)

    def attend(self, x: Tensor, key_mask: Tensor | None) -> Tensor:
        """Plain attention over the sequence axis of (B, N, D); key_mask (B, N) bool, True = may be attended to."""
        B, N, D = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        mask = None if key_mask is None else key_mask[:, None, None, :]
        x = attention(q, k, v, mask)
        return self.proj(x.transpose(1, 2).reshape(B, N, D))

    def forward(self, x: Tensor, prefix_mask: Tensor | None = None) -> Tensor:
        B, N, D = x.shape
        M = 0 if prefix_mask is None else prefix_mask.shape[1]
        T, S = self.frames, self.positions
        if self.axis == "spacetime":
            key_mask = None if prefix_mask is None else F.pad(prefix_mask, (0, N - M), value=True)
            return self.attend(x, key_mask)
        if self.axis == "space":
            frames = x[:, M:].reshape(B * T, S, D)
            if M == 0:
                return self.attend(frames, None).reshape(B, N, D)
            prefix = x[:, :M].repeat_interleave(T, dim=0)
            key_mask = F.pad(prefix_mask, (0, S), value=True).repeat_interleave(T, dim=0)
            out = self.attend(torch.cat([prefix, frames], dim=1), key_mask)
            return torch.cat([out[:, :M].reshape(B, T, M, D).mean(1), out[:, M:].reshape(B, T * S, D)], dim=1)
        columns = x[:, M:].reshape(B, T, S, D).transpose(1, 2).reshape(B * S, T, D)
        out = self.attend(columns, None).reshape(B, S, T, D).transpose(1, 2).reshape(B, T * S, D)
        return F.pad(out, (0, 0, M, 0))


def self_attention_layers(spec: BlockSpec) -> nn.ModuleList:
    """One joint attention, or (Latte / STDiT) a spatial then a temporal attention; a block applies each as a
    residual sub-layer with the same norm and modulation."""
    if spec.attention == "full":
        return nn.ModuleList([SelfAttention(spec, "spacetime")])
    return nn.ModuleList([SelfAttention(spec, "space"), SelfAttention(spec, "time")])


class CrossAttention(nn.Module):
    """Video tokens (queries, B×N×D) attend to condition tokens (keys/values, B×L×D), padded ones excluded."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(width, width)
        self.kv = nn.Linear(width, 2 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: Tensor, context: Tensor, mask: Tensor) -> Tensor:
        B, N, D = x.shape
        L = context.shape[1]
        q = self.q(x).reshape(B, N, self.heads, D // self.heads).transpose(1, 2)
        k, v = self.kv(context).reshape(B, L, 2, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        x = attention(q, k, v, mask[:, None, None, :])
        return self.proj(x.transpose(1, 2).reshape(B, N, D))


class QKV(nn.Module):
    """Fused Linear(D, 3D) -> q, k, v (B, heads, L, D/heads), with an optional per-head q/k norm: RMSNorm (SD3.5,
    Flux) or LayerNorm (CogVideoX), which keeps attention logits bounded as the model grows."""

    def __init__(self, width: int, heads: int, qk_norm: str | None = None):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        head_dim = width // heads
        norms = {None: nn.Identity, "rms": lambda: nn.RMSNorm(head_dim, eps=1e-6),
                 "layer": lambda: nn.LayerNorm(head_dim, eps=1e-6)}
        if qk_norm not in norms:
            raise ValueError(f"qk_norm must be null, 'rms' or 'layer', got {qk_norm!r}")
        self.q_norm, self.k_norm = norms[qk_norm](), norms[qk_norm]()

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        B, L, D = x.shape
        q, k, v = self.qkv(x).reshape(B, L, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        return self.q_norm(q), self.k_norm(k), v


def joint_attention(q: Tensor, k: Tensor, v: Tensor, text_mask: Tensor) -> Tensor:
    """SDPA over [text; video] (B, H, M + N, d); text_mask (B, M) True = valid; video keys always valid.
    Returns (B, M + N, H·d)."""
    B, H, L, d = q.shape
    key_mask = F.pad(text_mask, (0, L - text_mask.shape[1]), value=True)[:, None, None, :]
    out = attention(q, k, v, key_mask)
    return out.transpose(1, 2).reshape(B, L, H * d)


def zero_(linear: nn.Linear) -> None:
    """Weight and bias to 0: a layer that starts as a no-op (zero gates, zero output projections)."""
    nn.init.zeros_(linear.weight)
    nn.init.zeros_(linear.bias)
