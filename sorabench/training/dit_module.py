"""The DiT LightningModule: text-to-video diffusion on cached VAE latents, any conditioning strategy, any objective.

Batches come from the latent cache (`sorabench/latents.py`): `latent` (B, C, T', H', W') already multiplied by the
VAE's scale factor, `caption` list[str]. Classifier-free guidance is trained by caption dropout to the DiT's learned
null condition; sampling batches the conditional and unconditional halves in one forward (`diffusion.py`).

The frozen MiniLM text encoder is deliberately *not* a submodule: it would otherwise be deep-copied by the
EMA callback (`trainer.EMA`), averaged every step and written into every checkpoint (90 MB). It lives in a process-wide
table keyed by its config, with its per-caption embedding cache, and the module holds only that key. A learned
text encoder trains with the DiT, so it is a submodule like any other.
"""

from __future__ import annotations


import lightning as L
import torch

from sorabench.diffusion import build_diffusion
from sorabench.models.dit import DiT, caption_flops, forward_flops
from sorabench.models.text import TextEmbedding, build_text_encoder
from sorabench.training.trainer import lr_schedule

_FROZEN_TEXT_ENCODERS: dict[tuple, torch.nn.Module] = {}


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite; the message names the step."""


def frozen_text_encoder(name: str, **kwargs) -> torch.nn.Module:
    key = (name, tuple(sorted(kwargs.items())))
    if key not in _FROZEN_TEXT_ENCODERS:
        _FROZEN_TEXT_ENCODERS[key] = build_text_encoder(name, **kwargs)
    return _FROZEN_TEXT_ENCODERS[key]


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


def flops_budget_steps(module: "DiTModule", captions: list[str], reference: str, steps: int) -> int:
    """`budget=flops`: the step count that gives `module` the training FLOPs of the `reference` strategy (same
    backbone, same batch) at `steps` steps. Both are counted by `caption_flops` at the training split's real caption
    lengths; a step costs ~3 forwards for every strategy, so the ratio of forward GFLOPs is the ratio of step
    costs. A strategy twice as expensive per step gets half the steps."""
    from sorabench.config import CONF_DIR, to_container
    from omegaconf import OmegaConf

    path = CONF_DIR / "conditioning" / f"{reference}.yaml"
    if not path.is_file():
        raise ValueError(f"budget_reference={reference!r}: no conf/conditioning/{reference}.yaml")
    options = to_container(OmegaConf.load(path))
    options.pop("name", None)
    model = module.model
    h = module.hparams
    ref = DiT(model.latent_shape, conditioning=reference, text_dim=model.text_dim, max_text_len=model.max_text_len,
              timestep_scale=module.diffusion.timestep_scale, **h.dit, **options)
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
        text_cfg = {k: v for k, v in text_encoder.items() if k != "name"}
        if text_encoder["name"] == "learned":
            from sorabench.models.text import LearnedTextEncoder

            self.learned_text = LearnedTextEncoder(vocab=list(vocab or []), **text_cfg)
            text_dim = self.learned_text.dim
        else:
            self.learned_text = None
            text_dim = frozen_text_encoder(text_encoder["name"], **text_cfg).dim
        self.diffusion = build_diffusion(**diffusion)
        cond_kwargs = {k: v for k, v in conditioning.items() if k != "name"}
        self.model = DiT(
            latent_shape,
            conditioning=conditioning["name"],
            text_dim=text_dim,
            max_text_len=text_encoder.get("max_length", 32),
            timestep_scale=self.diffusion.timestep_scale,
            **dit,
            **cond_kwargs,
        )
        self.attach_vae(None)

    def attach_vae(self, vae) -> None:
        """The VAE that decodes samples. Kept out of the module's children on purpose: it is trained and checkpointed
        on its own (the DiT's hparams name its checkpoint), so it must not enter this state_dict, the EMA or the
        optimiser."""
        object.__setattr__(self, "vae", vae.eval() if vae is not None else None)

    # ---- text ----------------------------------------------------------------------------------------------
    def frozen_text(self) -> torch.nn.Module:
        """The process-wide frozen encoder this module's `text_encoder` config names."""
        cfg = {k: v for k, v in self.hparams.text_encoder.items() if k != "name"}
        return frozen_text_encoder(self.hparams.text_encoder["name"], **cfg)

    def encode_text(self, captions: list[str]) -> TextEmbedding:
        if self.learned_text is not None:
            return self.learned_text.encode(list(captions)).to(self.device)
        return self.frozen_text().encode(list(captions)).to(self.device)

    def precompute_text(self, captions: list[str], cache_dir: str | None = None) -> None:
        """Fill the frozen encoder's caption cache before training, from `cache_dir` when an earlier process left
        these captions' embeddings there (a learned encoder trains: nothing to cache)."""
        if self.learned_text is None:
            self.frozen_text().precompute(list(captions), cache_dir=cache_dir)

    # ---- training ------------------------------------------------------------------------------------------
    def training_step(self, batch, batch_idx):
        x0 = batch["latent"]
        text = self.encode_text(batch["caption"])
        drop = torch.rand(len(x0), device=self.device) < self.hparams.caption_dropout
        loss = self.diffusion.training_loss(self.model, x0, self.model.drop_text(text, drop))
        if not torch.isfinite(loss):
            raise NonFiniteLossError(f"training loss is {loss.item()} at step {self.global_step}")
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=False)
        return loss

    def validation_step(self, batch, batch_idx):
        # Fixed noise and timesteps per batch, so val/loss is comparable across evaluations and runs.
        g = torch.Generator(device=self.device).manual_seed(1000 + batch_idx)
        text = self.encode_text(batch["caption"])
        loss = self.diffusion.training_loss(self.model, batch["latent"], text, generator=g)
        self.log("val/loss", loss, prog_bar=True, on_epoch=True, batch_size=len(batch["caption"]))

    def text_lengths(self, captions: list[str]) -> torch.Tensor:
        """Valid text tokens per caption, as the DiT sees them."""
        if self.learned_text is not None:
            return self.learned_text.tokenize(list(captions))[1].sum(1)
        return torch.cat([self.encode_text(captions[i : i + 1024]).mask.sum(1).cpu()
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

    # ---- sampling ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def sample_latents(self, captions: list[str], steps: int, guidance_scale: float, seed: int) -> torch.Tensor:
        """Latents (B, C, T', H', W') for captions; deterministic given the seed."""
        if guidance_scale < 0:
            raise ValueError(f"guidance scale {guidance_scale} must be >= 0")
        g = torch.Generator(device=self.device).manual_seed(seed)
        text = self.encode_text(captions)
        null = self.model.null_text(len(captions))
        shape = (len(captions), *self.model.latent_shape)
        return self.diffusion.sample(self.model, shape, text, null, steps, guidance_scale, g)

    @torch.no_grad()
    def sample_videos(self, captions: list[str], steps: int, guidance_scale: float, seed: int, batch_size: int = 64):
        """Videos (B, 3, T, H, W) in [-1, 1], decoded by the attached VAE, sampled in batches."""
        if self.vae is None:
            raise RuntimeError("no VAE attached to decode samples (DiTModule.vae)")
        self.vae.to(self.device)
        videos = []
        for i in range(0, len(captions), batch_size):
            latents = self.sample_latents(captions[i : i + batch_size], steps, guidance_scale, seed + i)
            videos.append(self.vae.decode_latents(latents).clamp(-1, 1))
        return torch.cat(videos)


class LogSampleVideos(L.Callback):
    """Every `log_every_n_val` validations and at the end of training, sample a fixed set of validation prompts (seen
    and unseen compositions) with the weights being validated (the EMA weights when EMA is on) and log them to MLflow
    as mp4 and gif.

    List it before the EMA callback (`trainer.EMA`): callbacks run in list order, and the EMA callback swaps the
    training weights back in its own `on_validation_epoch_end`.
    """

    def __init__(self, val_cache: dict, sample_cfg: dict):
        self.cfg = sample_cfg
        n = int(sample_cfg["log_prompts"])
        unseen = val_cache["unseen"].tolist()
        seen_idx = [i for i, u in enumerate(unseen) if not u][:n]
        unseen_idx = [i for i, u in enumerate(unseen) if u][:n]
        self.prompts = [val_cache["captions"][i] for i in seen_idx + unseen_idx]
        self.tags = ["seen"] * len(seen_idx) + ["unseen"] * len(unseen_idx)
        self.validations = 0

    def on_validation_epoch_end(self, trainer, pl_module):
        if trainer.sanity_checking or pl_module.vae is None or not self.prompts:
            return
        self.validations += 1
        final = trainer.max_steps > 0 and trainer.global_step >= trainer.max_steps
        if (self.validations % int(self.cfg["log_every_n_val"]) and not final) or not trainer.is_global_zero:
            return  # every n-th validation, and always the last one
        from pathlib import Path

        from sorabench.data.video_io import write_clips
        from sorabench.tracking import log_artifact

        videos = pl_module.sample_videos(self.prompts, self.cfg["steps"], self.cfg["guidance_scale"], seed=0).cpu()
        out = Path(trainer.default_root_dir) / "samples" / f"step_{trainer.global_step:06d}"
        captions = [f"[{tag}] {p}" for p, tag in zip(self.prompts, self.tags)]
        stems = [f"{i:02d}_{tag}" for i, tag in enumerate(self.tags)]
        paths = write_clips(out, videos, stems, captions, scale=4, sheet="samples.png")
        (out / "prompts.txt").write_text("\n".join(captions) + "\n")
        for path in [*paths, out / "prompts.txt"]:
            log_artifact(trainer.logger, path, f"samples/step_{trainer.global_step:06d}")
