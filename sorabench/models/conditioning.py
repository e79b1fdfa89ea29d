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
The blocks and final layers the strategies build are in `blocks.py`, the layers those are made of in `layers.py`.

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

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sorabench.models.blocks import (
    AdaLNBlock,
    AdaLNFinalLayer,
    Context,
    CrossAttentionBlock,
    DoubleStreamBlock,
    ExpertAdaLNBlock,
    FinalLayer,
    HybridBlock,
    HybridCond,
    HybridFinalLayer,
    JointCond,
    ModulatedBlock,
    ModulatedCond,
    ModulatedFinalLayer,
    PlainBlock,
    SingleStreamBlock,
)
from sorabench.models.layers import BlockSpec, Mlp, zero_
from sorabench.models.text import TextEmbedding
from sorabench.registry import lookup, registrar


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


class _TextTokens(ConditioningStrategy):
    """Shared by in_context and cross_attention: the text enters as projected tokens (MLP(text tokens)), and t as
    one more token (DiT) or, with `timestep=adaln_zero`, through adaLN-Zero exactly as in adaln_zero
    (`ModulatedBlock`, `ModulatedFinalLayer`, zero-initialised modulations)."""

    timesteps = ("token", "adaln_zero")

    def __init__(self, spec: BlockSpec, text_dim: int, timestep: str | None = None):
        super().__init__(spec)
        self.timestep = self.check_timestep(timestep)
        self.text_proj = Mlp(text_dim, spec.width, spec.width)

    def final_layer(self, out_dim: int) -> nn.Module:
        cls = FinalLayer if self.timestep == "token" else ModulatedFinalLayer
        return cls(self.spec.width, out_dim)

    def initialize(self, blocks: nn.ModuleList, final_layer: nn.Module) -> None:
        super().initialize(blocks, final_layer)
        if self.timestep == "adaln_zero":
            zero_modulations(blocks, final_layer)


@register("in_context")
class InContext(_TextTokens):
    """DiT's in-context conditioning: the timestep token and the projected text tokens are prepended to the
    video tokens and processed like them by plain pre-norm blocks (padded text tokens are never attended to);
    they are dropped before the final layer. With factorised attention they join every frame's spatial
    attention and skip the temporal one (see `SelfAttention`).

    timestep: "token" (DiT: t is the first prepended token) or "adaln_zero" (the text tokens alone are prepended;
    t modulates every block and the final layer through adaLN-Zero, exactly as in adaln_zero)."""

    def forward(self, t_emb: Tensor, text: TextEmbedding):
        if self.timestep == "token":
            return timestep_and_text_tokens(t_emb, self.text_proj(text.tokens), text.mask)
        tokens = Context(self.text_proj(text.tokens), text.mask)
        return ModulatedCond(F.silu(t_emb), None, tokens)

    def block(self) -> nn.Module:
        return PlainBlock(self.spec) if self.timestep == "token" else ModulatedBlock(self.spec)

    def prefix(self, cond) -> Context:
        return cond if self.timestep == "token" else cond.prefix

    def prepend_tokens(self, x: Tensor, cond) -> Tensor:
        return torch.cat([self.prefix(cond).tokens, x], dim=1)

    def drop_tokens(self, x: Tensor, cond) -> Tensor:
        return x[:, self.prefix(cond).tokens.shape[1] :]


@register("cross_attention")
class CrossAttentionConditioning(_TextTokens):
    """DiT's cross-attention variant with text tokens in place of the class: after self-attention every block
    cross-attends to [t; projected text tokens]; the timestep is not injected anywhere else.

    timestep: "token" (DiT: t is one of the attended tokens) or "adaln_zero" (the blocks cross-attend to the text
    tokens alone; t modulates every block and the final layer through adaLN-Zero, as in adaln_zero).
    zero_init_cross_attn: DiT's description has no zero init (default, so the ablation re-implements DiT);
    True starts every cross-attention as a no-op, as PixArt does - offered as an option to ablate.
    """

    def __init__(self, spec: BlockSpec, text_dim: int, zero_init_cross_attn: bool = False, timestep: str | None = None):
        super().__init__(spec, text_dim, timestep)
        self.zero_init_cross_attn = zero_init_cross_attn

    def forward(self, t_emb: Tensor, text: TextEmbedding):
        if self.timestep == "token":
            return timestep_and_text_tokens(t_emb, self.text_proj(text.tokens), text.mask)
        return ModulatedCond(F.silu(t_emb), Context(self.text_proj(text.tokens), text.mask), None)

    def block(self) -> nn.Module:
        if self.timestep == "token":
            return CrossAttentionBlock(self.spec)
        return ModulatedBlock(self.spec, cross_attention=True)

    def initialize(self, blocks: nn.ModuleList, final_layer: nn.Module) -> None:
        super().initialize(blocks, final_layer)
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


class JointSequence(ConditioningStrategy):
    """The base of the joint-sequence strategies (a new one subclasses it): the projected text tokens are prepended to the video tokens and
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
class MMDiT(JointSequence):
    """SD3's MM-DiT (Esser et al. 2024): every block is a double-stream `DoubleStreamBlock`; t + pooled text
    modulate both streams (SD3: t + pooled CLIP). qk_norm: null as SD3, 'rms' as SD3.5."""

    def __init__(self, spec: BlockSpec, text_dim: int, pooled_text: bool = True, qk_norm: str | None = None,
                 timestep: str | None = None):
        super().__init__(spec, text_dim, pooled_text, qk_norm, timestep)

    def block(self) -> nn.Module:
        return DoubleStreamBlock(self.spec, self.qk_norm)


@register("double_single")
class DoubleSingle(JointSequence):
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
class ExpertAdaLN(JointSequence):
    """CogVideoX's expert adaLN (Yang et al. 2024): one joined sequence, shared attention and MLP weights,
    separate shift/scale/gate for text and video tokens. CogVideoX modulates with t alone (pooled_text false)."""

    def __init__(self, spec: BlockSpec, text_dim: int, pooled_text: bool = False, qk_norm: str | None = "layer",
                 timestep: str | None = None):
        super().__init__(spec, text_dim, pooled_text, qk_norm, timestep)

    def block(self) -> nn.Module:
        return ExpertAdaLNBlock(self.spec, self.qk_norm)


# --------------------------------------------------------------------------------------------------------------
# Shared by the strategies
# --------------------------------------------------------------------------------------------------------------


def timestep_and_text_tokens(t_emb: Tensor, text_tokens: Tensor, text_mask: Tensor) -> Context:
    """[t; text tokens], the timestep token always valid (so no query ever sees only padding)."""
    tokens = torch.cat([t_emb.unsqueeze(1), text_tokens], dim=1)
    return Context(tokens, F.pad(text_mask, (1, 0), value=True))


def zero_modulations(blocks: nn.ModuleList, final_layer: nn.Module) -> None:
    """adaLN-Zero: every Linear named *modulation* (blocks and final layer) starts at 0 - gates closed, blocks the
    identity, shift/scale 0."""
    for module in [*blocks.modules(), final_layer]:
        for name, child in module.named_children():
            if "modulation" in name and isinstance(child, nn.Linear):
                zero_(child)


def require_full_attention(spec: BlockSpec, name: str) -> None:
    if spec.attention != "full":
        raise ValueError(f"conditioning={name} attends over the joined text + video sequence: it needs "
                         f"dit.attention=full, got {spec.attention!r}")
