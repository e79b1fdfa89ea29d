"""LightningModule that trains the causal video VAE and owns its latent scale factor.

Batches are dicts with `video` (B, 3, T, H, W) in [-1, 1]; other keys are ignored. Validation reconstructs from the
posterior mean and reports per-frame PSNR and SSIM on [-1, 1] with data_range 2 (the same numbers as on [0, 1] with
data_range 1), and, under an MLFlowLogger, logs input | reconstruction videos as artifacts.

Budget: batch 4, lr 4e-3, 1300 steps (`conf/vae/default.yaml`): at a short, fixed compute budget more, smaller steps
win over fewer, larger ones in the same time (the measured times and PSNRs: benchmarks/RESULTS.md).

Latent scale factor. Diffusion wants latents of about unit variance, so, as Stable Diffusion's 0.18215, the module
keeps `scale_factor` = 1 / std of the posterior means over a sample of training data, and the DiT side works with
z_scaled = mean * scale_factor (`encode_latents` / `decode_latents`). It is computed once, in `on_fit_end`, after
the last checkpoint was written; so `on_fit_end` saves `last.ckpt` again (the ModelCheckpoint's last_model_path),
which then holds the trained weights and the scale factor. Other checkpoints (e.g. best-by-PSNR) keep 1.0: load
`last.ckpt`, or call `compute_scale_factor` on the loaded module.
"""

from __future__ import annotations

import math
import tempfile

import lightning as L
import torch
from lightning.pytorch.loggers import MLFlowLogger
from torch import Tensor
from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure

from sorabench.data.video_io import write_clips
from sorabench.models.vae import build_vae, vae_loss, video_frames

DECAY_FRACTION = 0.3  # share of the run over which the learning rate decays linearly to zero
PREVIEW_UPSCALE = 4  # pixel repetition of the logged comparison videos: 32x32 clips are too small to judge


class VAEModule(L.LightningModule):
    def __init__(
        self,
        vae: dict,
        lr: float = 4e-3,
        kl_weight: float = 1e-6,
        recon_loss: str = "l2",
        ssim_weight: float = 0.0,
        weight_decay: float = 0.0,
        num_frames: int | None = None,
        height: int | None = None,
        width: int | None = None,
        num_preview_clips: int = 4,
    ):
        """`vae`: build_vae kwargs (a conf/vae group's `model`). `num_frames`, `height`, `width`: the clip size of the
        training data, recorded in the hyperparameters for readers of the checkpoint; training does not need them."""
        super().__init__()
        self.save_hyperparameters()
        self.vae = build_vae(**vae)
        self.register_buffer("scale_factor", torch.tensor(1.0))
        self.val_psnr = PeakSignalNoiseRatio(data_range=2.0, dim=(1, 2, 3))  # dim: one PSNR per frame, then a mean
        self.val_ssim = StructuralSimilarityIndexMeasure(data_range=2.0)
        self.preview: tuple[Tensor, Tensor] | None = None  # (inputs, reconstructions) of the first val batch

    def _losses(self, video: Tensor, sample: bool) -> tuple[Tensor, dict[str, Tensor]]:
        recon, mean, logvar = self.vae(video, sample=sample)
        hp = self.hparams
        return recon, vae_loss(recon, video, mean, logvar, hp.kl_weight, hp.recon_loss, hp.ssim_weight)

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        video = batch["video"]
        _, losses = self._losses(video, sample=True)
        for name, value in losses.items():
            self.log(f"train/{name}", value, prog_bar=name == "loss", batch_size=video.shape[0])
        return losses["loss"]

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        video = batch["video"]
        recon, losses = self._losses(video, sample=False)
        recon = recon.clamp(-1, 1)
        self.val_psnr(video_frames(recon), video_frames(video))
        self.val_ssim(video_frames(recon), video_frames(video))
        n = video.shape[0]
        self.log("val/loss", losses["loss"], on_epoch=True, batch_size=n)
        self.log("val/psnr", self.val_psnr, on_epoch=True, prog_bar=True, batch_size=n)
        self.log("val/ssim", self.val_ssim, on_epoch=True, batch_size=n)
        if batch_idx == 0:
            k = self.hparams.num_preview_clips
            self.preview = (video[:k].detach().cpu(), recon[:k].detach().cpu())

    def on_validation_epoch_end(self) -> None:
        if self.preview is None or self.trainer.sanity_checking or not self.trainer.is_global_zero:
            return
        if isinstance(self.logger, MLFlowLogger):
            self.log_reconstructions(*self.preview)
        self.preview = None

    def log_reconstructions(self, video: Tensor, recon: Tensor) -> None:
        """One mp4 and one gif per validation: a row per clip, input | reconstruction side by side."""
        rows = torch.cat([video, recon], dim=-1)  # (k, C, T, H, 2W)
        grid = torch.cat(list(rows), dim=-2)  # (C, T, k*H, 2W)
        with tempfile.TemporaryDirectory() as tmp:
            for path in write_clips(tmp, [grid], [f"reconstruction_step{self.global_step:07d}"], scale=PREVIEW_UPSCALE):
                self.logger.experiment.log_artifact(self.logger.run_id, str(path), artifact_path="reconstructions")

    def configure_optimizers(self):
        params = list(self.parameters())
        if not params:
            raise ValueError("this VAE has no parameters to train (factor: none): use VAEModule(vae=...) untrained")
        hp = self.hparams
        optimizer = torch.optim.AdamW(params, lr=hp.lr, weight_decay=hp.weight_decay)
        total = self.trainer.estimated_stepping_batches
        if not math.isfinite(total):
            return optimizer

        def lr_factor(step: int) -> float:
            # Warmup-free "stable then decay": constant, then linear to zero over the last DECAY_FRACTION of the run.
            # At this short budget it beat a cosine decay from the same peak (benchmarks/RESULTS.md): the lr stays
            # high longer.
            return min(1.0, (1.0 - step / max(total, 1)) / DECAY_FRACTION)

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ---- latent scale factor and the DiT-side interface ---------------------------------------------------------

    @torch.no_grad()
    def compute_scale_factor(self, dataloader, max_batches: int = 8) -> float:
        """Set `scale_factor` to 1 / std of the posterior means over the first `max_batches` batches; returns it."""
        was_training = self.training
        self.eval()
        means = []
        for i, batch in enumerate(dataloader):
            if i == max_batches:
                break
            means.append(self.vae.encode(batch["video"].to(self.device))[0].flatten())
        self.train(was_training)
        self.scale_factor.fill_(1.0 / torch.cat(means).float().std())
        return float(self.scale_factor)

    def on_fit_end(self) -> None:
        trainer = self.trainer
        loader = trainer.datamodule.train_dataloader() if trainer.datamodule is not None else trainer.train_dataloader
        # Under DDP each rank sees other data: adopt rank 0's value so every copy of the weights agrees.
        self.scale_factor.fill_(trainer.strategy.broadcast(self.compute_scale_factor(loader), src=0))
        checkpoint = trainer.checkpoint_callback
        if checkpoint is not None and checkpoint.last_model_path:
            trainer.save_checkpoint(checkpoint.last_model_path, weights_only=False)  # full: resumable

    @torch.no_grad()
    def encode_latents(self, video: Tensor) -> tuple[Tensor, Tensor]:
        """Scaled posterior (mean * s, logvar + 2 log s): the distribution of z_scaled = z * scale_factor."""
        mean, logvar = self.vae.encode(video)
        return mean * self.scale_factor, logvar + 2.0 * self.scale_factor.log()

    @torch.no_grad()
    def decode_latents(self, z_scaled: Tensor) -> Tensor:
        """Videos (B, 3, T, H, W), unclamped, from scaled latents."""
        return self.vae.decode(z_scaled / self.scale_factor)
