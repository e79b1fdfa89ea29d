"""Conditioning strategies: how the timestep and the text enter the diffusion transformer.

A strategy decides three things, and the backbone (`dit.py`) knows nothing else about it:
1. `forward(t_emb, text) -> cond`: what is computed once per DiT forward from the timestep embedding (B, D) and the
   text (tokens (B, L, Dtext), mask (B, L) True = valid, pooled (B, Dtext)); `cond` goes unchanged to every block
   and to the final layer, so no block recomputes anything shared;
2. `block()`: the transformer block it builds, called as `block(x, cond) -> x` on video tokens x (B, N, D);
3. `final_layer(out_dim)`: called as `final_layer(x, cond) -> (B, N, out_dim)`; and `prepend_tokens` /
   `drop_tokens`, which add condition tokens in front of the sequence before the first block and remove them
   before the final layer (in-context conditioning only; identity otherwise).
`initialize(blocks, final_layer)` applies the strategy's own initialisation after the backbone's generic one
(xavier-uniform Linear weights, zero biases).

Strategies register by name with `@register("name")`; `build_strategy(name, spec, text_dim, **options)` makes one.
A new strategy is one class - in any file, e.g. a test - plus `conf/conditioning/<name>.yaml` with `name: <name>`.

The five strategies of the ablation (DiT, Peebles & Xie 2023, Sec. 3.2; PixArt-alpha; Open-Sora):
  in_context       [t; text tokens] prepended to the video tokens, plain pre-norm blocks
  cross_attention  blocks cross-attend to [t; text tokens] after self-attention; t enters nowhere else
  adaln_zero       t + pooled text regress per-block shift/scale/gate; zero-initialised (every block = identity)
  adaln            the same without gates or zero init (DiT's "adaLN" variant)
  hybrid           cross-attention for text + adaLN-single for t (PixArt-alpha / Open-Sora)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sorabench.models.text import TextEmbedding


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


# --------------------------------------------------------------------------------------------------------------
# Layers the blocks are built from
# --------------------------------------------------------------------------------------------------------------


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
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
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
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :])
        return self.proj(x.transpose(1, 2).reshape(B, N, D))


def zero_(linear: nn.Linear) -> None:
    nn.init.zeros_(linear.weight)
    nn.init.zeros_(linear.bias)


class Context(NamedTuple):
    """Condition tokens for in-context or cross-attention: tokens (B, L, D), mask (B, L) bool, True = valid."""

    tokens: Tensor
    mask: Tensor


def timestep_and_text_tokens(t_emb: Tensor, text_tokens: Tensor, text_mask: Tensor) -> Context:
    """[t; text tokens], the timestep token always valid (so no query ever sees only padding)."""
    tokens = torch.cat([t_emb.unsqueeze(1), text_tokens], dim=1)
    return Context(tokens, F.pad(text_mask, (1, 0), value=True))


# --------------------------------------------------------------------------------------------------------------
# Blocks and final layers
# --------------------------------------------------------------------------------------------------------------


class PlainBlock(nn.Module):
    """Pre-norm transformer block; the condition enters only as tokens in the sequence (in-context)."""

    def __init__(self, spec: BlockSpec):
        super().__init__()
        self.norm1 = nn.LayerNorm(spec.width, eps=1e-6)
        self.attn = self_attention_layers(spec)
        self.norm2 = nn.LayerNorm(spec.width, eps=1e-6)
        self.mlp = Mlp(spec.width, int(spec.width * spec.mlp_ratio), spec.width)

    def forward(self, x: Tensor, cond: Context) -> Tensor:
        for attn in self.attn:
            x = x + attn(self.norm1(x), cond.mask)
        return x + self.mlp(self.norm2(x))


class CrossAttentionBlock(nn.Module):
    """Pre-norm block with cross-attention to the condition tokens between self-attention and MLP."""

    def __init__(self, spec: BlockSpec):
        super().__init__()
        self.norm1 = nn.LayerNorm(spec.width, eps=1e-6)
        self.attn = self_attention_layers(spec)
        self.norm2 = nn.LayerNorm(spec.width, eps=1e-6)
        self.cross_attn = CrossAttention(spec.width, spec.heads)
        self.norm3 = nn.LayerNorm(spec.width, eps=1e-6)
        self.mlp = Mlp(spec.width, int(spec.width * spec.mlp_ratio), spec.width)

    def forward(self, x: Tensor, cond: Context) -> Tensor:
        for attn in self.attn:
            x = x + attn(self.norm1(x))
        x = x + self.cross_attn(self.norm2(x), cond.tokens, cond.mask)
        return x + self.mlp(self.norm3(x))


class AdaLNBlock(nn.Module):
    """DiT block with adaptive LayerNorm: the condition vector c regresses shift and scale of both norms, and
    (gated, adaLN-Zero) a gate on each residual branch. LayerNorms have no affine parameters: the modulation
    replaces them."""

    def __init__(self, spec: BlockSpec, gated: bool):
        super().__init__()
        self.gated = gated
        self.norm1 = nn.LayerNorm(spec.width, elementwise_affine=False, eps=1e-6)
        self.attn = self_attention_layers(spec)
        self.norm2 = nn.LayerNorm(spec.width, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(spec.width, int(spec.width * spec.mlp_ratio), spec.width)
        self.modulation = nn.Linear(spec.width, (6 if gated else 4) * spec.width)

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        """c: (B, D), already passed through SiLU by the strategy (once, not per block)."""
        mod = self.modulation(c).unsqueeze(1).chunk(6 if self.gated else 4, dim=-1)
        if self.gated:
            shift1, scale1, gate1, shift2, scale2, gate2 = mod
        else:
            (shift1, scale1, shift2, scale2), gate1, gate2 = mod, 1.0, 1.0
        for attn in self.attn:
            x = x + gate1 * attn(modulate(self.norm1(x), shift1, scale1))
        return x + gate2 * self.mlp(modulate(self.norm2(x), shift2, scale2))


class HybridCond(NamedTuple):
    t_emb: Tensor  # (B, D) the timestep embedding, for the final layer
    t_mod: Tensor  # (B, 6, D) the shared adaLN-single modulation
    text: Context  # projected text tokens for cross-attention


class HybridBlock(nn.Module):
    """PixArt-alpha block: adaLN-single modulation (shared t projection + this block's learned table), then
    self-attention, cross-attention to the text, MLP. As in PixArt, the cross-attention query is not normalised."""

    def __init__(self, spec: BlockSpec):
        super().__init__()
        self.norm1 = nn.LayerNorm(spec.width, elementwise_affine=False, eps=1e-6)
        self.attn = self_attention_layers(spec)
        self.cross_attn = CrossAttention(spec.width, spec.heads)
        self.norm2 = nn.LayerNorm(spec.width, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(spec.width, int(spec.width * spec.mlp_ratio), spec.width)
        self.scale_shift_table = nn.Parameter(torch.randn(6, spec.width) / spec.width**0.5)

    def forward(self, x: Tensor, cond: HybridCond) -> Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = (self.scale_shift_table + cond.t_mod).chunk(6, dim=1)
        for attn in self.attn:
            x = x + gate1 * attn(modulate(self.norm1(x), shift1, scale1))
        x = x + self.cross_attn(x, cond.text.tokens, cond.text.mask)
        return x + gate2 * self.mlp(modulate(self.norm2(x), shift2, scale2))


class FinalLayer(nn.Module):
    """LayerNorm -> Linear to the patch values; the condition is not used."""

    def __init__(self, width: int, out_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(width, eps=1e-6)
        self.linear = nn.Linear(width, out_dim)

    def forward(self, x: Tensor, cond) -> Tensor:
        return self.linear(self.norm(x))


class AdaLNFinalLayer(nn.Module):
    """DiT's final layer: adaLN (shift, scale from c) -> Linear to the patch values."""

    def __init__(self, width: int, out_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.modulation = nn.Linear(width, 2 * width)
        self.linear = nn.Linear(width, out_dim)

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift, scale = self.modulation(c).unsqueeze(1).chunk(2, dim=-1)
        return self.linear(modulate(self.norm(x), shift, scale))


class HybridFinalLayer(nn.Module):
    """PixArt's T2IFinalLayer: shift, scale = learned table (2, D) + the timestep embedding."""

    def __init__(self, width: int, out_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.scale_shift_table = nn.Parameter(torch.randn(2, width) / width**0.5)
        self.linear = nn.Linear(width, out_dim)

    def forward(self, x: Tensor, cond: HybridCond) -> Tensor:
        shift, scale = (self.scale_shift_table + cond.t_emb.unsqueeze(1)).chunk(2, dim=1)
        return self.linear(modulate(self.norm(x), shift, scale))


# --------------------------------------------------------------------------------------------------------------
# The interface and the registry
# --------------------------------------------------------------------------------------------------------------


class ConditioningStrategy(nn.Module):
    """Base class; a strategy's own parameters (text projections, ...) live in it. See the module docstring."""

    def __init__(self, spec: BlockSpec):
        super().__init__()
        self.spec = spec

    def forward(self, t_emb: Tensor, text: TextEmbedding):
        raise NotImplementedError

    def block(self) -> nn.Module:
        raise NotImplementedError

    def final_layer(self, out_dim: int) -> nn.Module:
        raise NotImplementedError

    def prepend_tokens(self, x: Tensor, cond) -> Tensor:
        return x

    def drop_tokens(self, x: Tensor, cond) -> Tensor:
        return x

    def initialize(self, blocks: nn.ModuleList, final_layer: nn.Module) -> None:
        # As DiT's initialize_weights: a zero output layer, so the model starts by predicting 0 (the target's mean).
        zero_(final_layer.linear)


STRATEGIES: dict[str, type[ConditioningStrategy]] = {}


def register(name: str):
    """Class decorator: make a strategy selectable as `conditioning=<name>`."""

    def add(cls: type[ConditioningStrategy]) -> type[ConditioningStrategy]:
        if name in STRATEGIES:
            raise ValueError(f"conditioning strategy {name!r} is already registered ({STRATEGIES[name].__name__})")
        STRATEGIES[name] = cls
        return cls

    return add


def build_strategy(name: str, spec: BlockSpec, text_dim: int, **options) -> ConditioningStrategy:
    if name not in STRATEGIES:
        raise ValueError(f"unknown conditioning {name!r}; registered: {sorted(STRATEGIES)}")
    return STRATEGIES[name](spec, text_dim, **options)


# --------------------------------------------------------------------------------------------------------------
# The strategies
# --------------------------------------------------------------------------------------------------------------


@register("in_context")
class InContext(ConditioningStrategy):
    """DiT's in-context conditioning: the timestep token and the projected text tokens are prepended to the
    video tokens and processed like them by plain pre-norm blocks (padded text tokens are never attended to);
    they are dropped before the final layer. With factorised attention they join every frame's spatial
    attention and skip the temporal one (see `SelfAttention`)."""

    def __init__(self, spec: BlockSpec, text_dim: int):
        super().__init__(spec)
        self.text_proj = Mlp(text_dim, spec.width, spec.width)

    def forward(self, t_emb: Tensor, text: TextEmbedding) -> Context:
        return timestep_and_text_tokens(t_emb, self.text_proj(text.tokens), text.mask)

    def block(self) -> nn.Module:
        return PlainBlock(self.spec)

    def final_layer(self, out_dim: int) -> nn.Module:
        return FinalLayer(self.spec.width, out_dim)

    def prepend_tokens(self, x: Tensor, cond: Context) -> Tensor:
        return torch.cat([cond.tokens, x], dim=1)

    def drop_tokens(self, x: Tensor, cond: Context) -> Tensor:
        return x[:, cond.tokens.shape[1] :]


@register("cross_attention")
class CrossAttentionConditioning(ConditioningStrategy):
    """DiT's cross-attention variant with text tokens in place of the class: after self-attention every block
    cross-attends to [t; projected text tokens]; the timestep is not injected anywhere else.

    zero_init_cross_attn: DiT's description has no zero init (default, so the ablation re-implements DiT);
    True starts every cross-attention as a no-op, as PixArt does - offered as an option to ablate.
    """

    def __init__(self, spec: BlockSpec, text_dim: int, zero_init_cross_attn: bool = False):
        super().__init__(spec)
        self.zero_init_cross_attn = zero_init_cross_attn
        self.text_proj = Mlp(text_dim, spec.width, spec.width)

    def forward(self, t_emb: Tensor, text: TextEmbedding) -> Context:
        return timestep_and_text_tokens(t_emb, self.text_proj(text.tokens), text.mask)

    def block(self) -> nn.Module:
        return CrossAttentionBlock(self.spec)

    def final_layer(self, out_dim: int) -> nn.Module:
        return FinalLayer(self.spec.width, out_dim)

    def initialize(self, blocks: nn.ModuleList, final_layer: nn.Module) -> None:
        super().initialize(blocks, final_layer)
        if self.zero_init_cross_attn:
            for block in blocks:
                zero_(block.cross_attn.proj)


class _AdaLN(ConditioningStrategy):
    """c = SiLU(t_emb + MLP(pooled text)), computed once and shared by all blocks and the final layer."""

    gated: bool

    def __init__(self, spec: BlockSpec, text_dim: int):
        super().__init__(spec)
        self.text_proj = Mlp(text_dim, spec.width, spec.width)

    def forward(self, t_emb: Tensor, text: TextEmbedding) -> Tensor:
        return F.silu(t_emb + self.text_proj(text.pooled))

    def block(self) -> nn.Module:
        return AdaLNBlock(self.spec, gated=self.gated)

    def final_layer(self, out_dim: int) -> nn.Module:
        return AdaLNFinalLayer(self.spec.width, out_dim)


@register("adaln_zero")
class AdaLNZero(_AdaLN):
    """DiT's adaLN-Zero: per-block shift/scale/gate regressed from c; the modulation Linears (weight and bias),
    the final adaLN and the final linear are zero-initialised, so every block is the identity at init and the
    output is exactly zero (facebookresearch/DiT `initialize_weights`)."""

    gated = True

    def initialize(self, blocks: nn.ModuleList, final_layer: nn.Module) -> None:
        super().initialize(blocks, final_layer)
        for block in blocks:
            zero_(block.modulation)
        zero_(final_layer.modulation)


@register("adaln")
class AdaLN(_AdaLN):
    """DiT's adaLN variant: shift/scale regressed from c, no gates; the block modulations keep the generic xavier
    init. The final linear is zero-initialised like every strategy's (DiT's `initialize_weights` does it for all
    its variants), so adaLN starts predicting 0 like the others: a random output layer would be a handicap that
    has nothing to do with how the condition enters."""

    gated = False


@register("hybrid")
class Hybrid(ConditioningStrategy):
    """PixArt-alpha / Open-Sora: text by cross-attention, timestep by adaLN-single - one shared
    SiLU -> Linear(D, 6D) of t_emb for all blocks, plus a learned (6, D) table per block. As PixArt: the shared
    t projection is normal(0.02)-initialised, the cross-attention output projections and the final linear are
    zero (zero_init_cross_attn), so text enters gradually."""

    def __init__(self, spec: BlockSpec, text_dim: int, zero_init_cross_attn: bool = True):
        super().__init__(spec)
        self.zero_init_cross_attn = zero_init_cross_attn
        self.text_proj = Mlp(text_dim, spec.width, spec.width)
        self.t_block = nn.Linear(spec.width, 6 * spec.width)

    def forward(self, t_emb: Tensor, text: TextEmbedding) -> HybridCond:
        t_mod = self.t_block(F.silu(t_emb)).unflatten(1, (6, self.spec.width))
        return HybridCond(t_emb, t_mod, Context(self.text_proj(text.tokens), text.mask))

    def block(self) -> nn.Module:
        return HybridBlock(self.spec)

    def final_layer(self, out_dim: int) -> nn.Module:
        return HybridFinalLayer(self.spec.width, out_dim)

    def initialize(self, blocks: nn.ModuleList, final_layer: nn.Module) -> None:
        super().initialize(blocks, final_layer)
        nn.init.normal_(self.t_block.weight, std=0.02)
        if self.zero_init_cross_attn:
            for block in blocks:
                zero_(block.cross_attn.proj)
