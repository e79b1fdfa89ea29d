"""The training commands: `train-vae`, `encode`, `train`, `sample`, `train-evaluator`.

Each runs library code: the VAE run (`sorabench.training.vae_run`), the DiT run (`sorabench.training.dit_run`), the
evaluator run (`sorabench.training.evaluator_module`), the latent caches (`sorabench.latents`) and a checkpoint's
pipeline (`sorabench.training.runs.load_pipeline`).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from omegaconf import DictConfig
from rich.console import Console

from sorabench.config import require, to_container
from sorabench.data.video_io import write_clips
from sorabench.latents import cache_key, cache_path, load_or_encode
from sorabench.pipeline import TextToVideo
from sorabench.training import dit_run
from sorabench.training.evaluator_module import run_evaluator_training
from sorabench.training.runs import load_pipeline, load_vae
from sorabench.training.vae_run import run_vae_training

console = Console()


def train_vae(cfg: DictConfig) -> int:
    run_vae_training(cfg)
    return 0


def encode(cfg: DictConfig) -> int:
    """`sorabench encode vae_ckpt=<ckpt> data=<...> splits=[train,val]`: write the latent caches."""
    vae = load_vae(cfg.vae_ckpt)
    data = to_container(cfg.data)
    for split in cfg.splits:
        key = cache_key(cfg.vae_ckpt, data, split)
        existed = cache_path(cfg.cache_dir, key).is_file()
        t0 = time.time()
        cache = load_or_encode(vae, cfg.vae_ckpt, data, split, cfg.cache_dir)
        what = "reused" if existed else f"encoded in {time.time() - t0:.1f} s"
        console.print(f"{split}: {len(cache['captions'])} clips {tuple(cache['mean'].shape[1:])} {what} "
                      f"-> {cache_path(cfg.cache_dir, key)}")
    return 0


def train(cfg: DictConfig) -> int:
    """`sorabench train`: train the DiT on cached latents, then evaluate it (`sorabench.training.dit_run.train`)."""
    dit_run.train(cfg)
    return 0


def sample(cfg: DictConfig) -> int:
    """`sorabench sample ckpt=... prompt="..." n=4 steps=25 cfg=4 seed=0 out=<dir>`: mp4 and gif per clip."""
    require(cfg.cfg >= 0, "cfg", cfg.cfg, "the guidance scale must be >= 0")
    require(cfg.n >= 1 and cfg.steps >= 1, "n/steps", (cfg.n, cfg.steps), "must be >= 1")
    prompts = [cfg.prompt] * cfg.n if isinstance(cfg.prompt, str) else list(cfg.prompt)
    for p in prompts:
        require(isinstance(p, str) and p.strip() != "", "prompt", p,
                "is empty: give a caption, e.g. prompt=\"a red circle moving left\" (an empty caption is not the "
                "model's learned unconditional (null) condition)")
    pipeline = load_pipeline(cfg.ckpt)
    warn_truncated_prompts(pipeline, prompts)
    videos = pipeline.sample_videos(prompts, steps=cfg.steps, guidance_scale=cfg.cfg, seed=cfg.seed)
    out = Path(cfg.out)
    write_clips(out, videos, [f"sample_{i:02d}" for i in range(len(prompts))], prompts, scale=cfg.scale,
                sheet="samples.png")
    (out / "prompts.txt").write_text("\n".join(prompts) + "\n")
    console.print(f"wrote {len(prompts)} samples (.mp4, .gif) and samples.png to {out}")
    return 0


def warn_truncated_prompts(pipeline: TextToVideo, prompts: list[str]):
    """Say so when a prompt is longer than the text encoder reads (text_encoder.max_length tokens): the rest is cut."""
    limit = int(pipeline.text_encoder.max_length)
    for p in sorted(set(prompts)):
        n = pipeline.text_encoder.num_tokens(p)
        if n > limit:
            print(f"warning: prompt {p[:40]!r}... is {n} tokens long; the text encoder reads only the first {limit} "
                  f"(text_encoder.max_length of this checkpoint), the rest is ignored", file=sys.stderr)


def train_evaluator(cfg: DictConfig) -> int:
    run_evaluator_training(cfg)
    return 0
