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
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import harness
import lightning as L
import torch
from harness import CAPTION_LENGTHS, CONF, ROOT, TEXT_LEN, Row, autocast, build_dit, fake_text, log, side_by_side, timeit, train_step_fn
from omegaconf import OmegaConf

from sorabench.data.shapes import ShapesConfig, make_split
from sorabench.diffusion import RectifiedFlow
from sorabench.models.dit import caption_flops
from sorabench.models.vae import build_vae
from sorabench.tracking import quiet_libraries

STRATEGIES = ["in_context", "cross_attention", "adaln_zero", "adaln", "hybrid"]

# Sizes: full run, and --quick (a smoke check that finishes in well under 30 s on one core).
FULL = dict(
    shapes_clips=10_000, shapes_repeats=3,
    vae_batch=64, vae_repeats=5,
    train_clips=4096, dit_batch=32, cache_steps=8, cache_repeats=5,
    step_repeats=7,
    sample_clips=16, sample_steps=25, sample_repeats=3,
    matmul_n=2048, matmul_repeats=7,
    compile=True, compile_repeats=7,
    loop_batch=16, loop_clips=4096, loop_steps=320, loop_order=["cold", "before", "warm", "before", "warm"],
    grid_seeds=[0, 1], grid_steps=300, grid_workers=2, grid_strategies=None, grid_data=[],
    stacked_k=3, stacked_repeats=15,
    end_to_end=True,
)  # fmt: skip
QUICK = dict(
    shapes_clips=500, shapes_repeats=2,
    vae_batch=8, vae_repeats=2,
    train_clips=64, dit_batch=8, cache_steps=2, cache_repeats=2,
    step_repeats=2,
    sample_clips=2, sample_steps=5, sample_repeats=2,
    matmul_n=512, matmul_repeats=3,
    compile=False, compile_repeats=0,
    loop_batch=4, loop_clips=64, loop_steps=24, loop_order=["cold", "before", "warm"],
    grid_seeds=[0, 1], grid_steps=5, grid_workers=2, grid_strategies=["adaln_zero"],
    grid_data=["data.split_sizes.train=128", "data.split_sizes.val=32"],
    stacked_k=2, stacked_repeats=2,
    end_to_end=False,
)  # fmt: skip


def vae_model_cfg(spatial: int, temporal: int) -> dict:
    model = OmegaConf.to_container(OmegaConf.load(CONF / "vae" / "default.yaml").model)
    return {**model, "spatial_factor": spatial, "temporal_factor": temporal}


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
        vae = build_vae(**vae_model_cfg(spatial, temporal)).eval().to(harness.DEVICE)
        video = torch.rand(b, 3, frames, 32, 32, device=harness.DEVICE) * 2 - 1
        with torch.no_grad(), autocast():
            t = timeit(lambda vae=vae, video=video: vae.encode(video), repeats=s["vae_repeats"], warmup=1)
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
    vae = build_vae(**vae_model_cfg(4, 1)).eval().to(harness.DEVICE)
    videos = data.videos.to(harness.DEVICE)
    with torch.no_grad():
        stats = [vae.encode(videos[i : i + 64].float() / 127.5 - 1.0) for i in range(0, n_clips, 64)]
    cache_mean = torch.cat([m for m, _ in stats])
    cache_std = torch.cat([(0.5 * lv).exp() for _, lv in stats])
    scale = 1.0  # the trained VAE's scale factor only rescales; it does not change the cost
    g = torch.Generator(harness.DEVICE).manual_seed(0)

    def from_cache():  # LatentDataset: a posterior sample of the cached mean / log-variance
        idx = torch.randint(n_clips, (b,), generator=g, device=harness.DEVICE)
        return (cache_mean[idx] + cache_std[idx] * torch.randn_like(cache_mean[idx])) * scale

    def on_the_fly():  # the same posterior sample, but encoded from the clip now
        idx = torch.randint(n_clips, (b,), generator=g, device=harness.DEVICE)
        with torch.no_grad(), autocast():
            mean, logvar = vae.encode(videos[idx].float() / 127.5 - 1.0)
        return (mean + (0.5 * logvar).exp() * torch.randn_like(mean)).float() * scale

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
    n = s["matmul_n"] * (4 if harness.DEVICE.type == "cuda" else 1)  # a GPU needs a larger matmul to saturate
    dtype = torch.bfloat16 if harness.PRECISION == "bf16-mixed" else torch.float32
    a, b = (torch.randn(n, n, device=harness.DEVICE, dtype=dtype) for _ in range(2))
    t = timeit(lambda: torch.mm(a, b), repeats=s["matmul_repeats"], warmup=2)
    peak = 2 * n**3 / t.median
    kind = "bf16" if dtype == torch.bfloat16 else "fp32"
    return Row("4 DiT train step", f"{kind} matmul peak: {n}×{n} @ {n}×{n}", f"{peak / 1e9:,.1f}", "GFLOP/s",
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
    x0 = torch.randn(b, *latent_shape, generator=g).to(harness.DEVICE)
    fns, info = {}, {}
    for name in STRATEGIES:
        torch.manual_seed(0)
        model = build_dit(name, latent_shape)
        info[name] = (model.num_parameters(), caption_flops(model, CAPTION_LENGTHS))
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
    g = torch.Generator(harness.DEVICE).manual_seed(0)

    def sample():
        with autocast():
            flow.sample(model, (n, *latent_shape), text, null, steps=steps, guidance_scale=4.0, generator=g)

    t = timeit(sample, repeats=s["sample_repeats"], warmup=1)
    return [Row("5 sampling", f"adaLN-Zero tiny DiT, {steps} Euler steps, CFG 4 (cond+uncond batched), "
                f"{n} clips per call", f"{t.median / n:.4g}", "s/clip",
                f"{t.median:.4g} s per call; VAE decode not included; {t.spread()}")]


def ablation_step_setup(s: dict):
    """The DiT step of the embedded ablation: conf/train.yaml's defaults (tiny adaLN-Zero DiT, patch 1×4×4 = 32
    tokens on the 4×8×8×8 latent) at its batch (16)."""
    latent_shape, b = (4, 8, 8, 8), s["loop_batch"]
    x0 = torch.randn(b, *latent_shape, generator=torch.Generator().manual_seed(0)).to(harness.DEVICE)
    return latent_shape, b, x0


def bench_compile(s: dict) -> list[Row]:
    """`compile: true` (torch.compile of the backbone) vs eager on the ablation's step, side by side after the
    compiled model's warm-up; the notes give the one-time cost of a cold compile and the steps that earn it back.
    Cold: torch keeps generated kernels in an on-disk cache (TORCHINDUCTOR_CACHE_DIR, default
    /tmp/torchinductor_<user>) that makes later compiles of the same graph much cheaper, so this points it at an
    empty folder, as on a new machine."""
    if not s["compile"]:
        return [Row("10 compile", "compile: true vs eager", "skipped", "", "not run in --quick (compiling takes ~30 s)")]
    previous = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    with tempfile.TemporaryDirectory(prefix="sorabench-inductor-") as kernels:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = kernels
        try:
            return compile_rows(s)
        finally:
            if previous is None:
                os.environ.pop("TORCHINDUCTOR_CACHE_DIR")
            else:
                os.environ["TORCHINDUCTOR_CACHE_DIR"] = previous


def compile_rows(s: dict) -> list[Row]:
    latent_shape, b, x0 = ablation_step_setup(s)
    flow, fns, warm = RectifiedFlow(), {}, {}
    for name in ("eager", "compiled"):
        torch.manual_seed(0)
        model = build_dit("adaln_zero", latent_shape)
        if name == "compiled":
            model.compile()  # what DiTModule does with compile: true
        fns[name] = train_step_fn(model, flow, b, lambda: x0)
        t0 = time.perf_counter()
        fns[name](), fns[name]()  # the compiled forward and backward are generated on the first calls
        harness.sync()
        warm[name] = time.perf_counter() - t0
    t = side_by_side(fns, repeats=s["compile_repeats"], warmup=1)
    eager, compiled = t["eager"].median, t["compiled"].median
    cost = warm["compiled"] - warm["eager"]
    rows = [Row("10 compile", f"{name}: tiny adaLN-Zero DiT, 32 tokens, batch {b} (the ablation's step)",
                f"{t[name].median * 1e3:.4g}", "ms/step", t[name].spread()) for name in ("eager", "compiled")]
    saved = eager - compiled
    payback = f"earned back after ~{cost / saved:,.0f} steps" if saved > 0 else "never earned back"
    rows.append(Row("10 compile", "speed-up of compile: true (eager / compiled step time)", f"{eager / compiled:.3g}",
                    "×", f"a cold compile costs {cost:.3g} s ({payback}; an ablation trial is 1,200 steps); later "
                    "processes reuse torch's on-disk kernel cache and compile faster"))
    return rows


class StepTimes(L.Callback):
    """perf_counter at the start of every training batch: consecutive differences are whole loop iterations."""

    def __init__(self):
        self.starts: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.starts.append(time.perf_counter())


def bench_training_loop(s: dict) -> list[Row]:
    """`trainer.fit` of DiTModule as `sorabench train` runs it, vs the bare step: what the loop adds (Lightning, the
    data loader, caption lookup, EMA, checkpoints), in the first epoch (new captions) and after it. Runs alternate
    between three settings, each a fresh `trainer.fit` with no caption embedded in memory, as a new process:
      before: this repository before the performance issue - MiniLM embeds each caption inside the training step
          the first time it is seen, Lightning's per-tensor EMAWeightAveraging, unfused AdamW;
      now, first process: the captions embedded up front and written to the disk cache, one foreach EMA update,
          fused AdamW;
      now, later processes: the same, with the captions' embeddings read from that disk cache (a rerun, a resumed
          run, the next trial or worker of a sweep)."""
    from lightning.pytorch.callbacks import EMAWeightAveraging

    from sorabench.config import compose_config
    from sorabench.latents import LatentDataModule
    from sorabench.training.dit_run import build_dit_module, training_callbacks
    from sorabench.models.text import frozen_text_encoder
    from sorabench.training.trainer import build_trainer

    latent_shape, b, x0 = ablation_step_setup(s)
    n, steps = s["loop_clips"], s["loop_steps"]
    captions = list(make_split(ShapesConfig(split_sizes={"train": n}), "train").captions)
    cache = {"mean": torch.randn(n, *latent_shape), "logvar": torch.full((n, *latent_shape), -4.0),
             "scale_factor": 1.0, "captions": captions, "labels": torch.zeros(n, 5, dtype=torch.long),
             "unseen": torch.zeros(n, dtype=torch.bool)}
    epoch = n // b
    variants = {"before": "before", "cold": "now, first process", "warm": "now, later processes"}
    runs: dict[str, list[tuple[float, list[float], float]]] = {v: [] for v in variants}
    with tempfile.TemporaryDirectory(prefix="sorabench-bench-") as out:
        for i, variant in enumerate(s["loop_order"]):
            cfg = compose_config("train", [f"outputs={out}", f"name=loop{i}", "mlflow.enabled=false",
                                           f"trainer.max_steps={steps}", "trainer.limit_val_batches=0",
                                           "trainer.progress_bar=false", f"data.batch_size={b}",
                                           f"optim.fused={variant != 'before'}", "evaluate.enabled=false"])
            L.seed_everything(0, verbose=False)
            module = build_dit_module(cfg, latent_shape, None, "none")
            encoder = frozen_text_encoder(cfg.text_encoder.name, max_length=cfg.text_encoder.max_length)
            encoder._cache.clear()
            timer = StepTimes()
            t0 = time.perf_counter()
            if variant == "before":
                callbacks = [EMAWeightAveraging(decay=cfg.ema.decay, update_starting_at_step=cfg.ema.start_step)]
            else:
                callbacks = training_callbacks(cfg, {}, None)
                encoder.precompute(captions, cache_dir=cfg.cache_dir)
            setup = time.perf_counter() - t0
            trainer = build_trainer(cfg, None, [*callbacks, timer])
            trainer.fit(module, datamodule=LatentDataModule(cache, cache, b, text_encoder=encoder))
            times = [t1 - t0 for t0, t1 in zip(timer.starts, timer.starts[1:])]
            runs[variant].append((setup + sum(times[:epoch]), times[epoch:], setup))
    torch.manual_seed(0)
    bare = timeit(train_step_fn(build_dit("adaln_zero", latent_shape), RectifiedFlow(), b, lambda: x0),
                  repeats=s["step_repeats"] * 3, warmup=2).median
    rows, first = [], {}
    for variant, label in variants.items():
        first[variant] = statistics.median(r[0] for r in runs[variant])
        setup = statistics.median(r[2] for r in runs[variant])
        steady = statistics.median(t for r in runs[variant] for t in r[1])
        how = {"before": "captions embedded inside the steps",
               "cold": f"incl. {setup:.3g} s embedding {n:,} captions up front and writing the disk cache",
               "warm": f"incl. {setup:.3g} s reading the disk cache"}[variant]
        rows.append(Row("11 training loop", f"{label}: first epoch ({epoch} steps of batch {b}, {n:,} captions)",
                        f"{first[variant]:.3g}", "s", f"{first[variant] / epoch * 1e3:.4g} ms/step ({how}); "
                        f"{len(runs[variant])} run(s)"))
        rows.append(Row("11 training loop", f"{label}: step after the first epoch (median)", f"{steady * 1e3:.4g}",
                        "ms/step", f"{(steady / bare - 1):+.0%} over the bare step (same model, no Lightning: "
                        f"{bare * 1e3:.4g} ms); {len(runs[variant])} run(s) of {steps} steps"))
    for variant in ("cold", "warm"):
        rows.append(Row("11 training loop", f"first-epoch speed-up, before / {variants[variant]}",
                        f"{first['before'] / first[variant]:.3g}", "×",
                        "same model, data and machine; runs alternated in this process"))
    return rows


def bench_grid_workers(s: dict) -> list[Row]:
    """The embedded ablation's grid (its strategies, recipe and batch; `grid_seeds`, `grid_steps` steps per trial,
    no evaluation) trained by `sorabench sweep` as a user runs it, once one trial at a time on every core
    (workers=1) and once with k local workers of cores/k threads each (workers=k), one after the other in this
    process on the same shared assets: training clips per second for the whole grid, trial start-up, Lightning and
    MLflow included."""
    from omegaconf import open_dict

    from sorabench.config import compose_config
    from sorabench.sweep.run import run_sweep

    cores, k = torch.get_num_threads(), s["grid_workers"]
    overrides = [f"trainer.max_steps={s['grid_steps']}", f"trainer.val_check_interval={s['grid_steps']}",
                 "evaluate.enabled=false", "evaluate.every_n_steps=null", "sample.log_every_n_val=0",
                 "vae.max_steps=20", "trainer.progress_bar=false", *s["grid_data"]]
    rates, rows = {}, []
    with tempfile.TemporaryDirectory(prefix="sorabench-grid-") as out:
        for workers in (1, k):
            cfg = compose_config("sweep", [f"outputs={out}", "sweep=conditioning_ablation", f"study=grid-w{workers}",
                                           f"sweep.seeds={s['grid_seeds']}", f"workers={workers}",
                                           f"threads={max(1, cores // workers)}", "report=false",
                                           # no evaluation here: each trial's objective is its final val/loss
                                           "sweep.objectives=[{metric: val/loss, direction: minimize}]",
                                           *([f"sweep.params.conditioning.choices=[{','.join(s['grid_strategies'])}]"]
                                             if s["grid_strategies"] else [])], command="sweep")
            with open_dict(cfg):
                cfg.overrides = overrides
            if workers == 1:  # shared assets and caches first, outside the timing
                from sorabench.sweep.space import trial_config
                from sorabench.training.dit_run import prepare_shared_assets

                first = {"conditioning": "adaln_zero", "seed": s["grid_seeds"][0]}
                prepare_shared_assets(trial_config(cfg, OmegaConf.to_container(cfg.sweep, resolve=True), first,
                                                   "grid-check"), caches=True)
            trials = len(cfg.sweep.params.conditioning.choices) * len(s["grid_seeds"])
            t0 = time.perf_counter()
            run_sweep(cfg)
            wall = time.perf_counter() - t0
            torch.set_num_threads(cores)
            rates[workers] = trials * s["grid_steps"] * int(compose_config("train", []).data.batch_size) / wall
            rows.append(Row("13 grid throughput", f"workers={workers}, {max(1, cores // workers)} thread(s) each: "
                            f"{trials} trials × {s['grid_steps']} steps", f"{rates[workers]:.4g}", "clips/s",
                            f"{wall:.1f} s wall for the grid"))
    rows.append(Row("13 grid throughput", f"workers={k} / workers=1", f"{rates[k] / rates[1]:.3g}", "×",
                    "same grid, shared assets and machine, one after the other in this process"))
    return rows


def bench_end_to_end(s: dict) -> list[Row]:
    """The main job as a user runs it (`sorabench sweep sweep=conditioning_ablation`, README's first command) in a
    fresh output folder: VAE, evaluator, 9 DiT trials, evaluation and the report."""
    if not s["end_to_end"]:
        return [Row("12 end to end", "embedded conditioning ablation", "skipped", "",
                    "not run in --quick or with --skip-end-to-end")]
    cli = Path(sys.executable).parent / "sorabench"
    with tempfile.TemporaryDirectory(prefix="sorabench-e2e-") as out:
        log_path = Path(out) / "ablation.log"
        t0 = time.perf_counter()
        with open(log_path, "w") as f:
            rc = subprocess.run([str(cli), "sweep", "sweep=conditioning_ablation", f"outputs={out}"], stdout=f,
                                stderr=subprocess.STDOUT, cwd=ROOT).returncode
        wall = time.perf_counter() - t0
        tail = log_path.read_text().splitlines()[-5:]
    if rc != 0:
        return [Row("12 end to end", "embedded conditioning ablation", "failed", "", f"exit {rc}: {' / '.join(tail)}")]
    return [Row("12 end to end", "embedded conditioning ablation (`./dev.sh ablation`: VAE, evaluator, 3 strategies × "
                "3 seeds, evaluation, report)", f"{wall / 60:.3g}", "min", f"{wall:,.0f} s wall time, fresh outputs "
                "folder, all cores")]


# ---- report ---------------------------------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def gpu_name() -> str:
    return torch.cuda.get_device_name(harness.DEVICE) if harness.DEVICE.type == "cuda" else "no GPU used"


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
        f"device: {harness.DEVICE} ({gpu_name()}); precision: {harness.PRECISION}",
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
    p.add_argument("--quick", action="store_true", help="tiny sizes and repeats (a smoke check, < 1 min)")
    p.add_argument("--threads", type=int, default=default_threads, help="torch threads (default: all usable cores)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--precision", default="32-true", choices=["32-true", "bf16-mixed"],
                   help="bf16-mixed: autocast to bf16, MFU against the bf16 matmul peak (for GPUs)")
    p.add_argument("--only", default=None, help="comma-separated benchmark numbers to run, e.g. 4,6 (default: all)")
    p.add_argument("--skip-end-to-end", action="store_true", help="skip 12, the ~15-minute ablation run")
    p.add_argument("--out", type=Path, default=None, help="also write the table and machine to this markdown file")
    args = p.parse_args(argv)
    quiet_libraries()
    torch.set_num_threads(args.threads)
    harness.configure(args.device, args.precision)
    from peers import PEER_SIZES, bench_peer_sampling, bench_peer_training
    from precision import bench_precision
    from scaling import SCALING_SIZES, bench_fvd_features, bench_scaling
    from stacked import bench_stacked_seeds

    mode = "quick" if args.quick else "full"
    sizes, peer, scale = QUICK if args.quick else FULL, PEER_SIZES[mode], SCALING_SIZES[mode]
    if args.skip_end_to_end:
        sizes = {**sizes, "end_to_end": False}
    machine = machine_lines(args.threads, args.quick)
    try:
        import diffusers

        machine.append(f"diffusers: {diffusers.__version__} (the peer in 6 and 7)")
    except ImportError:
        machine.append("diffusers: not installed (6 and 7 skipped; pip install -e .[bench])")
    peak: list[float] = []
    encode_rate: list[float] = []

    def vae() -> list[Row]:
        rows, rate = bench_vae(sizes)
        encode_rate.append(rate)
        return rows

    def strategies() -> list[Row]:
        row, value = bench_matmul_peak(sizes)
        peak.append(value)
        return [row, *bench_strategies(sizes, value)]

    stages = {  # number: (what, run) - in order; 3 needs 2's encode rate, 6 needs 4's matmul peak
        1: ("shapes generation", lambda: bench_shapes(sizes)),
        2: ("VAE encode", vae),
        3: ("DiT epoch from the cache vs encoding on the fly", lambda: bench_cache(sizes, encode_rate[0])),
        4: ("DiT train step per conditioning strategy, MFU", strategies),
        5: ("sampling", lambda: bench_sampling(sizes)),
        6: ("train step vs diffusers", lambda: bench_peer_training(peer, peak[0])),
        7: ("sampling vs diffusers", lambda: bench_peer_sampling(peer)),
        8: ("scaling with frames and resolution", lambda: bench_scaling(scale)),
        9: ("FVD feature extraction + statistics", lambda: bench_fvd_features(scale)),
        10: ("compile: true vs eager", lambda: bench_compile(sizes)),
        11: ("training loop vs bare step, before/now", lambda: bench_training_loop(sizes)),
        12: ("end-to-end ablation", lambda: bench_end_to_end(sizes)),
        13: ("grid throughput: one trial at a time vs local workers", lambda: bench_grid_workers(sizes)),
        14: ("stacked seeds: K models as one vmapped model vs one after another", lambda: bench_stacked_seeds(sizes)),
        15: ("bf16 vs fp32: auto's decision, matmuls, train steps, sampling, per-op profile",
             lambda: bench_precision(mode)),
    }
    chosen = sorted(stages) if args.only is None else sorted(int(x) for x in args.only.split(","))
    chosen = sorted({*chosen, *([2] if 3 in chosen else []), *([4] if 6 in chosen else [])})
    t0 = time.perf_counter()
    rows: list[Row] = []
    for number in chosen:
        what, run = stages[number]
        log(f"{number}/{len(stages)} {what} ...")
        started = time.perf_counter()
        rows += run()
        log(f"{number}/{len(stages)} done in {time.perf_counter() - started:.1f} s")
    md = markdown(rows, machine, time.perf_counter() - t0)
    print(md)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(md)
        log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
