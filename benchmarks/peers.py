"""Benchmarks 6 and 7: sorabench's DiT against diffusers' implementations of the same architectures, side by side.

Benchmarks 4 and 5 say how fast sorabench's DiT trains and samples; whether that is fast needs a reference. diffusers'
DiTTransformer2DModel (DiT, adaLN-Zero) and LatteTransformer3DModel (Latte: PixArt-style adaLN-single timestep and
cross-attention text, factorised space/time attention) are the widely used implementations of what sorabench builds
as `adaln_zero` and as `hybrid` with factorised attention.

Held equal: the latents, the loss (RectifiedFlow.training_loss, the same code for both models), the optimiser,
clipping and autocast (`harness.optimizer_step_fn`), and the sampler's arithmetic (Euler, CFG 4, cond + uncond in
one forward of 2B). Only the model differs; each ratio row's notes say how. diffusers is the optional [bench] extra.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import pairwise
from types import ModuleType
from typing import Any

import harness
import torch
from harness import (
    TEXT_DIM,
    Row,
    achieved_flops,
    build_dit,
    fake_text,
    optimizer_step_fn,
    side_by_side,
    train_step_fn,
)
from torch import Tensor, nn

from sorabench.diffusion import ModelFn, RectifiedFlow

TRAIN = "6 vs diffusers: train step"
SAMPLE = "7 vs diffusers: sampling"
CHANNELS = 4  # latent channels (the ×4/×1 VAE's)
GUIDANCE = 4.0  # conf/train.yaml's sample.guidance_scale
NULL_CLASS = 1000  # the extra row of diffusers' DiT label table: its unconditional input
TIME_SCALE = RectifiedFlow.timestep_scale  # t in [0, 1] -> diffusers' 0-1000 timesteps, as sorabench's embedder

# "2d": DiT sizes (one-frame latents), "3d": the Latte-style size; sampling uses the first "2d" size and "3d".
# Training repeats follow 2 warm-up calls, sampling repeats 1.
PEER_SIZES = {
    "full": {
        "2d": [
            {"name": "tiny", "width": 128, "depth": 4, "heads": 4, "frames": 1, "size": 16, "patch": 2, "batch": 32},
            {"name": "DiT-S/2", "width": 384, "depth": 12, "heads": 6, "frames": 1, "size": 32, "patch": 2, "batch": 8},
        ],
        "3d": {"name": "tiny", "width": 128, "depth": 4, "heads": 4, "frames": 8, "size": 16, "patch": 2, "batch": 8},
        "train_repeats": 5,
        "sample_steps": 25,
        "sample_clips": 16,
        "sample_repeats": 3,
    },
    "quick": {
        "2d": [{"name": "quick", "width": 64, "depth": 2, "heads": 2, "frames": 1, "size": 8, "patch": 2, "batch": 4}],
        "3d": {"name": "quick", "width": 64, "depth": 2, "heads": 2, "frames": 4, "size": 8, "patch": 2, "batch": 2},
        "train_repeats": 2,
        "sample_steps": 3,
        "sample_clips": 2,
        "sample_repeats": 2,
    },
}

DIT_DIFFERENCES = (
    "same loss, optimiser and clipping; the conditioning differs: sorabench's adaLN input is t + MLP(pooled text), "
    "computed once per forward (10% caption dropout), diffusers' is t + a class-label table (10% label dropout), "
    "recomputed in every block, each block owning its own timestep MLP and table (hence more parameters); "
    "diffusers also has separate q/k/v projections and a Conv2d patch embedding"
)
LATTE_DIFFERENCES = (
    "both PixArt-style (adaLN-single t, cross-attention text, factorised space/time attention), but a Latte layer is "
    "a spatial block (self-attn, cross-attn, MLP) plus a temporal block (self-attn, MLP), two MLPs per layer, where "
    "a sorabench factorised block has spatial attn, temporal attn, cross-attn and one MLP: Latte does more FLOPs per "
    "clip, so the FLOP/s ratio is the like-for-like efficiency comparison; sorabench drops 10% of captions, Latte "
    "none; no text masks (the fake text has no padding)"
)


@dataclass
class Contender:
    """One model behind diffusion.py's ModelFn interface - fn(x (B, C, T, H, W), t in [0, 1], cond) -> x's shape -
    so that one loss, one sampler arithmetic and one FLOP count serve both libraries' calling conventions."""

    label: str
    model: nn.Module
    fn: ModelFn
    cond: Any  # a batch of conditions
    null: Any  # the unconditional input for classifier-free guidance, same batch


def import_diffusers() -> ModuleType | None:
    try:
        import diffusers
    except ImportError:
        return None
    return diffusers


def skipped(benchmark: str) -> list[Row]:
    return [
        Row(benchmark, "sorabench vs diffusers", "skipped", "", "diffusers is not installed: pip install -e .[bench]")
    ]


def latent_shape(c: dict) -> tuple[int, int, int, int]:
    return (CHANNELS, c["frames"], c["size"], c["size"])


def describe(c: dict) -> str:
    grid = c["size"] // c["patch"]
    frames = f"{c['frames']}×" if c["frames"] > 1 else ""
    return (
        f"{c['name']}, width {c['width']}, depth {c['depth']}, {c['frames'] * grid**2} tokens "
        f"({frames}{c['size']}×{c['size']} latent, patch {c['patch']})"
    )


def our_dit(strategy: str, c: dict, **options) -> nn.Module:
    torch.manual_seed(0)
    patch = (1, c["patch"], c["patch"])
    return build_dit(strategy, latent_shape(c), width=c["width"], depth=c["depth"], heads=c["heads"], patch_size=patch,
                     **options)


def diffusers_size(c: dict) -> dict:
    """The size arguments diffusers' DiT and Latte share, for the size `c` of sorabench's model."""
    heads, width = c["heads"], c["width"]
    return {"num_attention_heads": heads, "attention_head_dim": width // heads, "in_channels": CHANNELS,
            "out_channels": CHANNELS, "num_layers": c["depth"], "sample_size": c["size"], "patch_size": c["patch"]}


def dit_pair(diffusers: ModuleType, c: dict, batch: int) -> dict[str, Contender]:
    """sorabench's adaLN-Zero DiT on one-frame latents and diffusers' class-conditional DiT of the same size."""
    ours = our_dit("adaln_zero", c)
    torch.manual_seed(0)
    theirs = diffusers.DiTTransformer2DModel(**diffusers_size(c), norm_eps=1e-6).to(harness.DEVICE)
    labels = torch.randint(NULL_CLASS, (batch,), generator=torch.Generator().manual_seed(0)).to(harness.DEVICE)

    null = torch.full_like(labels, NULL_CLASS)

    def fn(x: Tensor, t: Tensor, y: Tensor) -> Tensor:  # diffusers' DiT takes images (B, C, H, W)
        return theirs(x[:, :, 0], timestep=t * TIME_SCALE, class_labels=y, return_dict=False)[0].unsqueeze(2)

    return {
        "sorabench": Contender("sorabench DiT adaLN-Zero", ours, ours, fake_text(batch), ours.null_text(batch)),
        "diffusers": Contender("diffusers DiTTransformer2DModel", theirs, fn, labels, null),
    }


def latte_pair(diffusers: ModuleType, c: dict, batch: int) -> dict[str, Contender]:
    """sorabench's hybrid (PixArt) DiT with factorised attention and diffusers' Latte of the same size."""
    ours = our_dit("hybrid", c, attention="factorised")
    torch.manual_seed(0)
    theirs = diffusers.LatteTransformer3DModel(
        **diffusers_size(c),
        cross_attention_dim=c["width"],
        attention_bias=True,
        activation_fn="gelu-approximate",
        norm_type="ada_norm_single",
        norm_elementwise_affine=False,
        norm_eps=1e-6,
        caption_channels=TEXT_DIM,
        video_length=c["frames"],
    ).to(harness.DEVICE)
    text = fake_text(batch)
    null = torch.zeros_like(text.tokens)  # Latte has no learned null caption: zero tokens

    def fn(x: Tensor, t: Tensor, tokens: Tensor) -> Tensor:  # no mask: diffusers 0.42's Latte fails on one
        return theirs(x, timestep=t * TIME_SCALE, encoder_hidden_states=tokens, return_dict=False)[0]

    return {
        "sorabench": Contender("sorabench DiT hybrid, factorised attention", ours, ours, text, ours.null_text(batch)),
        "diffusers": Contender("diffusers LatteTransformer3DModel", theirs, fn, text.tokens, null),
    }


def one_clip(c: Contender, x: Tensor) -> tuple[Tensor, Tensor, Any]:
    return x[:1], torch.full((1,), 0.5, device=harness.DEVICE), c.cond[:1]


def check_prediction(c: Contender, x: Tensor) -> None:
    """Before timing: the prediction must have the latent's shape (the MSE would broadcast a wrong one silently)."""
    x, t, cond = one_clip(c, x)
    with torch.no_grad():
        out = c.fn(x, t, cond)
    if out.shape != x.shape:
        raise RuntimeError(f"{c.label} predicts {tuple(out.shape)} for a latent of {tuple(x.shape)}")


def forward_gflops(c: Contender, x: Tensor) -> float:
    """GFLOPs of one clip's forward, counted the same way for both libraries."""
    return achieved_flops(c.fn, *one_clip(c, x)) / 1e9


def params_m(model: nn.Module) -> float:
    return sum(p.numel() for p in model.parameters()) / 1e6


def train_pair(pair: dict[str, Contender], c: dict, repeats: int, peak: float, differences: str) -> list[Row]:
    """Both models trained round-robin on the same fixed latents: sorabench by DiTModule's step (`train_step_fn`),
    diffusers by the same loss and optimiser on its own conditions (its DiT drops labels itself in train mode)."""
    b = c["batch"]
    x0 = torch.randn(b, *latent_shape(c), generator=torch.Generator().manual_seed(0)).to(harness.DEVICE)
    flow = RectifiedFlow()
    for contender in pair.values():
        check_prediction(contender, x0)
    gflops = {name: forward_gflops(contender, x0) for name, contender in pair.items()}
    theirs = pair["diffusers"]
    timings = side_by_side(
        {
            "sorabench": train_step_fn(pair["sorabench"].model, flow, b, lambda: x0),
            "diffusers": optimizer_step_fn(theirs.model, lambda: flow.training_loss(theirs.fn, x0, theirs.cond)),
        },
        repeats,
        warmup=2,
    )
    desc = f"{describe(c)}, batch {b}"
    rows, flop_rate = [], {}
    for name, contender in pair.items():
        step = timings[name].median
        flop_rate[name] = 3 * gflops[name] * 1e9 * b / step  # fwd + bwd ≈ 3 forwards
        rows.append(Row(
            TRAIN, f"{contender.label}: {desc}, fwd+bwd+AdamW", f"{b / step:,.1f}", "videos/s",
            f"{step * 1e3:.4g} ms/step; {params_m(contender.model):.2f} M params; "
            f"MFU {flop_rate[name] / peak:.1%} (3 × {gflops[name]:.3g} GFLOPs fwd/clip); {timings[name].spread()}",
        ))  # fmt: skip
    speed = timings["diffusers"].median / timings["sorabench"].median  # = the ratio of videos/s
    rows.append(Row(
        TRAIN, f"sorabench / diffusers: {desc}", f"{speed:.3g}", "×",
        f"videos/s ratio; achieved model FLOP/s ratio {flop_rate['sorabench'] / flop_rate['diffusers']:.3g} "
        f"({flop_rate['sorabench'] / 1e9:,.1f} vs {flop_rate['diffusers'] / 1e9:,.1f} GFLOP/s); {differences}",
    ))  # fmt: skip
    return rows


def bench_peer_training(sizes: dict, peak: float) -> list[Row]:
    """Training-step throughput of sorabench vs diffusers: each 2D DiT size, then the 3D Latte-style size."""
    diffusers = import_diffusers()
    if diffusers is None:
        return skipped(TRAIN)
    rows = []
    for c in sizes["2d"]:
        rows += train_pair(dit_pair(diffusers, c, c["batch"]), c, sizes["train_repeats"], peak, DIT_DIFFERENCES)
    c = sizes["3d"]
    rows += train_pair(latte_pair(diffusers, c, c["batch"]), c, sizes["train_repeats"], peak, LATTE_DIFFERENCES)
    return rows


@torch.no_grad()
def euler_cfg(
    fn: ModelFn, shape: tuple[int, ...], cond: Tensor, null: Tensor, steps: int, generator: torch.Generator
) -> Tensor:
    """RectifiedFlow.sample's arithmetic (shift 1, guidance 4, cond + uncond in one forward of 2B), written out bare
    for a diffusers model: no pipeline and no scheduler object, so any overhead of those is not counted."""
    x = torch.randn(shape, generator=generator, device=harness.DEVICE)
    both = torch.cat([cond, null])
    ts = torch.linspace(1, 0, steps + 1, dtype=torch.float64).tolist()
    for t, t_next in pairwise(ts):
        c, u = fn(torch.cat([x, x]), torch.full((2 * shape[0],), t, device=harness.DEVICE), both).chunk(2)
        x = x + (t_next - t) * (u + GUIDANCE * (c - u))
    return x


def sample_pair(pair: dict[str, Contender], c: dict, n: int, steps: int, repeats: int) -> list[Row]:
    """Both samplers round-robin in eval mode, drawing their initial noise from one seeded generator."""
    ours, theirs = pair["sorabench"], pair["diffusers"]
    shape = (n, *latent_shape(c))
    for contender in pair.values():
        check_prediction(contender, torch.zeros(shape, device=harness.DEVICE))
        contender.model.eval()
    flow = RectifiedFlow(sample_steps=steps)
    g = torch.Generator(harness.DEVICE).manual_seed(0)
    timings = side_by_side(
        {
            "sorabench": lambda: flow.sample(
                ours.model, shape, ours.cond, ours.null, steps=steps, guidance_scale=GUIDANCE, generator=g
            ),
            "diffusers": lambda: euler_cfg(theirs.fn, shape, theirs.cond, theirs.null, steps, g),
        },
        repeats,
        warmup=1,
    )
    desc = f"{describe(c)}, {n} clips per call, {steps} Euler steps, CFG {GUIDANCE:g} (cond + uncond batched)"
    rows = []
    for name, contender in pair.items():
        t = timings[name]
        rows.append(Row(
            SAMPLE, f"{contender.label}: {desc}", f"{t.median / n:.4g}", "s/clip",
            f"{t.median:.4g} s per call of {n} clips; VAE decode not included; {t.spread()}",
        ))  # fmt: skip
    rows.append(Row(
        SAMPLE, f"diffusers time / sorabench time: {desc}",
        f"{timings['diffusers'].median / timings['sorabench'].median:.3g}", "×",
        "> 1: sorabench is faster; sorabench runs its real sampler (RectifiedFlow.sample), diffusers a bare Euler "
        "loop with the same arithmetic and no pipeline or scheduler overhead, which favours diffusers",
    ))  # fmt: skip
    return rows


def bench_peer_sampling(sizes: dict) -> list[Row]:
    """Seconds per clip of guided Euler sampling, sorabench's real sampler vs a bare loop around diffusers' model,
    for the first 2D DiT size and the 3D Latte-style size, with `sample_clips` clips per call."""
    diffusers = import_diffusers()
    if diffusers is None:
        return skipped(SAMPLE)
    n, steps, repeats = sizes["sample_clips"], sizes["sample_steps"], sizes["sample_repeats"]
    return [
        *sample_pair(dit_pair(diffusers, sizes["2d"][0], n), sizes["2d"][0], n, steps, repeats),
        *sample_pair(latte_pair(diffusers, sizes["3d"], n), sizes["3d"], n, steps, repeats),
    ]
