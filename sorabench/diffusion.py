"""Diffusion objectives and samplers: rectified flow (default) and DDPM with DDIM sampling.

Both share one interface, with the network as a callable `model_fn(x, t, cond) -> prediction` (B, ...) and the
condition opaque to this file:
    training_loss(model_fn, x0, cond, generator=None) -> scalar MSE
    sample(model_fn, shape, cond, null_cond=None, steps=None, guidance_scale=1.0, generator=None, device=None)
`timestep_scale` says what t means to the network's timestep embedder (DiT(timestep_scale=...)).

Classifier-free guidance (`guided_prediction`) evaluates the conditional and the unconditional prediction in one
batched call: x, t and [cond; null_cond] are concatenated on the batch dim. Tensors are concatenated directly,
any other condition through its type's `cat(a, b)` (e.g. `TextEmbedding.cat`).
Randomness comes only from `generator`, so a seeded generator makes training noise and samples reproducible
(the generator must live on the device the tensors are made on).
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from sorabench.registry import lookup, registrar

DIFFUSIONS: dict[str, type] = {}
register = registrar(DIFFUSIONS, "diffusion")  # @register("name"): `diffusion=<name>`

ModelFn = Callable[[Tensor, Tensor, Any], Tensor]


def cat_conditions(a: Any, b: Any) -> Any:
    return torch.cat([a, b]) if isinstance(a, Tensor) else type(a).cat(a, b)


def guided_prediction(
    model_fn: ModelFn, x: Tensor, t: Tensor, cond: Any, null_cond: Any, guidance_scale: float
) -> Tensor:
    """uncond + s·(cond - uncond), with both halves from one forward of batch 2B. s = 1 is the conditional
    prediction exactly (one forward of batch B, no null half), s = 0 the unconditional one."""
    if guidance_scale == 1:
        return model_fn(x, t, cond)
    if guidance_scale == 0:
        return model_fn(x, t, null_cond)
    both = model_fn(torch.cat([x, x]), torch.cat([t, t]), cat_conditions(cond, null_cond))
    conditional, unconditional = both.chunk(2)
    return unconditional + guidance_scale * (conditional - unconditional)


def initial_noise(
    shape: tuple[int, ...],
    steps: int,
    guidance_scale: float,
    null_cond: Any,
    generator: torch.Generator | None,
    device: torch.device | str | None,
) -> Tensor:
    """What every sampler starts with: its arguments checked, then x_T ~ N(0, I) on `device` (default: the
    generator's device, else the CPU) drawn from `generator`."""
    if steps < 1:
        raise ValueError(f"need at least one sampling step, got {steps}")
    if guidance_scale < 0:
        raise ValueError(f"guidance_scale must be >= 0, got {guidance_scale}")
    if guidance_scale != 1 and null_cond is None:
        raise ValueError(f"guidance_scale={guidance_scale} needs a null_cond (the unconditional input)")
    device = device or (generator.device if generator is not None else "cpu")
    return torch.randn(shape, generator=generator, device=device)


def video_mse(pred: Tensor, target: Tensor, motion_weight: float = 0.0) -> Tensor:
    """MSE, plus motion_weight x the MSE of the frame-to-frame differences (axis 2 of (B, C, T, H, W)).

    Why: in a clip of a small moving object nearly every latent value is static content, so plain MSE spends
    almost all of its gradient on appearance; the difference term weights the temporal high frequencies - where
    the motion is - by 1 + motion_weight x |1 - e^{iw}|^2 instead of 1. motion_weight = 0 is plain MSE."""
    loss = F.mse_loss(pred, target)
    if motion_weight and pred.dim() == 5 and pred.shape[2] > 1:
        loss = loss + motion_weight * F.mse_loss(pred.diff(dim=2), target.diff(dim=2))
    return loss


def expand_as(t: Tensor, x: Tensor) -> Tensor:
    """(B,) -> (B, 1, ..., 1) to broadcast against x."""
    return t.view(-1, *[1] * (x.dim() - 1))


@register("flow")
class RectifiedFlow:
    """Rectified flow / flow matching (Liu et al. 2022; SD3): x_t = (1 - t)·x0 + t·ε, t in [0, 1] with t = 1
    pure noise; the network predicts the velocity v = ε - x0 (constant along each straight path).

    Training t ~ logit-normal(mean, std) (SD3: concentrates on the hard middle of the path).
    Sampling: Euler from t = 1 to t = 0 over `steps` steps; shift > 1 spends more steps at high noise
    (SD3's t' = shift·t / (1 + (shift - 1)·t)).
    """

    timestep_scale = 1000.0

    def __init__(
        self,
        logit_normal_mean: float = 0.0,
        logit_normal_std: float = 1.0,
        sample_steps: int = 25,
        shift: float = 1.0,
        motion_weight: float = 0.0,
    ):
        if logit_normal_std <= 0 or sample_steps < 1 or shift <= 0:
            raise ValueError("need logit_normal_std > 0, sample_steps >= 1 and shift > 0")
        self.mean, self.std = logit_normal_mean, logit_normal_std
        self.sample_steps, self.shift = sample_steps, shift
        self.motion_weight = motion_weight

    def training_loss(
        self, model_fn: ModelFn, x0: Tensor, cond: Any, generator: torch.Generator | None = None
    ) -> Tensor:
        B = x0.shape[0]
        t = torch.sigmoid(self.mean + self.std * torch.randn(B, generator=generator, device=x0.device))
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        x_t = (1 - expand_as(t, x0)) * x0 + expand_as(t, x0) * noise
        return video_mse(model_fn(x_t, t, cond), noise - x0, self.motion_weight)

    def timesteps(self, steps: int) -> list[float]:
        t = torch.linspace(1, 0, steps + 1, dtype=torch.float64)
        return (self.shift * t / (1 + (self.shift - 1) * t)).tolist()

    @torch.no_grad()
    def sample(
        self,
        model_fn: ModelFn,
        shape: tuple[int, ...],
        cond: Any,
        null_cond: Any = None,
        steps: int | None = None,
        guidance_scale: float = 1.0,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
    ) -> Tensor:
        steps = self.sample_steps if steps is None else steps
        x = initial_noise(shape, steps, guidance_scale, null_cond, generator, device)
        ts = self.timesteps(steps)
        for t, t_next in zip(ts[:-1], ts[1:]):
            t_batch = torch.full((shape[0],), t, device=x.device)
            x = x + (t_next - t) * guided_prediction(model_fn, x, t_batch, cond, null_cond, guidance_scale)
        return x


@register("ddpm")
class DDPM:
    """DDPM (Ho et al. 2020) with a linear or cosine (Nichol & Dhariwal 2021) beta schedule over
    `num_train_steps` steps: x_t = sqrt(ᾱ_t)·x0 + sqrt(1 - ᾱ_t)·ε with t an integer step given to the network as
    a float. prediction "eps" trains on ε, "v" on v = sqrt(ᾱ)·ε - sqrt(1 - ᾱ)·x0 (Salimans & Ho 2022).

    Sampling: DDIM (Song et al. 2021) over `steps` evenly spaced steps from T - 1 down to 0, then to ᾱ = 1
    (a clean latent); eta = 0 is deterministic given the initial noise, eta = 1 is DDPM-like ancestral sampling.
    """

    timestep_scale = 1.0

    def __init__(
        self,
        schedule: str = "linear",
        prediction: str = "eps",
        num_train_steps: int = 1000,
        sample_steps: int = 50,
        eta: float = 0.0,
    ):
        if prediction not in ("eps", "v"):
            raise ValueError(f"prediction must be 'eps' or 'v', got {prediction!r}")
        if not 1 <= sample_steps <= num_train_steps:  # more would repeat rounded steps
            raise ValueError(f"need 1 <= sample_steps <= num_train_steps, got {sample_steps}, {num_train_steps}")
        T = num_train_steps
        if schedule == "linear":
            betas = torch.linspace(1e-4, 0.02, T, dtype=torch.float64)  # DDPM's values for T = 1000
        elif schedule == "cosine":
            s = 0.008  # keeps beta_0 from vanishing (Nichol & Dhariwal)
            f = torch.cos((torch.arange(T + 1, dtype=torch.float64) / T + s) / (1 + s) * math.pi / 2) ** 2
            betas = (1 - f[1:] / f[:-1]).clamp(max=0.999)  # the clamp avoids a singularity at t = T
        else:
            raise ValueError(f"schedule must be 'linear' or 'cosine', got {schedule!r}")
        self.prediction, self.num_train_steps = prediction, T
        self.sample_steps, self.eta = sample_steps, eta
        self.alphas_cumprod = torch.cumprod(1 - betas, dim=0)  # ᾱ_t, float64 on the CPU

    def training_loss(
        self, model_fn: ModelFn, x0: Tensor, cond: Any, generator: torch.Generator | None = None
    ) -> Tensor:
        B = x0.shape[0]
        t = torch.randint(0, self.num_train_steps, (B,), generator=generator, device=x0.device)
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        abar = expand_as(self.alphas_cumprod.to(dtype=x0.dtype).to(x0.device)[t], x0)
        x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * noise
        target = noise if self.prediction == "eps" else abar.sqrt() * noise - (1 - abar).sqrt() * x0
        return F.mse_loss(model_fn(x_t, t.to(x0.dtype), cond), target)

    @torch.no_grad()
    def sample(
        self,
        model_fn: ModelFn,
        shape: tuple[int, ...],
        cond: Any,
        null_cond: Any = None,
        steps: int | None = None,
        guidance_scale: float = 1.0,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
    ) -> Tensor:
        steps = self.sample_steps if steps is None else steps
        if steps > self.num_train_steps:
            raise ValueError(f"{steps} sampling steps exceed the {self.num_train_steps} training steps")
        x = initial_noise(shape, steps, guidance_scale, null_cond, generator, device)
        ts = torch.linspace(self.num_train_steps - 1, 0, steps).round().long().tolist()
        abars = self.alphas_cumprod[ts].tolist() + [1.0]
        for i, t in enumerate(ts):
            a, a_prev = abars[i], abars[i + 1]
            t_batch = torch.full((shape[0],), float(t), device=x.device)
            pred = guided_prediction(model_fn, x, t_batch, cond, null_cond, guidance_scale)
            if self.prediction == "eps":
                eps = pred
                x0 = (x - math.sqrt(1 - a) * eps) / math.sqrt(a)
            else:
                x0 = math.sqrt(a) * x - math.sqrt(1 - a) * pred
                eps = math.sqrt(1 - a) * x + math.sqrt(a) * pred
            sigma = self.eta * math.sqrt((1 - a_prev) / (1 - a) * (1 - a / a_prev))
            x = math.sqrt(a_prev) * x0 + math.sqrt(max(1 - a_prev - sigma**2, 0.0)) * eps  # max: rounding
            if sigma > 0:
                x = x + sigma * torch.randn(shape, generator=generator, device=x.device)
        return x


def build_diffusion(name: str, **kwargs) -> RectifiedFlow | DDPM:
    """`name` and options from conf/diffusion/<name>.yaml."""
    return lookup(DIFFUSIONS, "diffusion", name)(**kwargs)
