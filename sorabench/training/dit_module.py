"""The DiT LightningModule: text-to-video diffusion on cached VAE latents, any conditioning strategy, any objective.

Batches come from the latent cache (`sorabench/latents.py`): `latent` (B, C, T', H', W') already multiplied by the
VAE's scale factor, `caption` list[str], and - with a frozen text encoder - `text`, the captions' embeddings, cached
beside the latents and looked up by the data module. Classifier-free guidance is trained by caption dropout to the
DiT's learned null condition; sampling batches the conditional and unconditional halves in one forward
(`diffusion.py`).

The module's state is what trains: the DiT and, with `text_encoder=learned`, the text encoder. A frozen encoder and
the VAE are deliberately outside it (not in its state_dict, its EMA copy or its optimiser); `pipeline(...)`
composes them with the DiT for sampling and evaluation (`sorabench.pipeline.TextToVideo`).
"""

from __future__ import annotations

import lightning as L
import torch

from sorabench.diffusion import build_diffusion
from sorabench.models.dit import DiT, caption_flops, forward_flops
from sorabench.models.text import TextEmbedding, build_text_encoder, frozen_text_encoder, is_frozen, text_dim
from sorabench.pipeline import TextToVideo
from sorabench.training.trainer import lr_schedule


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite; the message names the step."""


def build_optimizer(params: list[torch.nn.Parameter], optim: dict) -> torch.optim.AdamW:
    """AdamW from the `optim` config. fused (default): one kernel updates every parameter, instead of a Python loop
    of small ops per tensor - the loop is a measurable share of a small DiT's step (benchmarks/RESULTS.md)."""
    return torch.optim.AdamW(
        params,
        lr=optim["lr"],
        betas=tuple(optim.get("betas", (0.9, 0.999))),
        weight_decay=optim.get("weight_decay", 0.0),
        fused=bool(optim.get("fused", True)),
    )


def flops_budget_steps(module: "DiTModule", captions: list[str], reference: dict, steps: int) -> int:
    """`budget=flops`: the step count that gives `module` the training FLOPs of the `reference` strategy (its
    conditioning config, `name` and options; same backbone, same batch) at `steps` steps. Both are counted by
    `caption_flops` at the training split's real caption lengths; a step costs ~3 forwards for every strategy, so the
    ratio of forward GFLOPs is the ratio of step costs. A strategy twice as expensive per step gets half the steps."""
    options = {k: v for k, v in reference.items() if k != "name"}
    model = module.model
    h = module.hparams
    ref = DiT(model.latent_shape, conditioning=reference["name"], text_dim=model.text_dim,
              max_text_len=model.max_text_len, timestep_scale=module.diffusion.timestep_scale, **h.dit, **options)
    lengths = module.text_lengths(captions)
    return max(1, round(steps * caption_flops(ref, lengths) / caption_flops(model, lengths)))


class DiTModule(L.LightningModule):
    def __init__(
        self,
        latent_shape: tuple[int, int, int, int],
        dit: dict,
        conditioning: dict,
        text_encoder: dict,
        diffusion: dict,
        optim: dict,
        caption_dropout: float = 0.1,
        vocab: list[str] | None = None,
        sample: dict | None = None,
        vae_ckpt: str | None = None,
        compile: bool = False,
    ):
        super().__init__()
        self.save_hyperparameters(logger=False)  # the run logs its whole resolved config itself
        # A trained text encoder is a submodule (it is in the state_dict, the EMA and the optimiser); a frozen one
        # is not part of the module at all: its embeddings come with the batch.
        self.learned_text = (None if is_frozen(text_encoder["name"]) else
                             build_text_encoder(vocab=vocab or [], **text_encoder))
        self.diffusion = build_diffusion(**diffusion)
        cond_kwargs = {k: v for k, v in conditioning.items() if k != "name"}
        self.model = DiT(
            latent_shape,
            conditioning=conditioning["name"],
            text_dim=text_dim(**text_encoder),
            max_text_len=text_encoder.get("max_length", 32),
            timestep_scale=self.diffusion.timestep_scale,
            **dit,
            **cond_kwargs,
        )

    # ---- text and sampling ---------------------------------------------------------------------------------
    def text_encoder(self) -> torch.nn.Module:
        """The encoder of this module's `text_encoder` config: its own learned one, or the process's shared frozen
        one (`sorabench.models.text.frozen_text_encoder`)."""
        if self.learned_text is not None:
            return self.learned_text
        return frozen_text_encoder(**self.hparams.text_encoder)

    def pipeline(self, vae=None) -> TextToVideo:
        """Captions -> videos with this module's DiT (the weights it holds when sampling: EMA at validation) and
        `vae` (a `VAEModule`, or None for latents only)."""
        return TextToVideo(self.model, self.diffusion, self.text_encoder(), vae)

    def batch_text(self, batch: dict) -> TextEmbedding:
        """The batch's caption embeddings: looked up by the data module (frozen encoder), or encoded here (learned)."""
        if self.learned_text is not None:
            return self.learned_text.encode(list(batch["caption"])).to(self.device)
        if "text" not in batch:
            raise KeyError("a batch for a frozen text encoder carries `text` (LatentDataModule(..., text_encoder=))")
        return batch["text"]

    # ---- training ------------------------------------------------------------------------------------------
    def training_step(self, batch, batch_idx):
        x0 = batch["latent"]
        text = self.batch_text(batch)
        drop = torch.rand(len(x0), device=self.device) < self.hparams.caption_dropout
        loss = self.diffusion.training_loss(self.model, x0, self.model.drop_text(text, drop))
        if not torch.isfinite(loss):
            raise NonFiniteLossError(f"training loss is {loss.item()} at step {self.global_step}")
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=False)
        return loss

    def validation_step(self, batch, batch_idx):
        # Fixed noise and timesteps per batch, so val/loss is comparable across evaluations and runs.
        g = torch.Generator(device=self.device).manual_seed(1000 + batch_idx)
        loss = self.diffusion.training_loss(self.model, batch["latent"], self.batch_text(batch), generator=g)
        self.log("val/loss", loss, prog_bar=True, on_epoch=True, batch_size=len(batch["caption"]))

    def text_lengths(self, captions: list[str]) -> torch.Tensor:
        """Valid text tokens per caption, as the DiT sees them."""
        if self.learned_text is not None:
            return self.learned_text.tokenize(list(captions))[1].sum(1)
        encoder = self.text_encoder()
        return torch.cat([encoder.encode(captions[i : i + 1024]).mask.sum(1).cpu()
                          for i in range(0, len(captions), 1024)])

    def gflops(self, captions: list[str] | None = None) -> float:
        """Forward GFLOPs per clip at the real caption lengths of `captions` (the training split), else at
        max_text_len (`sorabench.models.dit.caption_flops`)."""
        if not captions:
            return forward_flops(self.model)
        return caption_flops(self.model, self.text_lengths(captions))

    def on_fit_start(self):
        if self.logger is not None and self.global_step == 0:
            train_set = getattr(getattr(self.trainer, "datamodule", None), "train_set", None)
            captions = list(train_set.cache["captions"]) if train_set is not None else None
            lengths = self.text_lengths(captions).float().mean().item() if captions else float(self.model.max_text_len)
            self.logger.log_metrics(
                {"model/params": float(self.model.num_parameters()), "model/gflops": self.gflops(captions),
                 "model/text_len_mean": lengths}, step=0
            )
        if self.hparams.compile:
            # torch.compile of the backbone, in place (state_dict keys unchanged, so checkpoints stay portable).
            # Here rather than in configure_model: the EMA callback calls configure_model and then deep-copies the
            # module, and a deep copy of a compiled module would still run the original's forward.
            self.model.compile()

    def configure_optimizers(self):
        o = self.hparams.optim
        optimizer = build_optimizer([p for p in self.parameters() if p.requires_grad], o)
        # Linear warm-up, then cosine decay to min_lr_ratio * lr at max_steps ("constant" keeps lr flat).
        lr_lambda = lr_schedule(int(o.get("warmup_steps", 0)), max(1, int(self.trainer.max_steps or 1)),
                                final=float(o.get("min_lr_ratio", 0.1)), schedule=o.get("schedule", "cosine"))
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
