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
and of current text-to-video DiTs, on one joined [text; video] sequence whose text tokens are updated through depth:
  mmdit            SD3's MM-DiT: per-modality QKV/MLP/modulation, one joint attention
  double_single    Flux / HunyuanVideo / Open-Sora 2.0: double-stream (MM-DiT) blocks, then single-stream blocks
  expert_adaln     CogVideoX: shared attention and MLP, separate text/video shift/scale/gate

Two axes: the strategy is how the text enters; its `timestep` option how t enters (`adaln_zero` modulation or a
`token`), each name's default being its paper's coupling (`ConditioningStrategy.timesteps`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sorabench.models.text import TextEmbedding
from sorabench.registry import lookup, registrar


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


# ---- joint text + video sequences (SD3 MM-DiT, Flux, CogVideoX) ----------------------------------------------
# The text tokens are prepended to the video tokens and updated block by block, like in-context tokens; the block
# splits x = [text (B, M, D); video (B, N, D)] by M = cond.mask.shape[1]. Every attention runs over the joined
# sequence with the padded text tokens masked out as keys (queries at padding are computed and never read).


class JointCond(NamedTuple):
    """c (B, D): the modulation vector, already through SiLU; text: the projected text tokens and their mask."""

    c: Tensor
    text: Context


def require_full_attention(spec: BlockSpec, name: str) -> None:
    if spec.attention != "full":
        raise ValueError(f"conditioning={name} attends over the joined text + video sequence: it needs "
                         f"dit.attention=full, got {spec.attention!r}")


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


class DoubleStreamBlock(nn.Module):
    """SD3's MM-DiT block (= Flux's double-stream block): text and video keep their own adaLN-Zero modulation,
    QKV, output projection and MLP; their queries, keys and values are concatenated into one attention, so
    information flows both ways, and the text stream is updated block by block. Same layout as diffusers'
    `JointTransformerBlock` / `FluxTransformerBlock` (checked against them in tests/test_parity.py)."""

    def __init__(self, spec: BlockSpec, qk_norm: str | None = None):
        super().__init__()
        D, hidden = spec.width, int(spec.width * spec.mlp_ratio)
        self.norm = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)  # no parameters: shared by both streams
        self.modulation, self.context_modulation = nn.Linear(D, 6 * D), nn.Linear(D, 6 * D)
        self.attn, self.context_attn = QKV(D, spec.heads, qk_norm), QKV(D, spec.heads, qk_norm)
        self.proj, self.context_proj = nn.Linear(D, D), nn.Linear(D, D)
        self.mlp, self.context_mlp = Mlp(D, hidden, D), Mlp(D, hidden, D)

    def forward(self, x: Tensor, cond: JointCond) -> Tensor:
        M = cond.text.mask.shape[1]
        txt, vid = x[:, :M], x[:, M:]
        v1, v_scale1, v_gate1, v2, v_scale2, v_gate2 = self.modulation(cond.c).unsqueeze(1).chunk(6, dim=-1)
        t1, t_scale1, t_gate1, t2, t_scale2, t_gate2 = self.context_modulation(cond.c).unsqueeze(1).chunk(6, dim=-1)
        qt, kt, vt = self.context_attn(modulate(self.norm(txt), t1, t_scale1))
        qv, kv, vv = self.attn(modulate(self.norm(vid), v1, v_scale1))
        out = joint_attention(torch.cat([qt, qv], 2), torch.cat([kt, kv], 2), torch.cat([vt, vv], 2), cond.text.mask)
        vid = vid + v_gate1 * self.proj(out[:, M:])
        txt = txt + t_gate1 * self.context_proj(out[:, :M])
        vid = vid + v_gate2 * self.mlp(modulate(self.norm(vid), v2, v_scale2))
        txt = txt + t_gate2 * self.context_mlp(modulate(self.norm(txt), t2, t_scale2))
        return torch.cat([txt, vid], dim=1)


class SingleStreamBlock(nn.Module):
    """Flux's single-stream block: one set of weights for the joined [text; video] sequence; attention and MLP
    run in parallel from one adaLN-Zero-modulated norm, and one Linear maps [attention out; MLP hidden] back to D
    (as diffusers' `FluxSingleTransformerBlock`; the attention has no output projection of its own)."""

    def __init__(self, spec: BlockSpec, qk_norm: str | None = "rms"):
        super().__init__()
        D, hidden = spec.width, int(spec.width * spec.mlp_ratio)
        self.norm = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
        self.modulation = nn.Linear(D, 3 * D)
        self.attn = QKV(D, spec.heads, qk_norm)
        self.mlp_in = nn.Linear(D, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.proj = nn.Linear(D + hidden, D)

    def forward(self, x: Tensor, cond: JointCond) -> Tensor:
        shift, scale, gate = self.modulation(cond.c).unsqueeze(1).chunk(3, dim=-1)
        h = modulate(self.norm(x), shift, scale)
        attn = joint_attention(*self.attn(h), cond.text.mask)
        return x + gate * self.proj(torch.cat([attn, self.act(self.mlp_in(h))], dim=-1))


class ExpertAdaLNBlock(nn.Module):
    """CogVideoX's block: the joined [text; video] sequence goes through one attention and one MLP with shared
    weights; each of the two norms is followed by "expert" modulation - separate shift/scale/gate for the text and
    for the video tokens, regressed from c. LayerNorms are affine (eps 1e-5) and q/k are LayerNorm-ed, as in
    diffusers' `CogVideoXBlock` / `CogVideoXLayerNormZero`."""

    def __init__(self, spec: BlockSpec, qk_norm: str | None = "layer"):
        super().__init__()
        D = spec.width
        self.norm1, self.norm2 = nn.LayerNorm(D, eps=1e-5), nn.LayerNorm(D, eps=1e-5)
        self.modulation1, self.modulation2 = nn.Linear(D, 6 * D), nn.Linear(D, 6 * D)
        self.attn = QKV(D, spec.heads, qk_norm)
        self.proj = nn.Linear(D, D)
        self.mlp = Mlp(D, int(D * spec.mlp_ratio), D)

    @staticmethod
    def expert_modulate(x: Tensor, M: int, mod: Tensor) -> tuple[Tensor, Tensor]:
        """x (B, M + N, D) normalised; mod (B, 1, 6D) = video (shift, scale, gate), text (shift, scale, gate)."""
        shift, scale, gate, t_shift, t_scale, t_gate = mod.chunk(6, dim=-1)
        h = torch.cat([modulate(x[:, :M], t_shift, t_scale), modulate(x[:, M:], shift, scale)], dim=1)
        gates = torch.cat([t_gate.expand(-1, M, -1), gate.expand(-1, x.shape[1] - M, -1)], dim=1)
        return h, gates

    def forward(self, x: Tensor, cond: JointCond) -> Tensor:
        M = cond.text.mask.shape[1]
        h, gate = self.expert_modulate(self.norm1(x), M, self.modulation1(cond.c).unsqueeze(1))
        x = x + gate * self.proj(joint_attention(*self.attn(h), cond.text.mask))
        h, gate = self.expert_modulate(self.norm2(x), M, self.modulation2(cond.c).unsqueeze(1))
        return x + gate * self.mlp(h)


# ---- the timestep pathway held equal ---------------------------------------------------------------------------


class ModulatedCond(NamedTuple):
    """c (B, D) after SiLU for the modulation; text: the projected text tokens for cross-attention (or None);
    prefix: condition tokens in the sequence (in-context text, or the timestep token), or None."""

    c: Tensor
    text: Context | None
    prefix: Context | None


class ModulatedBlock(nn.Module):
    """A DiT block whose norms are modulated by c (adaLN; gated = adaLN-Zero) while the text enters by its own
    pathway: as prefix tokens in the sequence (in-context; padding masked), or by cross-attention after the
    self-attention (pre-norm, DiT's cross-attention block). With c = SiLU(t_emb) this is how the existing text
    pathways see the timestep through adaLN-Zero, exactly as adaln_zero does, so only the text pathway differs."""

    def __init__(self, spec: BlockSpec, gated: bool = True, cross_attention: bool = False):
        super().__init__()
        self.gated = gated
        self.norm1 = nn.LayerNorm(spec.width, elementwise_affine=False, eps=1e-6)
        self.attn = self_attention_layers(spec)
        self.cross_norm = nn.LayerNorm(spec.width, eps=1e-6) if cross_attention else None
        self.cross_attn = CrossAttention(spec.width, spec.heads) if cross_attention else None
        self.norm2 = nn.LayerNorm(spec.width, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(spec.width, int(spec.width * spec.mlp_ratio), spec.width)
        self.modulation = nn.Linear(spec.width, (6 if gated else 4) * spec.width)

    def forward(self, x: Tensor, cond: ModulatedCond) -> Tensor:
        mod = self.modulation(cond.c).unsqueeze(1).chunk(6 if self.gated else 4, dim=-1)
        if self.gated:
            shift1, scale1, gate1, shift2, scale2, gate2 = mod
        else:
            (shift1, scale1, shift2, scale2), gate1, gate2 = mod, 1.0, 1.0
        prefix_mask = None if cond.prefix is None else cond.prefix.mask
        for attn in self.attn:
            x = x + gate1 * attn(modulate(self.norm1(x), shift1, scale1), prefix_mask)
        if self.cross_attn is not None:
            x = x + self.cross_attn(self.cross_norm(x), cond.text.tokens, cond.text.mask)
        return x + gate2 * self.mlp(modulate(self.norm2(x), shift2, scale2))


class ModulatedFinalLayer(AdaLNFinalLayer):
    """DiT's adaLN final layer, reading c from a `ModulatedCond` or `JointCond`."""

    def forward(self, x: Tensor, cond) -> Tensor:
        return super().forward(x, cond.c)


# --------------------------------------------------------------------------------------------------------------
# The interface and the registry
# --------------------------------------------------------------------------------------------------------------


class ConditioningStrategy(nn.Module):
    """Base class; a strategy's own parameters (text projections, ...) live in it. See the module docstring.

    `timesteps`: how the timestep may enter with this text pathway, the first being the strategy's own (its
    paper's coupling, what its name has always meant); `check_timestep` turns any other into a one-line error."""

    timesteps: tuple[str, ...] = ()

    def __init__(self, spec: BlockSpec):
        super().__init__()
        self.spec = spec

    def check_timestep(self, timestep: str | None) -> str:
        timestep = timestep or self.timesteps[0]
        if timestep not in self.timesteps:
            raise ValueError(f"conditioning.timestep={timestep!r} is not available for {type(self).__name__}; "
                             f"choose one of {list(self.timesteps)}")
        return timestep

    def forward(self, t_emb: Tensor, text: TextEmbedding):
        raise NotImplementedError

    def block(self) -> nn.Module:
        raise NotImplementedError

    def blocks(self, depth: int) -> nn.ModuleList:
        """The backbone's `depth` blocks; a strategy whose blocks differ with depth (Flux: double-stream, then
        single-stream) overrides this instead of `block`."""
        return nn.ModuleList(self.block() for _ in range(depth))

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


register = registrar(STRATEGIES, "conditioning strategy")  # @register("name"): `conditioning=<name>`


def build_strategy(name: str, spec: BlockSpec, text_dim: int, **options) -> ConditioningStrategy:
    return lookup(STRATEGIES, "conditioning", name)(spec, text_dim, **options)


def strategy_label(name: str, timestep: str | None = None) -> str:
    """What a run is called in reports: the strategy's name, plus `+t=<timestep>` when the timestep does not enter
    the strategy's own way (so `in_context` still means DiT's in-context, `in_context+t=adaln_zero` the variant)."""
    cls = STRATEGIES.get(name)
    if timestep is None or cls is None or not cls.timesteps or timestep == cls.timesteps[0]:
        return name
    return f"{name}+t={timestep}"


# --------------------------------------------------------------------------------------------------------------
# The strategies
# --------------------------------------------------------------------------------------------------------------


@register("in_context")
class InContext(ConditioningStrategy):
    """DiT's in-context conditioning: the timestep token and the projected text tokens are prepended to the
    video tokens and processed like them by plain pre-norm blocks (padded text tokens are never attended to);
    they are dropped before the final layer. With factorised attention they join every frame's spatial
    attention and skip the temporal one (see `SelfAttention`).

    timestep: "token" (DiT: t is the first prepended token) or "adaln_zero" (the text tokens alone are prepended;
    t modulates every block and the final layer through adaLN-Zero, exactly as in adaln_zero)."""

    timesteps = ("token", "adaln_zero")

    def __init__(self, spec: BlockSpec, text_dim: int, timestep: str | None = None):
        super().__init__(spec)
        self.timestep = self.check_timestep(timestep)
        self.text_proj = Mlp(text_dim, spec.width, spec.width)

    def forward(self, t_emb: Tensor, text: TextEmbedding):
        if self.timestep == "token":
            return timestep_and_text_tokens(t_emb, self.text_proj(text.tokens), text.mask)
        tokens = Context(self.text_proj(text.tokens), text.mask)
        return ModulatedCond(F.silu(t_emb), None, tokens)

    def block(self) -> nn.Module:
        return PlainBlock(self.spec) if self.timestep == "token" else ModulatedBlock(self.spec)

    def final_layer(self, out_dim: int) -> nn.Module:
        return FinalLayer(self.spec.width, out_dim) if self.timestep == "token" else ModulatedFinalLayer(
            self.spec.width, out_dim)

    def prefix(self, cond) -> Context:
        return cond if self.timestep == "token" else cond.prefix

    def prepend_tokens(self, x: Tensor, cond) -> Tensor:
        return torch.cat([self.prefix(cond).tokens, x], dim=1)

    def drop_tokens(self, x: Tensor, cond) -> Tensor:
        return x[:, self.prefix(cond).tokens.shape[1] :]

    def initialize(self, blocks: nn.ModuleList, final_layer: nn.Module) -> None:
        super().initialize(blocks, final_layer)
        if self.timestep == "adaln_zero":
            zero_modulations(blocks, final_layer)


@register("cross_attention")
class CrossAttentionConditioning(ConditioningStrategy):
    """DiT's cross-attention variant with text tokens in place of the class: after self-attention every block
    cross-attends to [t; projected text tokens]; the timestep is not injected anywhere else.

    timestep: "token" (DiT: t is one of the attended tokens) or "adaln_zero" (the blocks cross-attend to the text
    tokens alone; t modulates every block and the final layer through adaLN-Zero, as in adaln_zero).
    zero_init_cross_attn: DiT's description has no zero init (default, so the ablation re-implements DiT);
    True starts every cross-attention as a no-op, as PixArt does - offered as an option to ablate.
    """

    timesteps = ("token", "adaln_zero")

    def __init__(self, spec: BlockSpec, text_dim: int, zero_init_cross_attn: bool = False, timestep: str | None = None):
        super().__init__(spec)
        self.timestep = self.check_timestep(timestep)
        self.zero_init_cross_attn = zero_init_cross_attn
        self.text_proj = Mlp(text_dim, spec.width, spec.width)

    def forward(self, t_emb: Tensor, text: TextEmbedding):
        if self.timestep == "token":
            return timestep_and_text_tokens(t_emb, self.text_proj(text.tokens), text.mask)
        return ModulatedCond(F.silu(t_emb), Context(self.text_proj(text.tokens), text.mask), None)

    def block(self) -> nn.Module:
        if self.timestep == "token":
            return CrossAttentionBlock(self.spec)
        return ModulatedBlock(self.spec, cross_attention=True)

    def final_layer(self, out_dim: int) -> nn.Module:
        return FinalLayer(self.spec.width, out_dim) if self.timestep == "token" else ModulatedFinalLayer(
            self.spec.width, out_dim)

    def initialize(self, blocks: nn.ModuleList, final_layer: nn.Module) -> None:
        super().initialize(blocks, final_layer)
        if self.timestep == "adaln_zero":
            zero_modulations(blocks, final_layer)
        if self.zero_init_cross_attn:
            for block in blocks:
                zero_(block.cross_attn.proj)


class _AdaLN(ConditioningStrategy):
    """c = SiLU(t_emb + MLP(pooled text)), computed once and shared by all blocks and the final layer.

    timestep: "adaln_zero" (DiT: t is added to the pooled text in c) or "token" (c = SiLU(MLP(pooled text))
    only; t enters as one token prepended to the video tokens, dropped before the final layer)."""

    gated: bool
    timesteps = ("adaln_zero", "token")

    def __init__(self, spec: BlockSpec, text_dim: int, timestep: str | None = None):
        super().__init__(spec)
        self.timestep = self.check_timestep(timestep)
        self.text_proj = Mlp(text_dim, spec.width, spec.width)

    def forward(self, t_emb: Tensor, text: TextEmbedding):
        if self.timestep == "adaln_zero":
            return F.silu(t_emb + self.text_proj(text.pooled))
        t_token = Context(t_emb.unsqueeze(1), torch.ones(len(t_emb), 1, dtype=torch.bool, device=t_emb.device))
        return ModulatedCond(F.silu(self.text_proj(text.pooled)), None, t_token)

    def block(self) -> nn.Module:
        if self.timestep == "adaln_zero":
            return AdaLNBlock(self.spec, gated=self.gated)
        return ModulatedBlock(self.spec, gated=self.gated)

    def final_layer(self, out_dim: int) -> nn.Module:
        cls = AdaLNFinalLayer if self.timestep == "adaln_zero" else ModulatedFinalLayer
        return cls(self.spec.width, out_dim)

    def prepend_tokens(self, x: Tensor, cond) -> Tensor:
        return x if self.timestep == "adaln_zero" else torch.cat([cond.prefix.tokens, x], dim=1)

    def drop_tokens(self, x: Tensor, cond) -> Tensor:
        return x if self.timestep == "adaln_zero" else x[:, 1:]


@register("adaln_zero")
class AdaLNZero(_AdaLN):
    """DiT's adaLN-Zero: per-block shift/scale/gate regressed from c; the modulation Linears (weight and bias),
    the final adaLN and the final linear are zero-initialised, so every block is the identity at init and the
    output is exactly zero (facebookresearch/DiT `initialize_weights`)."""

    gated = True

    def initialize(self, blocks: nn.ModuleList, final_layer: nn.Module) -> None:
        super().initialize(blocks, final_layer)
        zero_modulations(blocks, final_layer)


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
    zero (zero_init_cross_attn), so text enters gradually. Its text pathway is cross_attention's; with
    `cross_attention` + `timestep=adaln_zero` the two differ only in how t enters (adaLN-single vs adaLN-Zero)."""

    timesteps = ("adaln_single",)

    def __init__(self, spec: BlockSpec, text_dim: int, zero_init_cross_attn: bool = True, timestep: str | None = None):
        super().__init__(spec)
        self.check_timestep(timestep)
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


def zero_modulations(blocks: nn.ModuleList, final_layer: nn.Module) -> None:
    """adaLN-Zero: every Linear named *modulation* (blocks and final layer) starts at 0 - gates closed, blocks the
    identity, shift/scale 0."""
    for module in [*blocks.modules(), final_layer]:
        for name, child in module.named_children():
            if "modulation" in name and isinstance(child, nn.Linear):
                zero_(child)


class _JointSequence(ConditioningStrategy):
    """Shared by the joint-sequence strategies: the projected text tokens are prepended to the video tokens and
    dropped before the final layer (as in-context), and c = SiLU(t_emb [+ MLP(pooled text)]) drives every block's
    modulation and DiT's adaLN final layer. Every modulation Linear and the final layer are zero-initialised
    (adaLN-Zero: each block starts as the identity for both streams, the output at exactly 0).

    timestep: "adaln_zero" (SD3, Flux, CogVideoX: t in c) or "token" (t is one more, always valid, token in front
    of the text stream; c = SiLU(MLP(pooled text)), or 0 without pooled text - the modulations then learn
    constant shift/scale/gate through their biases, as adaLN-single's table)."""

    timesteps = ("adaln_zero", "token")

    def __init__(self, spec: BlockSpec, text_dim: int, pooled_text: bool, qk_norm: str | None, timestep: str | None):
        super().__init__(spec)
        require_full_attention(spec, type(self).__name__)
        self.timestep = self.check_timestep(timestep)
        self.qk_norm = qk_norm
        self.text_proj = Mlp(text_dim, spec.width, spec.width)
        self.pooled_proj = Mlp(text_dim, spec.width, spec.width) if pooled_text else None

    def forward(self, t_emb: Tensor, text: TextEmbedding) -> JointCond:
        tokens = Context(self.text_proj(text.tokens), text.mask)
        pooled = 0.0 if self.pooled_proj is None else self.pooled_proj(text.pooled)
        if self.timestep == "adaln_zero":
            return JointCond(F.silu(t_emb + pooled), tokens)
        c = F.silu(pooled + torch.zeros_like(t_emb))
        return JointCond(c, timestep_and_text_tokens(t_emb, tokens.tokens, tokens.mask))

    def final_layer(self, out_dim: int) -> nn.Module:
        return ModulatedFinalLayer(self.spec.width, out_dim)

    def prepend_tokens(self, x: Tensor, cond: JointCond) -> Tensor:
        return torch.cat([cond.text.tokens, x], dim=1)

    def drop_tokens(self, x: Tensor, cond: JointCond) -> Tensor:
        return x[:, cond.text.tokens.shape[1] :]

    def initialize(self, blocks: nn.ModuleList, final_layer: nn.Module) -> None:
        super().initialize(blocks, final_layer)
        zero_modulations(blocks, final_layer)


@register("mmdit")
class MMDiT(_JointSequence):
    """SD3's MM-DiT (Esser et al. 2024): every block is a double-stream `DoubleStreamBlock`; t + pooled text
    modulate both streams (SD3: t + pooled CLIP). qk_norm: null as SD3, 'rms' as SD3.5."""

    def __init__(self, spec: BlockSpec, text_dim: int, pooled_text: bool = True, qk_norm: str | None = None,
                 timestep: str | None = None):
        super().__init__(spec, text_dim, pooled_text, qk_norm, timestep)

    def block(self) -> nn.Module:
        return DoubleStreamBlock(self.spec, self.qk_norm)


@register("double_single")
class DoubleSingle(_JointSequence):
    """Flux / HunyuanVideo / Open-Sora 2.0: `double_blocks` double-stream blocks, then single-stream blocks over
    the joined sequence for the rest of the depth (Flux: 19 + 38; default round(depth / 3), at least 1)."""

    def __init__(self, spec: BlockSpec, text_dim: int, double_blocks: int | None = None, pooled_text: bool = True,
                 qk_norm: str | None = "rms", timestep: str | None = None):
        super().__init__(spec, text_dim, pooled_text, qk_norm, timestep)
        self.double_blocks = double_blocks

    def blocks(self, depth: int) -> nn.ModuleList:
        n = max(1, round(depth / 3)) if self.double_blocks is None else int(self.double_blocks)
        if not 0 <= n <= depth:
            raise ValueError(f"conditioning.double_blocks={n} must be between 0 and dit.depth={depth}")
        return nn.ModuleList([DoubleStreamBlock(self.spec, self.qk_norm) for _ in range(n)]
                             + [SingleStreamBlock(self.spec, self.qk_norm) for _ in range(depth - n)])


@register("expert_adaln")
class ExpertAdaLN(_JointSequence):
    """CogVideoX's expert adaLN (Yang et al. 2024): one joined sequence, shared attention and MLP weights,
    separate shift/scale/gate for text and video tokens. CogVideoX modulates with t alone (pooled_text false)."""

    def __init__(self, spec: BlockSpec, text_dim: int, pooled_text: bool = False, qk_norm: str | None = "layer",
                 timestep: str | None = None):
        super().__init__(spec, text_dim, pooled_text, qk_norm, timestep)

    def block(self) -> nn.Module:
        return ExpertAdaLNBlock(self.spec, self.qk_norm)
