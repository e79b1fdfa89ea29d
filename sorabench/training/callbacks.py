"""Every Lightning callback sorabench trains with, in one place.

- `EMA`: the exponential moving average of the weights, swapped in for validation, sampling and the final module.
- `StepProgressBar`: Lightning's tqdm bar counting optimizer steps; an error inside it never ends a run.
- `SeedPerRank`: under DDP each rank draws its own noise.
- `TagCheckpointKind`, `EmbedVAE`: what a checkpoint carries beside its weights (its kind; the DiT's VAE).
- `LogSampleVideos`, `EvaluateCallback`: sample and score the weights being validated, during training.
- `SkippedSamplesReport`: the samples a dataset dropped under `on_error: skip`.

Callbacks run in list order, and `EMA` swaps the training weights back in its own `on_validation_epoch_end`:
everything that samples with the validated (EMA) weights is listed before it (`sorabench.training.dit_run`).
"""

from __future__ import annotations

import functools
import random
import re
import sys
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import TQDMProgressBar, WeightAveraging
from rich.console import Console
from torch.optim.swa_utils import get_ema_multi_avg_fn

from sorabench.files import file_sha256, state_dict_sha256

console = Console(soft_wrap=True)

# ---- the weights -------------------------------------------------------------------------------------------------


class EMA(WeightAveraging):
    """Lightning's EMA weight averaging (EMAWeightAveraging's schedule: every step from `start_step`), updating all
    weights with one foreach lerp (torch's `get_ema_multi_avg_fn`). EMAWeightAveraging hard-wires the per-tensor
    `get_ema_avg_fn`, a Python loop over every tensor, several times slower per step (benchmarks/RESULTS.md, 11)."""

    def __init__(self, decay: float, start_step: int = 0):
        super().__init__(use_buffers=True, multi_avg_fn=get_ema_multi_avg_fn(decay))
        self.start_step = start_step

    def should_update(self, step_idx: int | None = None, epoch_idx: int | None = None) -> bool:
        return step_idx is not None and step_idx >= self.start_step

    def setup(self, trainer, pl_module, stage):
        super().setup(trainer, pl_module, stage)
        self.train_ended = False

    def on_train_end(self, trainer, pl_module):
        super().on_train_end(trainer, pl_module)  # the average goes into the module: what is evaluated and sampled
        self.train_ended = True

    def on_fit_end(self, trainer, pl_module):
        # A run resumed from a checkpoint at max_steps (e.g. after a crash in teardown) skips the training loop, so
        # on_train_end never ran and the module still holds the raw weights the checkpoint restored: put the
        # average in, so a resumed run evaluates exactly what an uninterrupted one does.
        if not self.train_ended and self._average_model is not None:
            self._copy_average_to_current(pl_module)


class SeedPerRank(L.Callback):
    """Under DDP every rank draws its own noise, timesteps, caption-dropout masks and posterior samples: when
    training starts, each rank reseeds with `seed * world_size + rank` (as DiT's train.py does). One
    `seed_everything(seed)` in every rank would give the global batch only one rank's worth of distinct draws.
    The model's init stays `seed` in every rank, and Lightning's DistributedSampler keeps its own seed
    (PL_GLOBAL_SEED), so the ranks still split the clips between them. A single process is left as it was."""

    def __init__(self, seed: int):
        self.seed = seed

    def on_train_start(self, trainer, pl_module):
        if trainer.world_size > 1:
            seed = self.seed * trainer.world_size + trainer.global_rank
            random.seed(seed)
            np.random.seed(seed % 2**32)
            torch.manual_seed(seed)


# ---- display -----------------------------------------------------------------------------------------------------


class StepProgressBar(TQDMProgressBar):
    """Lightning's plain tqdm bar, counting optimizer steps out of `trainer.max_steps` in step-based training (an
    epoch count means nothing there), and guarded: an error inside the bar turns it off with a warning and never
    ends the run (a display error in teardown would otherwise lose the final evaluation)."""

    def __init__(self):
        super().__init__()
        self.broken = False
        for name in dir(L.Callback):
            if name.startswith("on_") or name in ("setup", "teardown"):
                setattr(self, name, self._guarded(getattr(self, name)))

    def _guarded(self, hook):
        @functools.wraps(hook)
        def run(*args, **kwargs):
            if self.broken:
                return None
            try:
                return hook(*args, **kwargs)
            except Exception as e:  # noqa: BLE001 - a display must not end a training run
                self.broken = True
                print(f"warning: the progress bar failed ({type(e).__name__}: {e}); training continues without it",
                      file=sys.stderr)
                return None

        return run

    def on_train_epoch_start(self, trainer, *args):
        super().on_train_epoch_start(trainer, *args)
        if trainer.max_steps > 0:
            bar = self.train_progress_bar
            bar.total, bar.n = trainer.max_steps, trainer.global_step
            bar.set_description(f"epoch {trainer.current_epoch}, step")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.max_steps <= 0:
            return super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        bar = self.train_progress_bar
        if bar is not None and not bar.disable:
            bar.n = trainer.global_step
            bar.set_postfix(self.get_metrics(trainer, pl_module))  # refreshes the bar


class SkippedSamplesReport(L.Callback):
    """Counts samples dropped under `on_error: skip` and reports them at the end of each epoch."""

    def __init__(self):
        self.reasons: list[str] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.reasons.extend(batch.get("skipped", []))

    def on_train_epoch_end(self, trainer, pl_module):
        if self.reasons:
            stderr = Console(stderr=True)
            stderr.print(f"[yellow]epoch {trainer.current_epoch}: skipped {len(self.reasons)} bad samples:")
            for reason in sorted(set(self.reasons)):
                stderr.print(f"  {reason}")
            pl_module.log("data/skipped", float(len(self.reasons)))
        self.reasons = []


# ---- checkpoints -------------------------------------------------------------------------------------------------


class TagCheckpointKind(L.Callback):
    """Writes `sorabench_kind` into every checkpoint so a VAE checkpoint given as a DiT is caught at load time."""

    def __init__(self, kind: str):
        self.kind = kind

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        checkpoint["sorabench_kind"] = self.kind


class EmbedVAE(L.Callback):
    """Writes the VAE that decodes a DiT's latents into every DiT checkpoint (its weights, its hyperparameters and
    two SHA-256s: of the VAE checkpoint file, the identity that keys the latent caches, and of the weights, checked
    on load), so `sample`/`evaluate` need only the DiT checkpoint, from any directory and on any machine. The VAE is
    small (a few MB) next to what a lost or moved VAE file costs."""

    def __init__(self, vae_ckpt: str | Path, vae):
        self.embedded = {"state_dict": {k: v.detach().cpu().clone() for k, v in vae.state_dict().items()},
                         "hyper_parameters": dict(vae.hparams), "file_sha256": file_sha256(vae_ckpt),
                         "weights_sha256": state_dict_sha256(vae), "source": str(vae_ckpt)}

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        checkpoint["sorabench_vae"] = self.embedded


# ---- sampling and scoring during training (list them before EMA) -----------------------------------------------


class LogSampleVideos(L.Callback):
    """Every `log_every_n_val` validations and at the end of training, sample a fixed set of validation prompts (seen
    and unseen compositions) with the weights being validated (the EMA weights when EMA is on) and log them to MLflow
    as mp4 and gif."""

    def __init__(self, val_cache: dict, sample_cfg: dict, vae):
        self.cfg, self.vae = sample_cfg, vae
        n = int(sample_cfg["log_prompts"])
        unseen = val_cache["unseen"].tolist()
        seen_idx = [i for i, u in enumerate(unseen) if not u][:n]
        unseen_idx = [i for i, u in enumerate(unseen) if u][:n]
        self.prompts = [val_cache["captions"][i] for i in seen_idx + unseen_idx]
        self.tags = ["seen"] * len(seen_idx) + ["unseen"] * len(unseen_idx)
        self.validations = 0

    def on_validation_epoch_end(self, trainer, pl_module):
        if trainer.sanity_checking or not self.prompts:
            return
        self.validations += 1
        final = trainer.max_steps > 0 and trainer.global_step >= trainer.max_steps
        if (self.validations % int(self.cfg["log_every_n_val"]) and not final) or not trainer.is_global_zero:
            return  # every n-th validation, and always the last one
        from sorabench.data.video_io import view_scale, write_clips
        from sorabench.tracking import log_artifact

        videos = pl_module.pipeline(self.vae).sample_videos(self.prompts, self.cfg["steps"], self.cfg["guidance_scale"],
                                                            seed=0).cpu()
        out = Path(trainer.default_root_dir) / "samples" / f"step_{trainer.global_step:06d}"
        captions = [f"[{tag}] {p}" for p, tag in zip(self.prompts, self.tags)]
        stems = [f"{i:02d}_{tag}" for i, tag in enumerate(self.tags)]
        scale = view_scale(videos.shape[-2], videos.shape[-1])  # nearest-neighbour, >= 256 px for viewing
        paths = write_clips(out, videos, stems, captions, scale=scale, sheet="samples.png")
        (out / "prompts.txt").write_text("\n".join(captions) + "\n")
        for path in [*paths, out / "prompts.txt"]:
            log_artifact(trainer.logger, path, f"samples/step_{trainer.global_step:06d}")


class EvaluateCallback(L.Callback):
    """Evaluate every `every_n_steps` training steps, with the weights the validation uses (EMA when on):
    `evaluate(pl_module, logger, step)` returns the metrics it logged. With `final_follows` (an evaluation after
    training scores these same weights) the last step is left to that one, not scored twice.

    The run passes `evaluate` in (`sorabench.training.dit_run.evaluate`): scoring needs the evaluator, whose training
    run uses `TagCheckpointKind` from here, so this module cannot import it."""

    def __init__(self, evaluate, every_n_steps: int, final_follows: bool):
        self.evaluate, self.every, self.final_follows = evaluate, int(every_n_steps), final_follows
        self.last = -1

    def on_validation_epoch_end(self, trainer, pl_module):
        step = trainer.global_step
        if trainer.sanity_checking or step == self.last or step == 0 or step % self.every and step < trainer.max_steps:
            return
        if step >= trainer.max_steps and self.final_follows:
            return  # the final evaluation after training scores these same (EMA) weights: not twice
        self.last = step
        metrics = self.evaluate(pl_module, trainer.logger, step)
        console.print(f"step {step}: " + ", ".join(f"{k}={v:.4g}" for k, v in metrics.items() if headline(k)))


def headline(key: str) -> bool:
    """What a periodic evaluation prints: FVD, FID and the accuracy of every attribute (all scored clips)."""
    return key in ("eval/fvd", "eval/fid") or bool(re.fullmatch(r"eval/acc_[a-z]+", key))
