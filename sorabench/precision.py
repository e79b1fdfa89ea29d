"""Which precision a run computes in, and why: `trainer.precision: auto` resolved once per command.

- On a GPU, `auto` is bf16-mixed (Lightning's autocast; weights, optimiser state and EMA stay fp32).
- On a CPU, `auto` is bf16-mixed only where bf16 is measurably faster *here*: the CPU must report native bf16
  (`avx512_bf16` or `amx_bf16`) and a one-second calibration of the tiny DiT's training step, bf16 autocast against
  fp32 side by side, must run at least `MIN_CPU_SPEEDUP`× faster. Neither the flag nor a matmul is enough: without
  AMX a bf16 matmul can run slower than fp32, and with AMX a 5x faster matmul still gave a slower step
  (benchmarks/RESULTS.md, "Precision"). Without the flag no time is spent calibrating. Everywhere else 32-true.
- The resolved precision is printed at start, logged as the tag `sorabench.precision` and as the protocol field
  `eval.protocol.precision` of every evaluation, and `sorabench report` refuses to pool runs whose precision differs.

`BF16Mixed` is Lightning's `MixedPrecision("bf16-mixed")` with one fix: Lightning refuses gradient clipping with a
fused optimiser under any mixed precision, because with fp16's GradScaler a fused step would unscale gradients after
they were clipped. bf16 has no scaler, so there is nothing to unscale and clipping before the fused step is exact.
"""

from __future__ import annotations

import contextlib
import functools
import time
from dataclasses import dataclass

import torch
from lightning.pytorch.plugins.precision import MixedPrecision, Precision
from lightning.pytorch.utilities import GradClipAlgorithmType

CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
MIN_CPU_SPEEDUP = 1.5  # bf16's rounding is worth it only for a clear gain (measured speedups: benchmarks/RESULTS.md)


def lightning_precisions() -> tuple[str, ...]:
    """The precision names Lightning's Trainer accepts (read from Lightning, so a new one is known at once)."""
    import typing

    from lightning.fabric.connector import _PRECISION_INPUT

    return tuple(str(v) for lit in typing.get_args(_PRECISION_INPUT) for v in typing.get_args(lit))


def check_precision(precision) -> None:
    """One line naming `trainer.precision` and the accepted values, before any compute."""
    from sorabench.config import ConfigError

    accepted = ("auto", *lightning_precisions())
    if str(precision) not in accepted:
        raise ConfigError(f"trainer.precision={precision}: must be one of {', '.join(accepted)}")


@dataclass(frozen=True)
class Resolved:
    precision: str  # what Lightning runs: "32-true", "bf16-mixed", ...
    reason: str  # one line: why

    def __str__(self) -> str:
        return f"{self.precision} ({self.reason})"


def cpu_flags() -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo (Linux); empty where it cannot be read."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_bf16_flags() -> list[str]:
    flags = cpu_flags()
    return [f for f in CPU_BF16_FLAGS if f in flags]


@functools.cache
def cpu_bf16_speedup(seconds: float = 1.0) -> float:
    """fp32 time / bf16-autocast time of the tiny DiT's training step (conf/dit/tiny.yaml, adaLN-Zero, the default
    4x8x8x8 latent, batch 16: forward, backward, fused AdamW), timed alternately for about `seconds` after warm-up,
    on the threads torch uses. Cached per process.

    A matmul alone is not a reliable witness: on a CPU with AMX a bf16 matmul ran 5.5x fp32 while the step ran 0.8x
    (attention, casts and elementwise ops ate it); the step is what a run spends its time on (benchmarks/RESULTS.md,
    "Precision")."""
    from omegaconf import OmegaConf

    from sorabench.config import CONF_DIR
    from sorabench.diffusion import RectifiedFlow
    from sorabench.models.dit import DiT
    from sorabench.models.text import TextEmbedding

    tiny = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "dit" / "tiny.yaml"))

    g = torch.Generator().manual_seed(0)
    x0, tokens = torch.randn(16, 4, 8, 8, 8, generator=g), torch.randn(16, 12, 384, generator=g)
    text = TextEmbedding(tokens, torch.ones(16, 12, dtype=torch.bool), tokens.mean(1))
    flow = RectifiedFlow()

    def stepper(dtype):
        torch.manual_seed(0)
        model = DiT((4, 8, 8, 8), **tiny, conditioning="adaln_zero", timestep_scale=RectifiedFlow.timestep_scale)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

        def step():
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"):
                loss = flow.training_loss(model, x0, text)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()

        return step

    steps = {"32": stepper("32"), "bf16": stepper("bf16")}
    for step in steps.values():  # warm-up: oneDNN builds its bf16 kernels on the first calls
        step(), step()
    best = {k: float("inf") for k in steps}
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        for k, step in steps.items():
            t0 = time.perf_counter()
            step()
            best[k] = min(best[k], time.perf_counter() - t0)
    return best["32"] / best["bf16"]


def on_gpu(accelerator: str) -> bool:
    return accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())


def resolve(precision: str, accelerator: str = "auto") -> Resolved:
    """`trainer.precision` as Lightning should run it, with the reason (printed at start, see module doc)."""
    check_precision(precision)
    precision = str(precision)
    if precision != "auto":
        return Resolved(precision, "set in the config")
    if on_gpu(accelerator):
        return Resolved("bf16-mixed", "auto: GPU")
    flags = cpu_bf16_flags()
    if not flags:
        return Resolved("32-true", "auto: this CPU has no native bf16 (no avx512_bf16 / amx_bf16)")
    speedup = cpu_bf16_speedup()
    have = "/".join(flags)
    if speedup >= MIN_CPU_SPEEDUP:
        return Resolved("bf16-mixed", f"auto: CPU with {have}, bf16 train step {speedup:.2f}x fp32")
    return Resolved("32-true", f"auto: CPU with {have}, but a bf16 train step only {speedup:.2f}x fp32 "
                               f"(< {MIN_CPU_SPEEDUP}x)")


class BF16Mixed(MixedPrecision):
    """bf16 autocast (Lightning's MixedPrecision) that allows gradient clipping with fused optimisers (module doc)."""

    def __init__(self, device: str):
        super().__init__("bf16-mixed", device)

    def clip_gradients(self, optimizer, clip_val=0.0, gradient_clip_algorithm=GradClipAlgorithmType.NORM) -> None:
        # MixedPrecision.clip_gradients raises for fused optimisers to protect fp16's GradScaler; there is none here.
        Precision.clip_gradients(self, optimizer, clip_val, gradient_clip_algorithm)


def trainer_precision(precision: str, accelerator: str) -> tuple[str | None, list]:
    """(precision=, plugins) for L.Trainer: bf16-mixed goes through BF16Mixed, everything else through Lightning."""
    if precision == "bf16-mixed":
        return None, [BF16Mixed("cuda" if on_gpu(accelerator) else "cpu")]
    return precision, []


def autocast(precision: str, device: torch.device | str):
    """The forward context of `precision` outside a Trainer (sampling, evaluation): bf16 autocast for bf16-mixed,
    nothing otherwise. Features and Fréchet statistics are accumulated in float64 regardless (metrics/)."""
    device_type = torch.device(device).type
    if str(precision) == "bf16-mixed":
        return torch.autocast(device_type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
