"""Rectified flow and DDPM/DDIM: noising and targets, samplers, classifier-free guidance, determinism."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from sorabench.diffusion import DDPM, RectifiedFlow, build_diffusion, guided_prediction, video_mse
from sorabench.models.dit import DiT
from sorabench.models.text import TextEmbedding

CONF = Path(__file__).resolve().parents[1] / "conf" / "diffusion"
LATENT = (4, 4, 8, 8)
TEXT_DIM = 16
OBJECTIVES = {
    "flow": lambda: RectifiedFlow(),
    "flow_shift3": lambda: RectifiedFlow(shift=3.0),
    "ddpm_eps_linear": lambda: DDPM("linear", "eps"),
    "ddpm_v_cosine": lambda: DDPM("cosine", "v"),
    "ddim_eta1": lambda: DDPM("linear", "eps", eta=1.0),
}


def tiny_dit(diffusion=None, conditioning: str = "cross_attention", zero_output: bool = False) -> DiT:
    torch.manual_seed(0)
    scale = diffusion.timestep_scale if diffusion is not None else 1000.0
    model = DiT(LATENT, width=64, depth=2, heads=4, conditioning=conditioning, text_dim=TEXT_DIM,
                max_text_len=8, timestep_scale=scale)
    if not zero_output:  # a zero output layer would make every comparison below trivially true
        torch.nn.init.normal_(model.final_layer.linear.weight, std=0.1)
    return model


def text(batch: int, seed: int = 0) -> TextEmbedding:
    g = torch.Generator().manual_seed(seed)
    mask = torch.arange(5)[None] < torch.tensor([5, 3, 4, 2][:batch])[:, None]
    return TextEmbedding(torch.randn(batch, 5, TEXT_DIM, generator=g) * mask[..., None], mask,
                         torch.randn(batch, TEXT_DIM, generator=g))


def smooth_clips(batch: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.interpolate(torch.randn(batch, 4, 2, 2, 2, generator=g), size=LATENT[1:], mode="trilinear")


class Counting:
    """Wraps a model_fn and records the batch size of each call."""

    def __init__(self, fn):
        self.fn, self.batches = fn, []

    def __call__(self, x, t, cond):
        self.batches.append(x.shape[0])
        return self.fn(x, t, cond)


def test_guidance_scale_one_is_the_conditional_prediction_exactly():
    model = tiny_dit()
    x, t, cond = torch.randn(3, *LATENT), torch.rand(3), text(3)
    counting = Counting(model)
    out = guided_prediction(counting, x, t, cond, model.null_text(3), 1.0)
    assert torch.equal(out, model(x, t, cond))
    assert counting.batches == [3]  # no unconditional half


def test_guidance_is_one_batched_forward():
    model = tiny_dit()
    x, t, cond, null = torch.randn(3, *LATENT), torch.rand(3), text(3), model.null_text(3)
    counting = Counting(model)
    out = guided_prediction(counting, x, t, cond, null, 4.0)
    assert counting.batches == [6]
    conditional, unconditional = model(x, t, cond), model(x, t, null)
    torch.testing.assert_close(out, unconditional + 4.0 * (conditional - unconditional), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["flow", "ddpm_eps_linear"])
def test_guidance_arguments_are_checked(name):
    diffusion, model = OBJECTIVES[name](), tiny_dit()
    with pytest.raises(ValueError, match=">= 0"):
        diffusion.sample(model, (2, *LATENT), text(2), model.null_text(2), steps=2, guidance_scale=-1.0)
    with pytest.raises(ValueError, match="null_cond"):
        diffusion.sample(model, (2, *LATENT), text(2), None, steps=2, guidance_scale=3.0)


@pytest.mark.parametrize("name", list(OBJECTIVES))
def test_sampling_is_deterministic_per_seed(name):
    diffusion = OBJECTIVES[name]()
    model = tiny_dit(diffusion)
    cond, null = text(2), model.null_text(2)

    def sample(seed):
        g = torch.Generator().manual_seed(seed)
        return diffusion.sample(model, (2, *LATENT), cond, null, steps=3, guidance_scale=2.0, generator=g)

    first = sample(0)
    assert torch.equal(first, sample(0)) and torch.isfinite(first).all()
    assert not torch.allclose(first, sample(1))


def oracle(diffusion, x0: torch.Tensor):
    """The exact prediction for data that is the single point x0 (what a perfect network would output)."""

    def model_fn(x, t, cond):
        t = t.view(-1, 1, 1, 1, 1)
        if isinstance(diffusion, RectifiedFlow):
            return (x - x0) / t  # v = ε - x0, with ε = (x_t - (1 - t) x0) / t
        abar = diffusion.alphas_cumprod.float()[t.long()]
        eps = (x - abar.sqrt() * x0) / (1 - abar).sqrt()
        return eps if diffusion.prediction == "eps" else abar.sqrt() * eps - (1 - abar).sqrt() * x0

    return model_fn


@pytest.mark.parametrize("name", list(OBJECTIVES))
def test_noising_targets_and_samplers_agree(name):
    """With the exact prediction, the training loss is 0 (target consistent with the noising) and the sampler
    lands on the data point (its update consistent with the target)."""
    diffusion = OBJECTIVES[name]()
    x0 = smooth_clips(2)
    model_fn = oracle(diffusion, x0)
    loss = diffusion.training_loss(model_fn, x0, None, generator=torch.Generator().manual_seed(0))
    assert loss < 1e-8
    sample = diffusion.sample(model_fn, x0.shape, None, steps=7, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(sample, x0, rtol=0, atol=1e-4)


def test_schedules():
    flow = RectifiedFlow(shift=3.0)
    ts = flow.timesteps(10)
    assert ts[0] == 1.0 and ts[-1] == 0.0 and all(a > b for a, b in zip(ts, ts[1:]))
    assert ts[5] > 0.5  # the shift spends more steps at high noise
    for schedule in ["linear", "cosine"]:
        abar = DDPM(schedule).alphas_cumprod
        assert abar.shape == (1000,) and abar[0] > 0.99 and abar[-1] < 1e-3
        assert (abar[1:] < abar[:-1]).all()
    with pytest.raises(ValueError, match="schedule"):
        DDPM("quadratic")
    with pytest.raises(ValueError, match="prediction"):
        DDPM(prediction="x0")


def test_training_loss_is_deterministic_given_a_generator():
    model, x0, cond = tiny_dit(), smooth_clips(2), text(2)
    for diffusion in [RectifiedFlow(), DDPM()]:
        losses = [diffusion.training_loss(model, x0, cond, torch.Generator().manual_seed(5)) for _ in range(2)]
        assert torch.equal(*losses)


@pytest.mark.parametrize("name", ["flow", "ddpm_eps_linear", "ddpm_v_cosine"])
def test_objective_reduces_loss(name):
    diffusion = OBJECTIVES[name]()
    model = tiny_dit(diffusion, conditioning="adaln_zero", zero_output=True)
    x0, cond = smooth_clips(4), text(4)

    @torch.no_grad()
    def held_out_loss():  # fixed noise and timesteps, so before and after are comparable
        return sum(diffusion.training_loss(model, x0, cond, torch.Generator().manual_seed(s)) for s in range(8)) / 8

    before = held_out_loss()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(60):
        optimizer.zero_grad()
        diffusion.training_loss(model, x0, cond, generator=g).backward()
        optimizer.step()
    assert held_out_loss() < 0.6 * before


@pytest.mark.parametrize("path", sorted(CONF.glob("*.yaml")), ids=lambda p: p.stem)
def test_configs_build(path):
    """Every shipped objective YAML builds with its own options and trains and samples a tiny model."""
    options = yaml.safe_load(path.read_text())
    diffusion = build_diffusion(**options)
    model, x0, cond = tiny_dit(diffusion), smooth_clips(2), text(2)
    loss = diffusion.training_loss(model, x0, cond, torch.Generator().manual_seed(0))
    assert torch.isfinite(loss) and loss > 0
    counting = Counting(model)  # sampling without guidance: one forward per step, the YAML's sample_steps of them
    sample = diffusion.sample(counting, x0.shape, cond, generator=torch.Generator().manual_seed(0))
    assert len(counting.batches) == options["sample_steps"] and sample.shape == x0.shape
    assert torch.isfinite(sample).all()


def test_unknown_diffusion():
    with pytest.raises(ValueError, match="flow"):
        build_diffusion("edm")


def test_motion_weight_adds_the_error_of_frame_differences_only():
    target = torch.randn(2, 4, 8, 4, 4)
    static_error = target + torch.randn(2, 4, 1, 4, 4)  # the same error in every frame: no motion error
    moving_error = target + torch.randn(2, 4, 8, 4, 4)
    assert video_mse(static_error, target, 0.0) == F.mse_loss(static_error, target)
    assert torch.allclose(video_mse(static_error, target, 3.0), F.mse_loss(static_error, target))
    expected = F.mse_loss(moving_error, target) + 3.0 * F.mse_loss(moving_error.diff(dim=2), target.diff(dim=2))
    assert torch.allclose(video_mse(moving_error, target, 3.0), expected)
    # images (one frame) and the flow objective: the weight reaches the loss
    assert torch.allclose(video_mse(moving_error[:, :, :1], target[:, :, :1], 3.0),
                          F.mse_loss(moving_error[:, :, :1], target[:, :, :1]))
    x0, model = torch.randn(4, 4, 8, 4, 4), lambda x, t, c: torch.zeros_like(x)
    plain = RectifiedFlow().training_loss(model, x0, None, torch.Generator().manual_seed(0))
    weighted = RectifiedFlow(motion_weight=1.0).training_loss(model, x0, None, torch.Generator().manual_seed(0))
    assert weighted > plain * 1.5  # noise - x0 changes from frame to frame: the difference term adds ~2x
