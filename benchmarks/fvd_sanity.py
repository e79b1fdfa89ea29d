"""Sanity table for the embedded FVD: real vs real halves, real vs noised real, real vs an untrained model.

    .venv/bin/python benchmarks/fvd_sanity.py [hydra overrides of `sorabench train`, e.g. vae.max_steps=1000]

Uses the shared VAE and evaluator of those overrides (trained once and cached under outputs/, as a sweep would) and
the protocol of `conf/metrics/evaluator.yaml`: clips of the test split, the evaluator's 128-d clip features. A
well-behaved FVD is ~0 for two halves of the same data, grows monotonically with the noise, and is large for an
untrained model.
"""

from __future__ import annotations

import sys

import torch

from sorabench.config import compose_config, to_container
from sorabench.data.module import build_dataset
from sorabench.metrics.features import EvaluatorFeatures
from sorabench.metrics.fvd import FrechetVideoDistance
from sorabench.training.dit_run import build_dit_module
from sorabench.training.evaluator_module import ensure_evaluator, load_evaluator
from sorabench.training.runs import load_vae
from sorabench.training.vae_run import ensure_vae


def fvd(net, real: torch.Tensor, fake: torch.Tensor, batch: int = 128) -> float:
    metric = FrechetVideoDistance(net)
    for i in range(0, len(real), batch):
        metric.update(real[i : i + batch], real=True)
    for i in range(0, len(fake), batch):
        metric.update(fake[i : i + batch], real=False)
    return float(metric.compute())


def main(overrides: list[str]) -> None:
    cfg = compose_config("train", ["mlflow.enabled=false", *overrides], command="train")
    data = to_container(cfg.data)
    net = EvaluatorFeatures(load_evaluator(ensure_evaluator(cfg)).net)
    test = build_dataset(data, "test", train=False)
    clips = torch.stack([test[i]["video"] for i in range(len(test))])
    half = len(clips) // 2
    a, b = clips[:half], clips[half : 2 * half]
    g = torch.Generator().manual_seed(0)
    rows = [("real (first half) vs real (second half)", fvd(net, a, b))]
    for std in (0.1, 0.3, 0.6):
        noised = (b + std * torch.randn(b.shape, generator=g)).clamp(-1, 1)
        rows.append((f"real vs real + N(0, {std}²) noise", fvd(net, a, noised)))

    vae_ckpt = ensure_vae(cfg)
    vae = load_vae(vae_ckpt)
    latent_shape = vae.vae.latent_shape(cfg.data.num_frames, cfg.data.height, cfg.data.width)
    torch.manual_seed(0)
    untrained = build_dit_module(cfg, latent_shape, None, vae_ckpt)
    captions = [test[i]["caption"] for i in range(half, 2 * half)]
    samples = untrained.pipeline(vae).sample_videos(captions, steps=cfg.metrics.sample_steps, guidance_scale=cfg.metrics.cfg, seed=0)
    rows.append(("real vs an untrained DiT (decoded by the VAE)", fvd(net, a, samples)))
    rows.append(("real vs uniform noise clips", fvd(net, a, torch.rand(b.shape, generator=g) * 2 - 1)))

    print(f"FVD with {net.id} (sha256 {net.sha256[:12]}), {half} vs {half} clips of the {cfg.data.name} test split\n")
    print("| comparison | FVD |\n|---|---|")
    for name, value in rows:
        print(f"| {name} | {value:.2f} |")


if __name__ == "__main__":
    main(sys.argv[1:])
