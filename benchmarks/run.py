"""sorabench benchmarks: one command, every figure, one markdown table.

    .venv/bin/python benchmarks/run.py [--quick] [--threads N] [--out benchmarks/RESULTS.md]

Every figure is the median of several timed repeats after warm-up calls. Every comparison (cache vs on-the-fly,
strategy vs strategy) is a ratio of timings taken side by side in this one process: the compared functions are
called round-robin inside each repeat, so a change in machine load hits all of them alike. The model FLOP
utilisation is divided by an fp32 matmul peak measured in the same run, with the same threads.

Models are untrained (speed does not depend on the weights); the text condition is a fixed random embedding of
TEXT_LEN MiniLM-sized tokens (training embeds each caption once and then reads a cache, so the text encoder is not
part of a step). See benchmarks/README.md for what each figure means.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch
from omegaconf import OmegaConf

from sorabench.data.shapes import ShapesConfig, make_split
from sorabench.diffusion import RectifiedFlow
from sorabench.models.dit import DiT, forward_flops
from sorabench.models.text import TextEmbedding
from sorabench.models.vae import build_vae

ROOT = Path(__file__).resolve().parent.parent
CONF = ROOT / "conf"
STRATEGIES = ["in_context", "cross_attention", "adaln_zero", "adaln", "hybrid"]
TEXT_DIM = 384  # MiniLM's width (conf/text_encoder/minilm.yaml)
TEXT_LEN = 16  # word pieces of a typical `shapes` caption with [CLS]/[SEP] (max_length is 32)

# Sizes: full run, and --quick (a smoke check that finishes in well under 30 s on one core).
FULL = dict(
    shapes_clips=10_000, shapes_repeats=3,
    vae_batch=64, vae_repeats=5,
    train_clips=4096, dit_batch=32, cache_steps=8, cache_repeats=5,
    step_repeats=7,
    sample_clips=16, sample_steps=25, sample_repeats=3,
    matmul_n=2048, matmul_repeats=7,
)  # fmt: skip
QUICK = dict(
    shapes_clips=500, shapes_repeats=2,
    vae_batch=8, vae_repeats=2,
    train_clips=64, dit_batch=8, cache_steps=2, cache_repeats=2,
    step_repeats=2,
    sample_clips=2, sample_steps=5, sample_repeats=2,
    matmul_n=512, matmul_repeats=3,
)  # fmt: skip


# ---- timing ---------------------------------------------------------------------------------------------------


@dataclass
class Timing:
    """Seconds of each timed repeat (warm-up calls excluded)."""

    times: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    def spread(self) -> str:
        return f"{min(self.times):.4g}–{max(self.times):.4g} s over {len(self.times)} repeats"


def timeit(fn, repeats: int, warmup: int = 1) -> Timing:
    """Call fn `warmup` times untimed, then `repeats` times timed."""
    return side_by_side({"fn": fn}, repeats, warmup)["fn"]


def side_by_side(fns: dict, repeats: int, warmup: int = 1) -> dict[str, Timing]:
    """Time several functions round-robin: each repeat calls every function once (in a rotated order), so slow
    drifts of the machine's load affect them all alike and their ratio stays meaningful."""
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    out = {name: Timing() for name in names}
    for r in range(repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            t0 = time.perf_counter()
            fns[name]()
            out[name].times.append(time.perf_counter() - t0)
    return out


@dataclass
class Row:
    benchmark: str
    case: str
    value: str
    unit: str
    notes: str = ""


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---- shared builders ------------------------------------------------------------------------------------------


def vae_model_cfg(spatial: int, temporal: int) -> dict:
    model = OmegaConf.to_container(OmegaConf.load(CONF / "vae" / "default.yaml").model)
    return {**model, "spatial_factor": spatial, "temporal_factor": temporal}


def build_dit(strategy: str, latent_shape) -> DiT:
    dit_cfg = OmegaConf.to_container(OmegaConf.load(CONF / "dit" / "tiny.yaml"))
    cond = OmegaConf.to_container(OmegaConf.load(CONF / "conditioning" / f"{strategy}.yaml"))
    cond.pop("name")
    return DiT(tuple(latent_shape), conditioning=strategy, text_dim=TEXT_DIM, max_text_len=32,
               timestep_scale=RectifiedFlow.timestep_scale, **dit_cfg, **cond)


def fake_text(batch: int, seed: int = 0) -> TextEmbedding:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randn(batch, TEXT_LEN, TEXT_DIM, generator=g)
    return TextEmbedding(tokens, torch.ones(batch, TEXT_LEN, dtype=torch.bool), tokens.mean(1))


def train_step_fn(model: DiT, flow: RectifiedFlow, batch: int, get_latents):
    """One DiT training step as DiTModule.training_step + Lightning do it: caption dropout 0.1, flow loss,
    backward, grad-norm clip 1.0, AdamW (conf/train.yaml's lr and betas). `get_latents()` supplies x0."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.99), weight_decay=0.0)
    text = fake_text(batch)
    model.train()

    def step():
        x0 = get_latents()
        drop = torch.rand(batch) < 0.1
        loss = flow.training_loss(model, x0, model.drop_text(text, drop))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    return step


# ---- benchmarks -----------------------------------------------------------------------------------------------


def bench_shapes(s: dict) -> list[Row]:
    n = s["shapes_clips"]
    cfg = ShapesConfig(num_frames=16, split_sizes={"train": n})
    warm = ShapesConfig(num_frames=16, split_sizes={"train": min(n, 256)})
    make_split(warm, "train")  # warm-up on a smaller split: a full-size one would double the cost
    t = timeit(lambda: make_split(cfg, "train"), repeats=s["shapes_repeats"], warmup=0)
    return [Row("1 shapes generation", f"make_split: {n} clips of 16×32×32, train split", f"{n / t.median:,.0f}",
                "clips/s", f"{t.median:.3g} s per split; {t.spread()}")]


def bench_vae(s: dict) -> tuple[list[Row], float]:
    """Encode throughput; also returns ×4/×1 clips/s for the cache break-even in bench 3."""
    rows, base = [], 0.0
    b = s["vae_batch"]
    for spatial, temporal, frames in ((4, 1, 8), (4, 2, 9)):
        vae = build_vae(**vae_model_cfg(spatial, temporal)).eval()
        video = torch.rand(b, 3, frames, 32, 32) * 2 - 1
        with torch.no_grad():
            t = timeit(lambda: vae.encode(video), repeats=s["vae_repeats"], warmup=1)
        latent = vae.latent_shape(frames, 32, 32)
        rate = b / t.median
        base = base or rate
        rows.append(Row("2 VAE encode", f"×{spatial} spatial ×{temporal} temporal, {frames}×32×32 → "
                        f"{'×'.join(map(str, latent))}, batch {b}", f"{rate:,.0f}", "clips/s",
                        f"{t.median * 1e3:.4g} ms per batch; {t.spread()}"))
    return rows, base


def bench_cache(s: dict, encode_rate: float) -> list[Row]:
    """DiT training steps whose latents come from the cache (a precomputed tensor) vs from encoding the rendered
    clips with the VAE every step. Same model, optimiser and steps; only where x0 comes from differs."""
    b, n_clips = s["dit_batch"], s["train_clips"]
    data = make_split(ShapesConfig(split_sizes={"train": n_clips}), "train")  # the default 8×32×32 train split
    vae = build_vae(**vae_model_cfg(4, 1)).eval()
    with torch.no_grad():
        stats = [vae.encode(data.videos[i : i + 64].float() / 127.5 - 1.0) for i in range(0, n_clips, 64)]
    cache_mean = torch.cat([m for m, _ in stats])
    cache_std = torch.cat([(0.5 * lv).exp() for _, lv in stats])
    scale = 1.0  # the trained VAE's scale factor only rescales; it does not change the cost
    g = torch.Generator().manual_seed(0)

    def from_cache():  # LatentDataset: a posterior sample of the cached mean / log-variance
        idx = torch.randint(n_clips, (b,), generator=g)
        return (cache_mean[idx] + cache_std[idx] * torch.randn(cache_mean[idx].shape)) * scale

    def on_the_fly():  # the same posterior sample, but encoded from the clip now
        idx = torch.randint(n_clips, (b,), generator=g)
        with torch.no_grad():
            mean, logvar = vae.encode(data.videos[idx].float() / 127.5 - 1.0)
        return (mean + (0.5 * logvar).exp() * torch.randn(mean.shape)) * scale

    flow = RectifiedFlow()
    latent_shape = cache_mean.shape[1:]
    steps = s["cache_steps"]
    fns = {}
    for name, source in (("cache", from_cache), ("on the fly", on_the_fly)):
        torch.manual_seed(0)
        step = train_step_fn(build_dit("adaln_zero", latent_shape), flow, b, source)
        fns[name] = lambda step=step: [step() for _ in range(steps)]
    t = side_by_side(fns, repeats=s["cache_repeats"], warmup=1)
    per_epoch = max(1, n_clips // b)
    rows = []
    for name, timing in t.items():
        per_step = timing.median / steps
        rows.append(Row("3 DiT epoch: cache vs encode", f"latents {name}: tiny DiT adaLN-Zero, batch {b}, "
                        f"epoch = {per_epoch} steps ({n_clips} clips)", f"{per_step * per_epoch:.4g}", "s/epoch",
                        f"{per_step * 1e3:.4g} ms/step ({steps} steps per repeat); {timing.spread()}"))
    a, o = t["cache"].median / steps, t["on the fly"].median / steps
    build = n_clips / encode_rate if encode_rate else float("nan")
    note = f"encoding costs {(o - a) * 1e3:.4g} ms/step; building the cache once (~{build:.3g} s at bench 2's rate)"
    note += f" pays for itself after ~{build / (o - a):.3g} steps" if o > a else " never pays off here"
    rows.append(Row("3 DiT epoch: cache vs encode", "speed-up of the cache (on-the-fly time / cache time)",
                    f"{o / a:.3g}", "×", note))
    return rows


def bench_matmul_peak(s: dict) -> tuple[Row, float]:
    n = s["matmul_n"]
    a, b = torch.randn(n, n), torch.randn(n, n)
    t = timeit(lambda: torch.mm(a, b), repeats=s["matmul_repeats"], warmup=2)
    peak = 2 * n**3 / t.median
    return Row("4 DiT train step", f"fp32 matmul peak: {n}×{n} @ {n}×{n}", f"{peak / 1e9:,.1f}", "GFLOP/s",
               f"the MFU denominator; {t.spread()}"), peak


def model_tokens(latent_shape: tuple[int, int, int, int]) -> int:
    """Video tokens of the tiny DiT (conf/dit/tiny.yaml's patch size) on a (C, T, H, W) latent."""
    pt, ph, pw = OmegaConf.load(CONF / "dit" / "tiny.yaml").patch_size
    return (latent_shape[1] // pt) * (latent_shape[2] // ph) * (latent_shape[3] // pw)


def bench_strategies(s: dict, peak: float) -> list[Row]:
    b = s["dit_batch"]
    latent_shape = (4, 8, 8, 8)  # 8×32×32 clips through the ×4/×1 VAE
    flow = RectifiedFlow()
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(b, *latent_shape, generator=g)
    fns, info = {}, {}
    for name in STRATEGIES:
        torch.manual_seed(0)
        model = build_dit(name, latent_shape)
        info[name] = (model.num_parameters(), forward_flops(model, text_len=TEXT_LEN))
        fns[name] = train_step_fn(model, flow, b, lambda: x0)
    t = side_by_side(fns, repeats=s["step_repeats"], warmup=2)
    rows = []
    for name in STRATEGIES:
        params, gflops = info[name]
        step = t[name].median
        mfu = 3 * gflops * 1e9 * b / step / peak
        tokens = model_tokens(latent_shape)
        rows.append(Row("4 DiT train step", f"{name}: tiny DiT, {tokens} video tokens, batch {b}, fwd+bwd+AdamW",
                        f"{b / step:,.1f}", "videos/s",
                        f"{step * 1e3:.4g} ms/step; MFU {mfu:.1%} (3 × {gflops:.3g} GFLOPs fwd/clip); "
                        f"{params / 1e6:.2f} M params; {t[name].spread()}"))
    return rows


def bench_sampling(s: dict) -> list[Row]:
    n, steps = s["sample_clips"], s["sample_steps"]
    latent_shape = (4, 8, 8, 8)
    model = build_dit("adaln_zero", latent_shape).eval()
    flow = RectifiedFlow(sample_steps=steps)
    text, null = fake_text(n), model.null_text(n)
    g = torch.Generator().manual_seed(0)
    t = timeit(lambda: flow.sample(model, (n, *latent_shape), text, null, steps=steps, guidance_scale=4.0,
                                   generator=g), repeats=s["sample_repeats"], warmup=1)
    return [Row("5 sampling", f"adaLN-Zero tiny DiT, {steps} Euler steps, CFG 4 (cond+uncond batched), "
                f"{n} clips per call", f"{t.median / n:.4g}", "s/clip",
                f"{t.median:.4g} s per call; VAE decode not included; {t.spread()}")]


# ---- report ---------------------------------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_lines(threads: int, quick: bool) -> list[str]:
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                timeout=5).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        commit = "unknown"
    load = " / ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    return [
        f"CPU: {cpu_model()}",
        f"cores: {os.cpu_count()} logical, {usable} usable by this process",
        f"torch: {torch.__version__}; threads: {threads} (torch.get_num_threads() = {torch.get_num_threads()})",
        f"python: {platform.python_version()}; OS: {platform.system()} {platform.release()}",
        f"load average at start (1 / 5 / 15 min): {load}",
        f"git commit: {commit}; date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M UTC}",
        f"mode: {'--quick (smoke-check sizes: not representative)' if quick else 'full'}",
    ]


def markdown(rows: list[Row], machine: list[str], elapsed: float) -> str:
    lines = ["# sorabench benchmarks", "", "Produced by `.venv/bin/python benchmarks/run.py`; see "
             "`benchmarks/README.md` for what each figure means. Medians of the timed repeats after warm-up; "
             "ratios and MFU are from timings taken side by side in the same process.", "", "## Machine", ""]
    lines += [f"- {m}" for m in machine] + [f"- total benchmark time: {elapsed:.0f} s", "", "## Results", ""]
    lines += ["| benchmark | case | median | unit | notes |", "|---|---|---:|---|---|"]
    lines += [f"| {r.benchmark} | {r.case} | {r.value} | {r.unit} | {r.notes} |" for r in rows]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    try:
        default_threads = len(os.sched_getaffinity(0))
    except AttributeError:
        default_threads = os.cpu_count() or 1
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes and repeats (a smoke check, < 30 s)")
    p.add_argument("--threads", type=int, default=default_threads, help="torch threads (default: all usable cores)")
    p.add_argument("--out", type=Path, default=None, help="also write the table and machine to this markdown file")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    sizes = QUICK if args.quick else FULL
    machine = machine_lines(args.threads, args.quick)
    t0 = time.perf_counter()
    rows: list[Row] = []
    log("1/5 shapes generation ...")
    rows += bench_shapes(sizes)
    log("2/5 VAE encode ...")
    vae_rows, encode_rate = bench_vae(sizes)
    rows += vae_rows
    log("3/5 DiT epoch from the cache vs encoding on the fly ...")
    rows += bench_cache(sizes, encode_rate)
    log("4/5 DiT train step per conditioning strategy ...")
    peak_row, peak = bench_matmul_peak(sizes)
    rows += [peak_row, *bench_strategies(sizes, peak)]
    log("5/5 sampling ...")
    rows += bench_sampling(sizes)
    md = markdown(rows, machine, time.perf_counter() - t0)
    print(md)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(md)
        log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
