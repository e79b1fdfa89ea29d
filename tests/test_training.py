"""The training loop's pieces that sorabench configures itself: the EMA callback, the fused optimiser, compile."""

import math
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import EMAWeightAveraging

from sorabench.config import ConfigError, compose_config
from sorabench.training.dit_run import train
from sorabench.training.dit_module import build_optimizer
from sorabench.training.callbacks import EMA
from sorabench.training.trainer import lr_schedule


class Regression(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def train_with(callback) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    module = Regression()
    data = torch.utils.data.TensorDataset(torch.randn(32, 3), torch.randn(32, 1))
    trainer = L.Trainer(max_steps=6, callbacks=[callback], logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=4))
    return {k: v.clone() for k, v in module.state_dict().items()}


def test_ema_matches_lightnings_ema_weight_averaging():
    # Same schedule and decay as Lightning's per-tensor EMAWeightAveraging; only the update is one foreach lerp.
    ours = train_with(EMA(decay=0.7, start_step=2))
    lightning = train_with(EMAWeightAveraging(decay=0.7, update_starting_at_step=2))
    plain = train_with(L.Callback())
    for key in ours:
        torch.testing.assert_close(ours[key], lightning[key])
    assert any(not torch.allclose(ours[k], plain[k]) for k in ours)  # the EMA weights were swapped in at the end


@pytest.mark.parametrize("fused", [True, False])
def test_fused_adamw_makes_the_same_update(fused):
    torch.manual_seed(0)
    a, b = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)
    b.load_state_dict(a.state_dict())
    optim = {"lr": 1e-2, "betas": [0.9, 0.99], "weight_decay": 0.01}
    opt_a, opt_b = build_optimizer(list(a.parameters()), {**optim, "fused": fused}), torch.optim.AdamW(
        b.parameters(), lr=1e-2, betas=(0.9, 0.99), weight_decay=0.01)
    assert opt_a.defaults["fused"] is fused
    x = torch.randn(8, 4)
    for _ in range(3):
        for model, opt in ((a, opt_a), (b, opt_b)):
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q)


@pytest.mark.parametrize("schedule", ["cosine", "constant"])
@pytest.mark.parametrize("warmup", [0, 3])
def test_lr_schedule_is_the_dit_and_evaluator_recipes(schedule, warmup):
    # The closures lr_schedule replaced, verbatim: the DiT's (warm-up, then cosine to `final`) and the evaluator's
    # (cosine from step 0, scaled by the warm-up).
    def dit(step, total=20, final=0.1):
        if step < warmup:
            return (step + 1) / warmup
        if schedule == "constant":
            return 1.0
        return final + (1 - final) * 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))

    def evaluator(step, total=20):
        return min(1.0, (step + 1) / warmup) * 0.5 * (1.0 + math.cos(math.pi * min(step / total, 1.0)))

    new_dit = lr_schedule(warmup, 20, final=0.1, schedule=schedule)
    assert [new_dit(s) for s in range(25)] == pytest.approx([dit(s) for s in range(25)], abs=1e-12)
    if warmup and schedule == "cosine":
        new_evaluator = lr_schedule(warmup, 20, decay_during_warmup=True)
        assert [new_evaluator(s) for s in range(25)] == pytest.approx([evaluator(s) for s in range(25)], abs=1e-12)


def test_compile_must_be_a_bool(tiny_overrides):
    with pytest.raises(ConfigError, match="compile"):  # the typed schema, at compose time
        train(compose_config("train", [*tiny_overrides, "compile=maybe"], command="train"))


@pytest.mark.slow
def test_compiled_training_keeps_checkpoints_portable(tiny_overrides):
    # ~40 s: torch.compile generates C++ kernels for the forward and the backward.
    cfg = compose_config("train", [*tiny_overrides, "name=compiled", "compile=true", "trainer.max_steps=3",
                                   "trainer.limit_val_batches=0",  # one compiled graph (training), not two
                                   "evaluate.enabled=false", "mlflow.enabled=false"], command="train")
    result = train(cfg)
    state = torch.load(result["ckpt"], weights_only=True)["state_dict"]
    assert state and not any("_orig_mod" in key for key in state)  # same keys as an eager run
    assert Path(result["ckpt"]).is_file()


class ValidatedRegression(Regression):
    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val/loss", torch.nn.functional.mse_loss(self.net(x), y))

    def pipeline(self, vae=None):  # what EvaluateCallback evaluates: here the module itself, to read its weights
        return self


def test_periodic_evaluation_sees_the_ema_weights(tiny_overrides, monkeypatch):
    # EvaluateCallback must run while the EMA weights are swapped in (the final evaluation uses them too), i.e.
    # before the EMA callback swaps the training weights back at the end of validation.
    from sorabench.metrics import evaluate
    from sorabench.training.dit_run import training_callbacks

    seen = {}
    monkeypatch.setattr(evaluate, "evaluate_module", lambda module, cfg, logger=None, step=0: seen.setdefault(
        step, {k: v.clone() for k, v in module.state_dict().items()}) and {})
    cfg = compose_config("train", [*tiny_overrides, "evaluate.every_n_steps=6", "evaluate.enabled=false",
                                   "mlflow.enabled=false",
                                   "ema.start_step=0", "ema.decay=0.7"], command="train")
    callbacks = training_callbacks(cfg, val_cache={})
    torch.manual_seed(0)
    module = ValidatedRegression()
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(32, 3), torch.randn(32, 1)), 4)
    trainer = L.Trainer(max_steps=6, val_check_interval=6, callbacks=callbacks, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0)
    trainer.fit(module, data, data)
    raw = train_with(L.Callback())  # the same run without EMA: its final weights are the raw weights
    final = module.state_dict()  # the EMA weights, swapped in at the end of training
    assert list(seen) == [6]
    for key in final:
        torch.testing.assert_close(seen[6][key], final[key])
    assert any(not torch.allclose(seen[6][k], raw[k]) for k in raw)


def test_a_callers_tags_go_on_the_run_its_strategy_tag_included(tiny_overrides):
    # `train` tags the run with its strategy unless the caller (a sweep trial, a user's script) gives one.
    import mlflow

    cfg = compose_config("train", [*tiny_overrides, "name=tagged", "evaluate.enabled=false", "sample.log_every_n_val=0",
                                   "trainer.max_steps=2"], command="train")
    result = train(cfg, tags={"sorabench.strategy": "adaln_zero (lab variant)", "lab.note": "x"})
    tags = mlflow.MlflowClient(tracking_uri=cfg.mlflow.tracking_uri).get_run(result["run_id"]).data.tags
    assert tags["sorabench.strategy"] == "adaln_zero (lab variant)" and tags["lab.note"] == "x"


@pytest.mark.parametrize("text_encoder", ["minilm", "learned"])
def test_the_lightning_module_holds_only_what_trains(tiny_overrides, text_encoder):
    # The frozen text encoder and the VAE stay out of the DiTModule (its state_dict, EMA copy and optimiser); a
    # pipeline composes them for sampling. A learned text encoder trains, so it is the module's own.
    from sorabench.latents import LatentDataModule
    from sorabench.pipeline import TextToVideo
    from sorabench.training.dit_run import build_dit_module

    cfg = compose_config("train", [*tiny_overrides, f"text_encoder={text_encoder}"], command="train")
    captions = ["a red circle moving left slowly", "a big blue square moving up quickly"]
    vocab = None
    if text_encoder == "learned":
        from sorabench.models.text import LearnedTextEncoder

        vocab = LearnedTextEncoder.from_captions(captions).vocab
    module = build_dit_module(cfg, (4, 8, 8, 8), vocab, "none")
    keys = module.state_dict().keys()
    assert not any(k.startswith(("vae.", "transformer.")) or ".transformer." in k for k in keys)
    assert any(k.startswith("learned_text.") for k in keys) == (text_encoder == "learned")
    assert not any(isinstance(m, torch.nn.Module) and type(m).__name__ == "MiniLMTextEncoder" for m in module.modules())

    # A training batch carries the frozen encoder's embeddings (looked up, not computed by the module).
    n = len(captions)
    cache = {"mean": torch.zeros(n, 4, 8, 8, 8), "logvar": torch.zeros(n, 4, 8, 8, 8), "scale_factor": 1.0,
             "captions": captions, "labels": torch.zeros(n, 5, dtype=torch.long), "unseen": torch.zeros(n, dtype=bool)}
    frozen = None if module.learned_text is not None else module.text_encoder()
    batch = next(iter(LatentDataModule(cache, cache, n, text_encoder=frozen).val_dataloader()))
    assert ("text" in batch) == (text_encoder == "minilm")
    assert module.batch_text(batch).tokens.shape[0] == n

    class Decoder(torch.nn.Module):  # stands in for a VAEModule: latents -> clips
        def decode_latents(self, z):
            return z[:, :3]

    pipeline = module.pipeline(Decoder())
    assert isinstance(pipeline, TextToVideo) and pipeline.model is module.model
    module.train()
    videos = pipeline.sample_videos(captions, steps=2, guidance_scale=2.0, seed=0, batch_size=1)
    assert videos.shape == (n, 3, 8, 8, 8) and module.training  # sampling restores the training mode
    pieces = [pipeline.sample_videos(captions[i : i + 1], steps=2, guidance_scale=2.0, seed=i) for i in range(n)]
    torch.testing.assert_close(videos, torch.cat(pieces))  # piece by piece at the same batch boundaries
