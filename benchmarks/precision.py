"""Benchmark 15: bf16 against fp32 on this machine, side by side: what `trainer.precision: auto` decides and why.

- the CPU's bf16 flags, the calibration ratio `auto` measures and its decision (`sorabench/precision.py`);
- matmul peaks in fp32 and bf16 (a large square one, and the tiny DiT's MLP linear at the ablation's batch);
- the ablation's train step (batch 16, fwd + bwd + clip + fused AdamW) per strategy, and adaLN-Zero's at batch 64,
  in four forms: fp32; bf16 autocast as Lightning's plugin runs it (`BF16Mixed`: fp32 weights cast every forward,
  attention in fp32 as the model runs it on a CPU); the same with attention left in bf16 (before that remedy); and
  bf16 weights (the model and optimiser in bf16, no weight casts: not a recipe, since bf16 master weights lose small
  updates, but the ceiling of any cast-saving design);
- sampling (25 Euler steps, CFG 4) in fp32, bf16 autocast and bf16 weights;
- a per-op profile of the adaLN-Zero step in fp32 and under bf16 autocast (torch.profiler self time by op class).

Every ratio is from timings taken round-robin in this one process (harness.side_by_side).
"""

from __future__ import annotations

import copy
import re
from collections import defaultdict

import harness
import torch
from harness import CAPTION_LENGTHS, Row, build_dit, fake_text, side_by_side, train_step_fn

from sorabench.diffusion import RectifiedFlow
from sorabench.models.dit import caption_flops
from sorabench.precision import MIN_CPU_SPEEDUP, cpu_bf16_flags, cpu_bf16_speedup, resolve

STRATEGIES = ["adaln_zero", "cross_attention", "in_context"]  # the embedded ablation's
LATENT = (4, 8, 8, 8)
PRECISION_SIZES = {
    "full": dict(batch=16, step_repeats=9, matmul_n=2048, matmul_repeats=5, sample_clips=16, sample_steps=25,
                 sample_repeats=3, profile_steps=10),
    "quick": dict(batch=4, step_repeats=2, matmul_n=256, matmul_repeats=2, sample_clips=2, sample_steps=3,
                  sample_repeats=2, profile_steps=2),
}
FORMS = ("fp32", "bf16 autocast", "bf16 autocast, bf16 attention", "bf16 weights")


def _with_precision(fn, precision: str):
    """fn run with the harness's autocast set to `precision` (it reads harness.PRECISION at call time)."""

    def run():
        saved = harness.PRECISION
        harness.PRECISION = precision
        try:
            fn()
        finally:
            harness.PRECISION = saved

    return run


def _with_bf16_attention(fn):
    """fn with the model's attention left in bf16 (plain SDPA), as before attention ran in fp32 on the CPU
    (`sorabench.models.layers.attention`): the remedy's figure, side by side."""
    import torch.nn.functional as F

    import sorabench.models.layers as layers

    def plain(q, k, v, mask):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    def run():
        saved = layers.attention
        layers.attention = plain
        try:
            fn()
        finally:
            layers.attention = saved

    return run


def matmul_rows(s: dict) -> tuple[list[Row], dict[str, float]]:
    n = s["matmul_n"]
    g = torch.Generator().manual_seed(0)
    shapes = {f"{n}×{n} @ {n}×{n}": (n, n, n), "tiny-DiT MLP linear, batch 16: 512×128 @ 128×512": (512, 128, 512)}
    rows, peaks = [], {}
    for label, (m, k, o) in shapes.items():
        a, b = torch.randn(m, k, generator=g), torch.randn(k, o, generator=g)
        ab, bb = a.bfloat16(), b.bfloat16()
        reps = s["matmul_repeats"] * (1 if m == n else 40)
        t = side_by_side({"fp32": lambda: a @ b, "bf16": lambda: ab @ bb}, repeats=reps, warmup=3)
        flops = 2 * m * k * o
        for kind in ("fp32", "bf16"):
            peaks.setdefault(kind, flops / t[kind].median)
            rows.append(Row("15 precision", f"{kind} matmul {label}", f"{flops / t[kind].median / 1e9:,.1f}",
                            "GFLOP/s", t[kind].spread()))
        rows.append(Row("15 precision", f"bf16 / fp32 matmul {label}", f"{t['fp32'].median / t['bf16'].median:.3g}",
                        "×", "> 1: bf16 is faster"))
    return rows, peaks


def bf16_text(text):
    return type(text)(text.tokens.bfloat16(), text.mask, text.pooled.bfloat16())


def in_bf16(model):
    """model_fn(x, t, cond) of a bf16 model on fp32 inputs, under autocast (which casts the fp32 activations that
    reach a matmul, as the timestep's sinusoids; the weights are bf16 already), the prediction cast out."""

    def fn(x, t, cond):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return model(x, t, cond).float()

    return fn


def step_fns(strategy: str, b: int):
    """The three forms of one strategy's train step (module doc), each with its own model copy."""
    flow = RectifiedFlow()
    torch.manual_seed(0)
    model = build_dit(strategy, LATENT)
    x0 = torch.randn(b, *LATENT, generator=torch.Generator().manual_seed(0))
    fp32 = train_step_fn(copy.deepcopy(model), flow, b, lambda: x0)
    autocast = _with_precision(train_step_fn(copy.deepcopy(model), flow, b, lambda: x0), "bf16-mixed")
    bf16_attention = _with_bf16_attention(
        _with_precision(train_step_fn(copy.deepcopy(model), flow, b, lambda: x0), "bf16-mixed"))
    low = copy.deepcopy(model).bfloat16()
    text_b = bf16_text(fake_text(b))
    opt = torch.optim.AdamW(low.parameters(), lr=1e-4)

    def weights():  # bf16 parameters, gradients and AdamW state: no weight casts
        drop = torch.rand(b) < 0.1
        loss = flow.training_loss(in_bf16(low), x0, low.drop_text(text_b, drop))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(low.parameters(), 1.0)
        opt.step()

    return model, dict(zip(FORMS, (fp32, autocast, bf16_attention, weights)))


def train_rows(s: dict, peaks: dict[str, float]) -> list[Row]:
    """Every strategy at the ablation's batch, and adaLN-Zero at 4x that batch (where a recipe allows larger
    steps, bf16's matmuls weigh more against the per-op costs)."""
    rows = []
    for strategy, b in [*((st, s["batch"]) for st in STRATEGIES), ("adaln_zero", 4 * s["batch"])]:
        model, fns = step_fns(strategy, b)
        gflops = caption_flops(model, CAPTION_LENGTHS)
        t = side_by_side(fns, repeats=s["step_repeats"], warmup=2)
        for form in FORMS:
            step = t[form].median
            peak = peaks["fp32" if form == "fp32" else "bf16"]
            rows.append(Row("15 precision", f"{strategy} train step, batch {b}: {form}", f"{step * 1e3:.4g}",
                            "ms/step", f"MFU {3 * gflops * 1e9 * b / step / peak:.1%} of the measured "
                            f"{'fp32' if form == 'fp32' else 'bf16'} peak; {t[form].spread()}"))
        rows.append(Row("15 precision", f"{strategy} train step, batch {b}: fp32 / bf16 autocast",
                        f"{t['fp32'].median / t['bf16 autocast'].median:.3g}", "×",
                        f"with bf16 attention: {t['fp32'].median / t['bf16 autocast, bf16 attention'].median:.3g}×; "
                        f"bf16 weights: {t['fp32'].median / t['bf16 weights'].median:.3g}× (no weight casts); "
                        "> 1: bf16 is faster"))
    return rows


def sampling_rows(s: dict) -> list[Row]:
    n, steps = s["sample_clips"], s["sample_steps"]
    flow = RectifiedFlow(sample_steps=steps)
    model = build_dit("adaln_zero", LATENT).eval()
    low = copy.deepcopy(model).bfloat16()
    text, null = fake_text(n), model.null_text(n)

    def run(m, txt, nul, autocast):
        def sample():
            g = torch.Generator().manual_seed(0)
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                flow.sample(m, (n, *LATENT), txt, nul, steps=steps, guidance_scale=4.0, generator=g)
        return sample

    fns = {"fp32": run(model, text, null, False), "bf16 autocast": run(model, text, null, True),
           "bf16 weights": run(in_bf16(low), bf16_text(text), bf16_text(null), False)}
    t = side_by_side(fns, repeats=s["sample_repeats"], warmup=1)
    rows = [Row("15 precision", f"sampling, adaLN-Zero, {steps} Euler steps, CFG 4, {n} clips: {form}",
                f"{t[form].median / n:.4g}", "s/clip", t[form].spread()) for form in fns]
    rows.append(Row("15 precision", "sampling: fp32 / bf16 autocast", f"{t['fp32'].median / t['bf16 autocast'].median:.3g}",
                    "×", f"fp32 / bf16 weights: {t['fp32'].median / t['bf16 weights'].median:.3g}×"))
    return rows


OP_CLASSES = [  # (class, regex on the aten op name), first match wins
    ("matmul", r"^aten::(mm|addmm|bmm|matmul|linear|baddbmm)$"),
    ("attention", r"scaled_dot_product|flash_attention|_efficient_attention"),
    ("norms", r"layer_norm|rms_norm|group_norm"),
    ("casts", r"^aten::(copy_|_to_copy|to)$"),
    ("optimizer", r"_fused_adamw|_foreach|adamw|clip_grad|norm$"),
    ("elementwise", r"."),
]


def profile_rows(s: dict) -> list[Row]:
    from torch.profiler import ProfilerActivity, profile

    rows = []
    model, fns = step_fns("adaln_zero", s["batch"])
    for form in ("fp32", "bf16 autocast"):
        fn = fns[form]
        for _ in range(2):
            fn()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(s["profile_steps"]):
                fn()
        spent = defaultdict(float)
        for e in prof.key_averages():
            if not e.key.startswith("aten::"):
                continue
            cls = next(c for c, pattern in OP_CLASSES if re.search(pattern, e.key))
            spent[cls] += e.self_cpu_time_total / 1e3 / s["profile_steps"]  # ms per step
        total = sum(spent.values())
        notes = ", ".join(f"{c} {spent[c]:.1f}" for c, _ in OP_CLASSES)
        rows.append(Row("15 precision", f"profile: adaLN-Zero train step, batch {s['batch']}, {form}",
                        f"{total:.4g}", "ms/step", f"self time of aten ops by class, ms/step: {notes} "
                        "(under the profiler, so a little slower than unprofiled)"))
    return rows


def bench_precision(mode: str) -> list[Row]:
    s = PRECISION_SIZES[mode]
    flags = cpu_bf16_flags()
    speedup = cpu_bf16_speedup() if flags else float("nan")
    auto = resolve("auto", "cpu")
    decision = (f"`auto` -> {auto.precision}: {auto.reason}; CPU bf16 flags: {', '.join(flags) or 'none'}; "
                f"bf16 needs >= {MIN_CPU_SPEEDUP}x")
    rows = [Row("15 precision", "`trainer.precision: auto`: the calibration train step, bf16 / fp32 speed",
                f"{speedup:.3g}" if flags else "skipped", "×" if flags else "",
                decision if flags else f"{decision} (no native bf16: not calibrated)")]
    mm_rows, peaks = matmul_rows(s)
    rows += mm_rows
    rows += train_rows(s, peaks)
    rows += sampling_rows(s)
    rows += profile_rows(s)
    return rows


if __name__ == "__main__":
    import sys

    torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 else 1)
    for r in bench_precision("quick" if "--quick" in sys.argv else "full"):
        print(f"| {r.benchmark} | {r.case} | {r.value} | {r.unit} | {r.notes} |")
