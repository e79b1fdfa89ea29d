"""The VAE's ceiling for a VAE variant: train it at the ablation's VAE budget (shared-asset cache under OUTPUTS), then
read its reconstructions of the 512 `shapes` test clips with an evaluator checkpoint (the ablation's shared one).

    .venv/bin/python experiments/conditioning_ablation/ceiling.py OUTPUTS EVALUATOR_CKPT [vae overrides ...]
    e.g. ... outputs/ceil outputs/train_evaluator/auto-*/checkpoints/last.ckpt vae.model.spatial_factor=2

Prints one JSON row: VAE training seconds, val PSNR on those clips, and the evaluator's accuracy per attribute
(`reference_points`, the same computation as the report's `eval/ceiling_acc_*`)."""

import json
import sys
import time

import torch

from sorabench.config import compose_config
from sorabench.data.shapes import ShapesConfig, ShapesDataset
from sorabench.metrics.evaluate import reference_points
from sorabench.training.vae_run import ensure_vae
from sorabench.training.evaluator_module import load_evaluator
from sorabench.training.runs import load_vae

outputs, evaluator_ckpt, overrides = sys.argv[1], sys.argv[2], sys.argv[3:]
cfg = compose_config("train", [f"outputs={outputs}", "mlflow.enabled=false", "vae.max_steps=1000",
                               "trainer.progress_bar=false", *overrides], command="train")
t0 = time.time()
vae = load_vae(ensure_vae(cfg))
train_s = time.time() - t0
evaluator = load_evaluator(evaluator_ckpt)
test = ShapesDataset(ShapesConfig(), "test")
video = torch.stack([test[i]["video"] for i in range(len(test))])
labels = torch.stack([test[i]["labels"] for i in range(len(test))])
unseen = torch.stack([torch.as_tensor(test[i]["unseen"]) for i in range(len(test))])
batches = [video[i:i + 64] for i in range(0, len(video), 64)]
with torch.no_grad():
    acc = reference_points(evaluator.net, batches, labels, unseen, vae_module=vae)
    mse = torch.stack([(vae.vae.decode(vae.vae.encode(b)[0]).clamp(-1, 1) - b).pow(2).mean() for b in batches]).mean()
row = {"overrides": overrides, "vae_train_s": round(train_s, 1), "psnr_db": round(float(10 * torch.log10(4 / mse)), 2),
       **{k.removeprefix("eval/ceiling_acc_"): round(v, 4) for k, v in acc.items() if "ceiling" in k}}
print(json.dumps(row))
