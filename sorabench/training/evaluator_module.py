"""LightningModule that trains the evaluator (`VideoAttributeClassifier`) on attribute labels.

Batches are dicts with `video` (B, 3, T, H, W) in [-1, 1] and `labels` LongTensor (B, A), one column per attribute
in the order of `attributes`. The loss is the sum of one cross-entropy per attribute head.
"""

from __future__ import annotations

import math

import lightning as L
import torch
import torch.nn.functional as F

from sorabench.models.evaluator import VideoAttributeClassifier


class EvaluatorModule(L.LightningModule):
    def __init__(
        self,
        attributes: dict[str, int],
        width: int = 32,
        feature_dim: int = 128,
        time_bins: int = 8,
        lr: float = 3e-3,
        weight_decay: float = 1e-2,
        warmup_steps: int = 20,
        max_noise_std: float = 0.3,
    ):
        """`max_noise_std`: training clips get Gaussian noise with a per-clip std drawn from U(0, max_noise_std)
        ([-1, 1] units), so the evaluator still reads the attributes of noisy generated clips."""
        super().__init__()
        self.save_hyperparameters()
        self.net = VideoAttributeClassifier(attributes, width, feature_dim, time_bins)
        self.attribute_names = list(attributes)

    def forward(self, video: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.net(video)

    def _loss(self, logits: dict[str, torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        return sum(F.cross_entropy(logits[name], labels[:, i]) for i, name in enumerate(self.attribute_names))

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        video = batch["video"]
        noise_std = self.hparams.max_noise_std * torch.rand(video.shape[0], 1, 1, 1, 1, device=video.device)
        video = video + noise_std * torch.randn_like(video)
        loss = self._loss(self(video), batch["labels"])
        self.log("train/loss", loss, prog_bar=True, batch_size=video.shape[0])
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        video, labels = batch["video"], batch["labels"]
        logits = self(video)
        correct = torch.stack(
            [logits[name].argmax(1) == labels[:, i] for i, name in enumerate(self.attribute_names)], dim=1
        )  # (B, A)
        n = video.shape[0]
        self.log("val/loss", self._loss(logits, labels), batch_size=n)
        for i, name in enumerate(self.attribute_names):
            self.log(f"val/acc/{name}", correct[:, i].float().mean(), batch_size=n)
        self.log("val/acc/all", correct.all(1).float().mean(), prog_bar=True, batch_size=n)

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        total = max(1, self.trainer.estimated_stepping_batches)
        warmup = self.hparams.warmup_steps

        def lr_factor(step: int) -> float:
            # Linear warm-up, then cosine decay to zero over the run: a short run needs its whole budget used well.
            return min(1.0, (step + 1) / warmup) * 0.5 * (1.0 + math.cos(math.pi * min(step / total, 1.0)))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
