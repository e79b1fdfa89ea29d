"""Do two feature networks agree? FVD of real clips against corrupted real clips, read by the accuracy instrument
and by networks trained apart from it (issue #24, "independent evidence").

    .venv/bin/python benchmarks/feature_agreement.py [--n 256] [--outputs DIR] [override ...]

Overrides are Hydra overrides of the `train` config (the data and evaluator settings of the run to check; default:
the single-object ablation's data and its 400-step evaluator). Three networks, each trained once (cached in DIR):
  instrument           the evaluator every ablation so far used: trained on the DiT's own data, seed 0;
  instrument, wide     the same at seed 0 on wider data (`metrics.evaluator.data={position_range: 1.0}`);
  feature net          `metrics.feature_evaluator={seed: 1, data: {position_range: 1.0}}`: another seed, wider data.
For each, its accuracy on the run's own test clips, then FVD between N real test clips (A) and N real final-split
clips (B, other clips of the same data), B corrupted in ways that change what a caption says (direction: time
reversed; colour: channels permuted; position: shifted) and ways that do not (noise, blur, shuffled or still frames).
Agreement is Kendall's tau and Spearman's rho between two networks' FVDs over the rows: 1 = the same ordering.
"""

from __future__ import annotations

import argparse
import platform

import torch
import torch.nn.functional as F
from scipy import stats

from sorabench.config import compose_config, to_container
from sorabench.data.module import build_dataset
from sorabench.metrics.features import EvaluatorFeatures
from sorabench.metrics.fvd import FrechetVideoDistance
from sorabench.training.evaluator_module import ensure_evaluator, load_evaluator
from sorabench.training.runs import finished_result

NETWORKS = {  # name: overrides of the metrics config, and which evaluator block the network is
    "instrument": ([], "evaluator"),
    "instrument, wide": (["metrics.evaluator.data={position_range: 1.0}"], "evaluator"),
    "feature net": (["metrics.feature_evaluator={seed: 1, data: {position_range: 1.0}}"], "feature_evaluator"),
}


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def clips(data: dict, split: str, n: int) -> torch.Tensor:
    dataset = build_dataset(data, split, train=False)
    return torch.stack([dataset[i]["video"] for i in range(n)])


def corruptions(b: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    t = b.shape[2]
    frames = b.transpose(1, 2).flatten(0, 1)
    blur = F.avg_pool2d(frames, 3, stride=1, padding=1, count_include_pad=False)
    blur = blur.unflatten(0, (len(b), t)).transpose(1, 2)
    rows = [("real B (other clips)", b)]
    rows += [(f"B + N(0, {s}^2) noise", (b + s * torch.randn(b.shape, generator=g)).clamp(-1, 1)) for s in (0.1, 0.3)]
    rows += [("B blurred (3x3 box)", blur),
             ("B, frames shuffled in time", b[:, :, torch.randperm(t, generator=g)]),
             ("B, first frame repeated (still)", b[:, :, :1].expand_as(b).contiguous()),
             ("B, time reversed (every direction flipped)", b.flip(2)),
             ("B, colour channels permuted (RGB -> GBR)", b[:, [1, 2, 0]]),
             ("B, shifted 4 px right (wrapping)", b.roll(4, dims=-1))]
    return rows


def fvds(net, a: torch.Tensor, rows, bs: int = 128) -> list[float]:
    metric = FrechetVideoDistance(EvaluatorFeatures(net), reset_real_features=False)
    for i in range(0, len(a), bs):
        metric.update(a[i : i + bs], real=True)
    out = []
    for _, b in rows:
        metric.reset()
        for i in range(0, len(b), bs):
            metric.update(b[i : i + bs], real=False)
        out.append(float(metric.compute()))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=256, help="clips per side")
    parser.add_argument("--outputs", default="outputs", help="where the evaluators are trained and cached")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of the train config (data, evaluator)")
    args = parser.parse_args()
    base = [f"outputs={args.outputs}", "metrics.evaluator.max_steps=400", "mlflow.enabled=false", *args.overrides]
    print(f"CPU: {cpu_name()}, torch {torch.__version__}, threads {torch.get_num_threads()}; N = {args.n} per side")
    nets, accuracy = {}, {}
    for name, (extra, block) in NETWORKS.items():
        cfg = compose_config("train", [*base, *extra], command="train")
        ckpt = ensure_evaluator(cfg, block)
        result = next(finished_result(p) for p in ckpt.parents if finished_result(p))
        accuracy[name] = result["accuracy"].get("target", result["accuracy"]["test"])
        nets[name] = load_evaluator(ckpt).net
    data = to_container(cfg.data)
    a, b = clips(data, "test", args.n), clips(data, "final", args.n)
    rows = corruptions(b)
    with torch.no_grad():
        table = {name: fvds(net, a, rows) for name, net in nets.items()}

    names = list(nets)
    attrs = [k for k in accuracy[names[0]] if k != "all"] + ["all"]
    print("\nAccuracy of each network on the run's own test clips (what the DiT's samples look like)\n")
    print("| network | " + " | ".join(attrs) + " |")
    print("|---" * (len(attrs) + 1) + "|")
    for name in names:
        print(f"| {name} | " + " | ".join(f"{accuracy[name][k]:.3f}" for k in attrs) + " |")
    print(f"\nFVD of A (test, {args.n}) against B (final, {args.n}) and corrupted B\n")
    print("| B | " + " | ".join(names) + " |")
    print("|---" * (len(names) + 1) + "|")
    for i, (label, _) in enumerate(rows):
        print(f"| {label} | " + " | ".join(f"{table[n][i]:.1f}" for n in names) + " |")
    print("\nAgreement of the orderings over these rows\n")
    print("| networks | Kendall tau | Spearman rho |")
    print("|---|---|---|")
    for i, x in enumerate(names):
        for y in names[i + 1 :]:
            tau, rho = stats.kendalltau(table[x], table[y]).statistic, stats.spearmanr(table[x], table[y]).statistic
            print(f"| {x} / {y} | {tau:.3f} | {rho:.3f} |")


if __name__ == "__main__":
    main()
