"""The transformer blocks and final layers the conditioning strategies build, each beside the condition tuple it
reads. A block is called as `block(x, cond) -> x` on tokens x (B, N, D), a final layer as `final_layer(x, cond) ->
(B, N, out_dim)`; `cond` is what the strategy's `forward` computed once per DiT forward (conditioning.py)."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from sorabench.models.layers import (
    QKV,
    BlockSpec,
    CrossAttention,
    Mlp,
    joint_attention,
    modulate,
    self_attention_layers,
)

# ---- text as condition tokens (in-context, cross-attention) ------------------------------------------------------


class Context(NamedTuple):
    """Condition tokens for in-context or cross-attention: tokens (B, L, D), mask (B, L) bool, True = valid."""

    tokens: Tensor
    mask: Tensor


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


class FinalLayer(nn.Module):
    """LayerNorm -> Linear to the patch values; the condition is not used."""

    def __init__(self, width: int, out_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(width, eps=1e-6)
        self.linear = nn.Linear(width, out_dim)

    def forward(self, x: Tensor, cond) -> Tensor:
        return self.linear(self.norm(x))


# ---- adaptive LayerNorm (DiT's adaLN / adaLN-Zero) ---------------------------------------------------------------


def adaln_modulation(modulation: nn.Linear, c: Tensor, gated: bool) -> tuple:
    """DiT's per-block modulation from c (B, D): shift1, scale1, gate1 (attention) and shift2, scale2, gate2 (MLP),
    each (B, 1, D); without gates (adaLN, 4D outputs) both gates are 1."""
    mod = modulation(c).unsqueeze(1).chunk(6 if gated else 4, dim=-1)
    if gated:
        return mod
    shift1, scale1, shift2, scale2 = mod
    return shift1, scale1, 1.0, shift2, scale2, 1.0


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
        shift1, scale1, gate1, shift2, scale2, gate2 = adaln_modulation(self.modulation, c, self.gated)
        for attn in self.attn:
            x = x + gate1 * attn(modulate(self.norm1(x), shift1, scale1))
        return x + gate2 * self.mlp(modulate(self.norm2(x), shift2, scale2))


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


# ---- PixArt-alpha: cross-attention + adaLN-single ----------------------------------------------------------------


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


# ---- adaLN for t, the text by its own pathway (the `timestep` axis: in_context / cross_attention with adaLN-Zero) --


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
        shift1, scale1, gate1, shift2, scale2, gate2 = adaln_modulation(self.modulation, cond.c, self.gated)
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


# ---- joint text + video sequences (SD3 MM-DiT, Flux, CogVideoX) --------------------------------------------------
# The text tokens are prepended to the video tokens and updated block by block, like in-context tokens; the block
# splits x = [text (B, M, D); video (B, N, D)] by M = cond.text.mask.shape[1]. Every attention runs over the joined
# sequence with the padded text tokens masked out as keys (queries at padding are computed and never read).


class JointCond(NamedTuple):
    """c (B, D): the modulation vector, already through SiLU; text: the projected text tokens and their mask."""

    c: Tensor
    text: Context


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
