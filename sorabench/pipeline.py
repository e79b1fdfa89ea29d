"""Captions -> videos: a DiT, its diffusion, a text encoder and a VAE, composed for sampling and evaluation.

The pipeline owns none of its parts. Training owns the DiT (`DiTModule.model`, whose weights the EMA swaps in
place, so a pipeline built once samples with whatever weights the module holds); the frozen text encoder is shared
by every run of a process (`sorabench.models.text.frozen_text_encoder`) and a learned one trains inside the
`DiTModule`; the VAE is trained and checkpointed on its own. Keeping the encoder and the VAE out of the
LightningModule is what keeps them out of its state_dict, its EMA copy and its optimiser.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sorabench.models.text import TextEmbedding


@dataclass
class TextToVideo:
    """model: the DiT (`sorabench.models.dit.DiT`); diffusion: `RectifiedFlow` | `DDPM`; text_encoder: anything with
    `encode(captions) -> TextEmbedding` and `num_tokens(caption)`; vae: a `VAEModule` (`decode_latents`), or None
    to sample latents only."""

    model: torch.nn.Module
    diffusion: object
    text_encoder: torch.nn.Module
    vae: torch.nn.Module | None = None

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def encode_text(self, captions: list[str]) -> TextEmbedding:
        return self.text_encoder.encode(list(captions)).to(self.device)

    @torch.no_grad()
    def sample_latents(self, captions: list[str], steps: int, guidance_scale: float, seed: int) -> torch.Tensor:
        """Latents (B, C, T', H', W') for captions; deterministic given the seed."""
        if guidance_scale < 0:
            raise ValueError(f"guidance scale {guidance_scale} must be >= 0")
        g = torch.Generator(device=self.device).manual_seed(seed)
        # Sampling is inference: eval mode for the DiT and a trained text encoder (torch's TransformerEncoder takes
        # its fused path there), whatever mode training left them in, and back afterwards.
        modes = [(m, m.training) for m in (self.model, self.text_encoder) if isinstance(m, torch.nn.Module)]
        for m, _ in modes:
            m.eval()
        try:
            text = self.encode_text(captions)
            null = self.model.null_text(len(captions))
            shape = (len(captions), *self.model.latent_shape)
            return self.diffusion.sample(self.model, shape, text, null, steps, guidance_scale, g)
        finally:
            for m, mode in modes:
                m.train(mode)

    @torch.no_grad()
    def sample_videos(self, captions: list[str], steps: int, guidance_scale: float, seed: int, batch_size: int = 64):
        """Videos (B, 3, T, H, W) in [-1, 1], decoded by the VAE, sampled `batch_size` captions at a time; the batch
        starting at caption i draws its noise from seed + i, so calling this piece by piece at the same batch
        boundaries (captions[i : i + batch_size] with seed + i) draws the same clips as one call."""
        if self.vae is None:
            raise RuntimeError("this pipeline has no VAE to decode samples (TextToVideo.vae)")
        self.vae.to(self.device).eval()
        videos = []
        for i in range(0, len(captions), batch_size):
            latents = self.sample_latents(captions[i : i + batch_size], steps, guidance_scale, seed + i)
            videos.append(self.vae.decode_latents(latents).clamp(-1, 1).float())  # fp32 under bf16 autocast too
        return torch.cat(videos)
