"""Benchmarks 8 and 9: how the cost of a DiT training step grows with the work, and how fast FVD is computed.

8. Scaling. One training step of the tiny adaLN-Zero DiT with 1×2×2 patches, for more frames at a fixed latent
   size and for larger latents at a fixed frame count, under joint spacetime ("full") and spatial-then-temporal
   ("factorised") attention. Full attention over N = T'·H'·W' tokens costs ~N² on top of the linear MLP cost;
   factorised attention costs ~T'·(H'W')² + H'W'·T'², so it grows ~linearly in frames (but still quadratically in
   the positions of a frame), and pays for a second attention projection per block. The two attentions are timed
   side by side at each size; the batch is the same for every size, so the curve is the cost of one clip.
   Peak memory is the allocator's peak on CUDA; a CPU has no such counter, so each case runs in a fresh process
   whose peak resident set (VmHWM) is read before and after the steps.
9. FVD features. `FrechetVideoDistance` with the embedded evaluator's clip features (the `sorabench evaluate`
   default, untrained: speed does not depend on the weights): `update` throughput on random clips of the
   protocol's shape, and `compute` (Fréchet distance from the accumulated sums) once both sides hold N clips.

`run.py` calls `bench_scaling` and `bench_fvd_features`; `python benchmarks/scaling.py --memory-case JSON` is the
fresh process of one CPU memory case.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import harness
import torch
from harness import CAPTION_LENGTHS, CONF, ROOT, TEXT_LEN, Row, build_dit, log, side_by_side, sync, timeit, train_step_fn
from omegaconf import OmegaConf
from torch import nn

from sorabench.data.shapes import ATTRIBUTES
from sorabench.diffusion import RectifiedFlow
from sorabench.metrics.features import build_feature_networks
from sorabench.metrics.fvd import FrechetVideoDistance
from sorabench.models.dit import DiT, caption_flops
from sorabench.training.evaluator_module import EVALUATOR_TRAINING_KEYS, EvaluatorModule

# frames × latent: sweep the frame count at a fixed latent size, then the latent size at a fixed frame count.
# quick: a smoke check (frames 2, 4 at 4×4; latents 4×4, 8×8 at 4 frames); 160 clips per FVD side exceed the
# evaluator's 128 features, so both covariances have full rank.
SCALING_SIZES = {
    "full": {
        "frames": [8, 16, 32], "frames_latent": 8, "latents": [8, 16, 32], "latents_frames": 16,
        "channels": 4, "batch": 2, "repeats": 5, "memory_steps": 2,
        "fvd_batch": 64, "fvd_clips": 512, "fvd_repeats": 5,
    },
    "quick": {
        "frames": [2], "frames_latent": 4, "latents": [4], "latents_frames": 4,  # one case per axis: a smoke check
        "channels": 4, "batch": 1, "repeats": 2, "memory_steps": 2,
        "fvd_batch": 16, "fvd_clips": 160, "fvd_repeats": 2,
    },
}  # fmt: skip

PATCH = (1, 2, 2)
VAE_SPATIAL = 4  # latent → clip pixels: the default VAE (conf/vae/default.yaml) is ×4 in space, ×1 in time
ATTENTIONS = ("full", "factorised")
MEMORY_TIMEOUT_S = 300
MEMORY_WORKERS = 2  # fresh processes measured at once: each reads only its own peak; two bound the machine's load

Size = tuple[int, int, int]  # latent (T, H, W)


# ---- 8: training step vs frames and resolution -----------------------------------------------------------------


def sweeps(s: dict) -> list[tuple[str, str, list[Size]]]:
    """The two sweeps as (what varies, how to name one of its steps, sizes from the smallest); they share a size."""
    frames = [(t, s["frames_latent"], s["frames_latent"]) for t in s["frames"]]
    latents = [(s["latents_frames"], h, h) for h in s["latents"]]
    return [("frame-count", "{0}-frame", frames), ("latent-size", "{1}×{2}-latent", latents)]


def video_tokens(size: Size) -> int:
    return (size[0] // PATCH[0]) * (size[1] // PATCH[1]) * (size[2] // PATCH[2])


def build_case(attention: str, latent: tuple[int, int, int, int], batch: int) -> tuple[DiT, Callable[[], None]]:
    """A case's model and its training step, seeded so that every process builds the same."""
    torch.manual_seed(0)
    model = build_dit("adaln_zero", latent, patch_size=PATCH, attention=attention)
    x0 = torch.randn(batch, *latent, device=harness.DEVICE)
    return model, train_step_fn(model, RectifiedFlow(), batch, lambda: x0)


def peak_bytes() -> int:
    """The peak memory counter: the CUDA allocator's, or the process's peak resident set. On Linux that is VmHWM of
    /proc/self/status, the high-water mark of this process image only: ru_maxrss would not do, because exec keeps
    the parent's peak in it, so a process started by a large benchmark process starts at the parent's peak."""
    if harness.DEVICE.type == "cuda":
        return torch.cuda.max_memory_allocated()
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def step_memory_mib(case: dict) -> float:
    """Peak memory the training steps add on top of the model and its inputs (activations, gradients, optimiser
    state, workspaces), in MiB. On the CPU the peak RSS is a high-water mark of the whole process, so this is
    only meaningful in a fresh process."""
    _, step = build_case(case["attention"], tuple(case["latent"]), case["batch"])
    sync()
    if harness.DEVICE.type == "cuda":
        torch.cuda.reset_peak_memory_stats()  # the peak restarts at what is allocated now
    before = peak_bytes()
    for _ in range(case["steps"]):
        step()
    sync()
    return (peak_bytes() - before) / 2**20


def fresh_process_memory_mib(case: dict) -> float:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--memory-case", json.dumps(case)]
    try:
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=MEMORY_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired as e:
        raise RuntimeError(f"memory case {case}: no result within {MEMORY_TIMEOUT_S} s") from e
    if done.returncode != 0:
        tail = done.stderr[-3000:]
        raise RuntimeError(f"memory case {case} failed (exit {done.returncode}):\n{tail}")
    return json.loads(done.stdout.splitlines()[-1])["mib"]


def memory_mib(cases: list[dict]) -> list[float]:
    """Peak memory of each case: in this process on CUDA, each in a fresh process on the CPU."""
    if harness.DEVICE.type == "cuda":
        return [step_memory_mib(c) for c in cases]
    with ThreadPoolExecutor(MEMORY_WORKERS) as pool:
        return list(pool.map(fresh_process_memory_mib, cases))


def relative(size: Size, measured: dict, attention: str, s: dict) -> str:
    """This size's step time against the smallest size of each sweep it belongs to."""
    parts = []
    for what, step, sizes in sweeps(s):
        base = sizes[0]
        if size == base:
            parts.append(f"reference of the {what} sweep")
        elif size in sizes:
            t, _, flops = measured[size][attention]
            t0, _, flops0 = measured[base][attention]
            tokens = video_tokens(size) / video_tokens(base)
            parts.append(
                f"{t.median / t0.median:.2f}× the {step.format(*base)} step for {tokens:g}× the tokens "
                f"({flops / flops0:.3g}× the FLOPs)"
            )
    return "; ".join(parts)


def bench_scaling(sizes: dict) -> list[Row]:
    """Rows of benchmark 8: ms per training step of each (size, attention); the notes give peak memory, tokens,
    forward GFLOPs per clip and the growth over the smallest size of each sweep."""
    s, b, c = sizes, sizes["batch"], sizes["channels"]
    unique = list(dict.fromkeys(z for *_, sweep in sweeps(s) for z in sweep))
    cases = [
        {"attention": a, "latent": [c, *z], "batch": b, "steps": s["memory_steps"],
         "precision": harness.PRECISION, "threads": torch.get_num_threads()}
        for z in unique for a in ATTENTIONS
    ]  # fmt: skip
    log(f"   peak memory of {len(cases)} cases ...")
    # Before any timing, so that the fresh processes never run beside a timed step.
    peak = dict(zip([(tuple(k["latent"][1:]), k["attention"]) for k in cases], memory_mib(cases)))
    how = "CUDA max_memory_allocated" if harness.DEVICE.type == "cuda" else "peak RSS growth, fresh process"
    measured = {}  # size -> attention -> (Timing, peak MiB, forward GFLOPs per clip)
    for z in unique:
        log(f"   {z[0]} frames × {z[1]}×{z[2]} latent: step time ...")
        fns, flops = {}, {}
        for a in ATTENTIONS:
            model, fns[a] = build_case(a, (c, *z), b)
            flops[a] = caption_flops(model, CAPTION_LENGTHS)
        t = side_by_side(fns, repeats=s["repeats"], warmup=2)
        measured[z] = {a: (t[a], peak[z, a], flops[a]) for a in ATTENTIONS}
        del model, fns  # this size's models and optimiser states, before the next size is built
    rows = []
    for z in unique:
        tokens, px = video_tokens(z), f"{z[1] * VAE_SPATIAL}×{z[2] * VAE_SPATIAL} px"
        for a in ATTENTIONS:
            t, mib, gflops = measured[z][a]
            case = f"{a} attention, {z[0]} frames × {z[1]}×{z[2]} latent ({px}, {tokens:,} tokens), batch {b}"
            notes = (
                f"peak memory +{mib:,.1f} MiB ({how}, {s['memory_steps']} steps); {tokens:,} video tokens; "
                f"{gflops:.3g} GFLOPs fwd/clip; {relative(z, measured, a, s)}; {t.spread()}"
            )
            if a == "factorised":
                notes += f"; full / factorised time {measured[z]['full'][0].median / t.median:.2f}×"
            rows.append(Row("8 scaling", case, f"{t.median * 1e3:,.1f}", "ms/step", notes))
    return rows


# ---- 9: FVD feature extraction and statistics ------------------------------------------------------------------


def evaluator_clip_features() -> tuple[nn.Module, dict]:
    """The FVD feature network of `metrics=evaluator` as `sorabench evaluate` builds it (the classifier of
    EvaluatorModule with conf/metrics/evaluator.yaml's architecture, untrained), and that metrics config."""
    m = OmegaConf.to_container(OmegaConf.load(CONF / "metrics" / "evaluator.yaml"))
    arch = {k: v for k, v in m["evaluator"].items() if k not in EVALUATOR_TRAINING_KEYS}
    torch.manual_seed(0)
    classifier = EvaluatorModule(attributes={k: len(v) for k, v in ATTRIBUTES.items()}, **arch).net
    return build_feature_networks(m, classifier)[0], m


def bench_fvd_features(sizes: dict) -> list[Row]:
    """Rows of benchmark 9: `update` clips/s (features + float64 sums) and `compute` seconds."""
    net, m = evaluator_clip_features()
    b, n, repeats = sizes["fvd_batch"], sizes["fvd_clips"], sizes["fvd_repeats"]
    shape = (3, m["num_frames"], m["resolution"], m["resolution"])
    g = torch.Generator().manual_seed(0)

    def clips(k: int) -> torch.Tensor:
        """What `sorabench evaluate` feeds the metric: float32 clips (k, 3, T, H, W) in [-1, 1]."""
        return (torch.rand(k, *shape, generator=g) * 2 - 1).to(harness.DEVICE)

    metric = FrechetVideoDistance(net).to(harness.DEVICE)
    real, fake = clips(b), clips(b)

    def update() -> None:
        metric.update(real, real=True)
        metric.update(fake, real=False)

    @torch.no_grad()
    def features() -> None:
        net(real)
        net(fake)

    t = side_by_side({"update": update, "features": features}, repeats=repeats, warmup=1)
    rate = 2 * b / t["update"].median

    # compute() on exactly n + n distinct clips; without compute_with_cache=False a repeat would return the cache.
    metric = FrechetVideoDistance(net, compute_with_cache=False).to(harness.DEVICE)
    for i in range(0, n, b):
        metric.update(clips(min(b, n - i)), real=True)
        metric.update(clips(min(b, n - i)), real=False)
    tc = timeit(metric.compute, repeats=repeats, warmup=1)
    total = 2 * n / rate + tc.median

    frames = "×".join(map(str, shape[1:]))
    where = f"on {harness.DEVICE.type} (`sorabench evaluate` runs it on the CPU)"
    return [
        Row(
            "9 FVD features",
            f"FrechetVideoDistance.update: {net.id} features + float64 sums, batches of {b} random {frames} clips",
            f"{rate:,.0f}",
            "clips/s",
            f"{t['update'].median / 2 * 1e3:.4g} ms per batch, the feature network alone "
            f"{t['features'].median / t['update'].median:.0%} of it; untrained evaluator (sha256 {net.sha256[:12]}); "
            f"{where}; a real and a fake batch per repeat: {t['update'].spread()}",
        ),
        Row(
            "9 FVD features",
            f"FrechetVideoDistance.compute: {n} real + {n} generated clips, {net.num_features}-d features",
            f"{tc.median:.3g}",
            "s",
            f"μ, Σ from the sums, then the Fréchet distance (scipy sqrtm, float64); a whole {n}-vs-{n} FVD with "
            f"both sides extracted ≈ {total:.3g} s, {tc.median / total:.0%} of it in compute; {where}; {tc.spread()}",
        ),
    ]


if __name__ == "__main__":
    p = argparse.ArgumentParser(description="one CPU memory case of bench_scaling, in this fresh process")
    p.add_argument("--memory-case", required=True, help="the case as JSON (attention, latent, batch, ...)")
    case = json.loads(p.parse_args().memory_case)
    torch.set_num_threads(case["threads"])
    harness.configure("cpu", case["precision"])
    print(json.dumps({"mib": step_memory_mib(case)}))
