"""The causal video VAE: shapes, frame-count rules, causality, the identity VAE, the loss, and the LightningModule
(scale factor in last.ckpt, fast_dev_run, resume, reconstruction artifacts). Tiny models, data built here."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from sorabench.models.vae import CausalVideoVAE, IdentityVAE, build_vae, vae_loss
from sorabench.training.vae_module import VAEModule

TINY = {"factor": "causal", "base_channels": 8, "latent_channels": 4, "spatial_factor": 4, "temporal_factor": 1}


def moving_squares(n: int, frames: int = 5, size: int = 16, seed: int = 0) -> torch.Tensor:
    """(n, 3, T, H, W) in [-1, 1]: a coloured square moving one pixel per frame on a black background."""
    g = torch.Generator().manual_seed(seed)
    video = -torch.ones(n, 3, frames, size, size)
    for i in range(n):
        colour = torch.rand(3, generator=g) * 2 - 1
        y, x = (int(v) for v in torch.randint(0, size - 6, (2,), generator=g))
        for t in range(frames):
            video[i, :, t, y : y + 5, (x + t) % (size - 5) : (x + t) % (size - 5) + 5] = colour[:, None, None]
    return video


def loader(n: int = 8, batch_size: int = 4, frames: int = 5) -> torch.utils.data.DataLoader:
    videos = moving_squares(n, frames)
    items = [{"video": v, "caption": f"clip {i}"} for i, v in enumerate(videos)]
    return torch.utils.data.DataLoader(items, batch_size=batch_size)


def trainer(tmp_path, **kwargs) -> L.Trainer:
    defaults = dict(
        logger=False, enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        default_root_dir=tmp_path, accelerator="cpu",
    )  # fmt: skip
    return L.Trainer(**{**defaults, **kwargs})


def randomise(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random weights everywhere: the identity / zero inits would make a causality test pass trivially."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model.eval()


# ---- the model ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("spatial", [1, 2, 4, 8])
@pytest.mark.parametrize("temporal", [1, 2, 4])
def test_latent_shapes(spatial, temporal):
    vae = CausalVideoVAE(spatial_factor=spatial, temporal_factor=temporal, base_channels=4, latent_channels=3)
    for frames in (1, 1 + temporal, 1 + 2 * temporal):
        x = torch.rand(2, 3, frames, 16, 16) * 2 - 1
        recon, mean, logvar = vae(x)
        expected = (3, 1 + (frames - 1) // temporal, 16 // spatial, 16 // spatial)
        assert vae.latent_shape(frames, 16, 16) == expected
        assert mean.shape == logvar.shape == (2, *expected)
        assert recon.shape == x.shape


def test_bad_frame_count_and_size_raise():
    vae = CausalVideoVAE(spatial_factor=4, temporal_factor=2, base_channels=4)
    with pytest.raises(ValueError, match=r"num_frames=8 .*temporal_factor=2.*\(e\.g\. 9\)"):
        vae.latent_frames(8)
    with pytest.raises(ValueError, match="num_frames=8"):
        vae.encode(torch.zeros(1, 3, 8, 16, 16))
    with pytest.raises(ValueError, match="height=18.*spatial_factor=4"):
        vae.latent_shape(9, 18, 16)
    with pytest.raises(ValueError, match="temporal_factor=3"):
        CausalVideoVAE(temporal_factor=3)


@pytest.mark.parametrize("temporal", [1, 2])
def test_encoder_and_decoder_are_causal(temporal):
    torch.manual_seed(0)
    vae = randomise(CausalVideoVAE(spatial_factor=2, temporal_factor=temporal, base_channels=8))
    frames = 1 + 4 * temporal
    x = torch.rand(1, 3, frames, 8, 8) * 2 - 1
    mean = vae.encode(x)[0]
    for k in range(frames - 1):  # change every frame after k: latent frames j with j * temporal <= k must not move
        changed = x.clone()
        changed[:, :, k + 1 :] = torch.rand_like(changed[:, :, k + 1 :]) * 2 - 1
        new_mean = vae.encode(changed)[0]
        keep = k // temporal + 1
        torch.testing.assert_close(new_mean[:, :, :keep], mean[:, :, :keep], rtol=0, atol=1e-5)
        assert not torch.allclose(new_mean[:, :, keep], mean[:, :, keep])
    # Decoder: changing latent frames after j leaves output frames 0 .. j * temporal unchanged.
    recon = vae.decode(mean)
    for j in range(mean.shape[2] - 1):
        changed = mean.clone()
        changed[:, :, j + 1 :] += 1.0
        torch.testing.assert_close(vae.decode(changed)[:, :, : j * temporal + 1], recon[:, :, : j * temporal + 1])


def test_single_image_is_the_first_frame_of_a_video():
    vae = randomise(CausalVideoVAE(spatial_factor=2, temporal_factor=2, base_channels=8))
    x = torch.rand(1, 3, 5, 8, 8) * 2 - 1
    torch.testing.assert_close(vae.encode(x[:, :, :1])[0], vae.encode(x)[0][:, :, :1], rtol=0, atol=1e-5)


def test_identity_vae_round_trip_is_exact():
    vae = build_vae(factor="none")
    assert isinstance(vae, IdentityVAE)
    x = torch.rand(2, 3, 4, 8, 8) * 2 - 1
    recon, mean, logvar = vae(x, sample=True)
    assert torch.equal(recon, x) and torch.equal(vae.decode(vae.encode(x)[0]), x)
    assert logvar.shape == x.shape and (logvar <= -20).all()
    assert vae.latent_shape(4, 8, 8) == (3, 4, 8, 8)


def test_build_vae_rejects_unknown_factor_and_fields():
    with pytest.raises(ValueError, match="vae factor 'foo'"):
        build_vae(factor="foo")
    with pytest.raises(TypeError):
        build_vae(factor="causal", spatial_factr=4)


@pytest.mark.parametrize("recon_loss", ["l1", "l2"])
def test_vae_loss_decreases_on_tiny_overfit(recon_loss):
    torch.manual_seed(0)
    vae = CausalVideoVAE(spatial_factor=2, base_channels=8)
    x = moving_squares(2, frames=3, size=8)
    opt = torch.optim.AdamW(vae.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        recon, mean, logvar = vae(x)
        out = vae_loss(recon, x, mean, logvar, kl_weight=1e-6, recon_loss=recon_loss)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(out["loss"].item())
    assert set(out) == {"loss", "recon", "kl"}
    assert losses[-1] < 0.5 * losses[0]


def test_vae_loss_ssim_term():
    x = moving_squares(1, frames=2)
    mean, logvar = torch.zeros(1, 4, 2, 4, 4), torch.zeros(1, 4, 2, 4, 4)
    exact = vae_loss(x, x, mean, logvar, kl_weight=1.0, ssim_weight=1.0)
    assert exact["ssim"].item() == pytest.approx(1.0) and exact["loss"].item() == pytest.approx(0.0, abs=1e-6)
    noisy = vae_loss(x + 0.3 * torch.randn_like(x), x, mean, logvar, kl_weight=1.0, ssim_weight=1.0)
    assert noisy["ssim"] < 0.9 and noisy["loss"] > noisy["recon"]
    with pytest.raises(ValueError, match="recon_loss='l3'"):
        vae_loss(x, x, mean, logvar, kl_weight=1.0, recon_loss="l3")


# ---- the LightningModule -----------------------------------------------------------------------------------------


def test_scale_factor_is_computed_saved_in_last_ckpt_and_reloaded(tmp_path):
    torch.manual_seed(0)
    module = VAEModule(vae=TINY, lr=1e-3, num_frames=5, height=16, width=16)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, every_n_train_steps=1)
    trainer(tmp_path, max_steps=2, limit_val_batches=1, callbacks=[checkpoint]).fit(module, loader(), loader())
    scale = float(module.scale_factor)
    assert scale != 1.0 and scale > 0
    loaded = VAEModule.load_from_checkpoint(tmp_path / "ckpt" / "last.ckpt")
    assert float(loaded.scale_factor) == pytest.approx(scale)
    assert loaded.hparams.vae == TINY and loaded.hparams.num_frames == 5
    # The scaled latents have unit std on the data the factor was computed on, and decode_latents undoes the scale.
    video = next(iter(loader(batch_size=8)))["video"]
    mean, logvar = loaded.encode_latents(video)
    assert mean.std().item() == pytest.approx(1.0, rel=0.05)
    torch.testing.assert_close(loaded.decode_latents(mean), loaded.vae.decode(loaded.vae.encode(video)[0]))


def test_fast_dev_run_logs_losses_and_metrics(tmp_path):
    module = VAEModule(vae={**TINY, "temporal_factor": 2}, ssim_weight=0.1)
    fit_trainer = trainer(tmp_path, fast_dev_run=True)
    fit_trainer.fit(module, loader(), loader())
    logged = set(fit_trainer.callback_metrics)
    assert {"train/loss", "train/recon", "train/kl", "train/ssim", "val/loss", "val/psnr", "val/ssim"} <= logged
    assert float(module.scale_factor) != 1.0


def test_resume_from_last_ckpt_continues_at_the_saved_step(tmp_path):
    torch.manual_seed(0)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, every_n_train_steps=1)
    trainer(tmp_path, max_steps=2, limit_val_batches=0, callbacks=[checkpoint]).fit(VAEModule(vae=TINY), loader())

    class FirstStep(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.step = getattr(self, "step", trainer.global_step)

    first, checkpoint = FirstStep(), ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, every_n_train_steps=1)
    resumed = trainer(tmp_path, max_steps=4, limit_val_batches=0, callbacks=[first, checkpoint])
    resumed.fit(VAEModule(vae=TINY), loader(), ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    assert first.step == 2 and resumed.global_step == 4


def test_identity_vae_module_has_nothing_to_train(tmp_path):
    module = VAEModule(vae={"factor": "none"})
    x = moving_squares(2)
    assert torch.equal(module.decode_latents(module.encode_latents(x)[0]), x)
    with pytest.raises(ValueError, match="factor: none"):
        trainer(tmp_path, fast_dev_run=True).fit(module, loader())


def test_reconstructions_are_logged_to_mlflow(tmp_path):
    mlflow = pytest.importorskip("mlflow")
    from lightning.pytorch.loggers import MLFlowLogger

    from sorabench.data.video_io import read_frames

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    logger = MLFlowLogger(experiment_name="vae", tracking_uri=uri, artifact_location=str(tmp_path / "artifacts"))
    module = VAEModule(vae=TINY, num_preview_clips=2)
    trainer(tmp_path, max_epochs=1, limit_val_batches=1, logger=logger).fit(module, loader(), loader())
    logged = {a.path for a in mlflow.MlflowClient(uri).list_artifacts(logger.run_id, "reconstructions")}
    assert logged == {"reconstructions/reconstruction_step0000002.mp4", "reconstructions/reconstruction_step0000002.gif"}
    local = mlflow.MlflowClient(uri).download_artifacts(logger.run_id, "reconstructions", str(tmp_path / "dl"))
    frames, _ = read_frames(f"{local}/reconstruction_step0000002.mp4")
    assert frames.shape == (5, 2 * 16 * 4, 2 * 16 * 4, 3)  # T, 2 clips x H x upscale, (input | recon) x W x upscale
