"""Benchmark 14: stacked seeds - the K seeds of one grid cell trained as one vmapped model (torch.func) against the
same K models stepped one after another, in one process on the same threads.

The idea (ablation-throughput issue): K small models as one batched model give the CPU K-times-larger matmuls.
Both paths do the same arithmetic - the ablation's tiny adaLN-Zero DiT at its batch, the flow loss, a per-model
grad-norm clip of 1.0 and AdamW (elementwise, so one AdamW over stacked weights is K independent ones) - and the
benchmark checks that they reach the same weights before it times them. Not wired into `sorabench sweep`: the
measured ratio (benchmarks/RESULTS.md) did not pay for the machinery (per-seed Optuna trials, MLflow runs, EMA,
data order and checkpoints from one process).
"""

from __future__ import annotations

import copy

import torch
from harness import DEVICE, Row, build_dit, fake_text, side_by_side
from torch.func import functional_call, stack_module_state, vmap

from sorabench.models.text import TextEmbedding

SHAPE, BATCH = (4, 8, 8, 8), 16  # the ablation's latent and batch (conf/train.yaml)


def flow_inputs(x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor):
    """Rectified-flow training input and target for x0 (..., C, T, H, W) at t (...) with the given noise."""
    tt = t[(...,) + (None,) * 4]
    return (1 - tt) * x0 + tt * noise, noise - x0


def sequential_step(models: list, text: TextEmbedding):
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-3) for m in models]

    def step(x0, t, noise):  # x0, noise (K, B, C, T, H, W), t (K, B)
        for k, (model, opt) in enumerate(zip(models, opts)):
            x_t, target = flow_inputs(x0[k], t[k], noise[k])
            loss = torch.nn.functional.mse_loss(model(x_t, t[k], text), target)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()

    return step


def stacked_step(models: list, text: TextEmbedding):
    params, buffers = stack_module_state(models)  # {name: (K, ...)}: fresh leaves, copies of the K models' weights
    params = {n: p.detach().requires_grad_() for n, p in params.items()}
    template = copy.deepcopy(models[0]).to("meta")
    opt = torch.optim.AdamW(list(params.values()), lr=1e-3)

    def one(p, b, x_t, t):
        return functional_call(template, (p, b), (x_t, t, text))

    forward = vmap(one)  # over the model axis of weights, buffers, inputs and timesteps

    def step(x0, t, noise):
        x_t, target = flow_inputs(x0, t, noise)
        # Each model's loss is its own MSE; their sum has each model's gradient in its slice of the stacked weights.
        loss = (forward(params, buffers, x_t, t) - target).pow(2).flatten(1).mean(1).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grads = [p.grad for p in params.values() if p.grad is not None]
        norms = torch.stack([g.flatten(1).norm(dim=1) for g in grads], 1).norm(dim=1)  # (K,) per-model norms
        scale = (1.0 / (norms + 1e-6)).clamp(max=1.0)  # clip_grad_norm_'s rule, per model
        for g in grads:
            g.mul_(scale.view(-1, *[1] * (g.dim() - 1)))
        opt.step()

    return step, params


def bench_stacked_seeds(s: dict) -> list[Row]:
    k, repeats = s["stacked_k"], s["stacked_repeats"]
    text = fake_text(BATCH)
    models = []
    for seed in range(k):
        torch.manual_seed(seed)
        models.append(build_dit("adaln_zero", SHAPE))
    g = torch.Generator().manual_seed(0)

    def inputs():
        return (torch.randn(k, BATCH, *SHAPE, generator=g).to(DEVICE), torch.rand(k, BATCH, generator=g).to(DEVICE),
                torch.randn(k, BATCH, *SHAPE, generator=g).to(DEVICE))

    # The same three steps on both paths must give the same weights (fp32 summation order aside).
    seq_models = [copy.deepcopy(m) for m in models]
    seq, (stk, stacked) = sequential_step(seq_models, text), stacked_step([copy.deepcopy(m) for m in models], text)
    for _ in range(3):
        batch = inputs()
        seq(*batch), stk(*batch)
    diff = max((stacked[n][i] - p).abs().max().item()
               for i, m in enumerate(seq_models) for n, p in m.named_parameters())
    batch = inputs()
    t = side_by_side({"sequential": lambda: seq(*batch), "stacked": lambda: stk(*batch)}, repeats=repeats, warmup=1)
    rows = [Row("14 stacked seeds", f"{name}: {k} tiny adaLN-Zero DiTs, batch {BATCH} each, "
                f"{torch.get_num_threads()} thread(s)", f"{k * BATCH / t[name].median:.4g}", "clips/s",
                f"{t[name].median * 1e3:.4g} ms per step of all {k}; {t[name].spread()}") for name in t]
    rows.append(Row("14 stacked seeds", "stacked / sequential throughput", f"{t['sequential'].median / t['stacked'].median:.3g}",
                    "×", f"same arithmetic: weights after 3 identical steps differ by at most {diff:.1e}; one process, "
                    "bare steps (no Lightning, EMA or data loader on either side)"))
    return rows
