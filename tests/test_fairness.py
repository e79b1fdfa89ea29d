"""Issue 13's fairness fixes: every strategy starts at a zero output, GFLOPs at the real caption lengths, the
KID subset size the config asks for."""

import pytest
import torch
from omegaconf import OmegaConf

from sorabench.metrics.evaluate import evaluate_videos
from sorabench.metrics.features import EvaluatorFeatures
from sorabench.models.conditioning import STRATEGIES
from sorabench.models.dit import caption_flops, forward_flops
from sorabench.models.evaluator import VideoAttributeClassifier
from tests.test_dit import inputs, tiny_dit


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_every_strategy_starts_at_zero_output(name):
    # DiT zero-initialises the final linear of every variant; a random one (adaLN used to keep it) starts at
    # mean |output| ~ 1, a handicap unrelated to how the condition enters.
    x, t, text = inputs()
    with torch.no_grad():
        assert torch.equal(tiny_dit(name)(x, t, text), torch.zeros_like(x)), name


def test_caption_flops_is_the_mean_over_real_caption_lengths():
    model = tiny_dit("in_context")
    at = {n: forward_flops(model, text_len=n) for n in (2, 3, 8)}
    assert at[2] < at[3] < at[8]  # in-context pays for every text token
    assert caption_flops(model, [2, 2, 3, 3]) == pytest.approx((at[2] + at[3]) / 2)
    assert caption_flops(model, [2, 100]) == pytest.approx((at[2] + at[8]) / 2)  # clipped to max_text_len
    adaln = tiny_dit("adaln_zero")  # pooled text only: the caption length costs nothing
    assert caption_flops(adaln, [2, 5]) == pytest.approx(forward_flops(adaln))
    with pytest.raises(ValueError, match="at least one"):
        caption_flops(model, [])


def test_kid_subset_size_is_honoured(tmp_path):
    from sorabench.metrics.registry import EvalSetup, build_metric

    classifier = VideoAttributeClassifier({"colour": 6, "shape": 3}, width=4, feature_dim=8)
    nets = (EvaluatorFeatures(classifier), EvaluatorFeatures(classifier, per_frame=True))
    g = torch.Generator().manual_seed(0)
    real = [torch.rand(6, 3, 4, 16, 16, generator=g) * 2 - 1]
    fake = torch.rand(6, 3, 4, 16, 16, generator=g) * 2 - 1
    fields = {"feature_net": "x", "feature_sha256": "y", "n_real": 6, "n_generated": 6, "num_frames": 4,
              "frame_stride": 1, "clip_start": "first", "resolution": 16, "real_split": "t", "seed": 0}
    for size, expected in ((10, 10), (1000, 24)):  # 6 clips x 4 frames = 24 frames cap it
        m = OmegaConf.create({"n_real": 6, "n_samples": 6, "batch_size": 6, "num_frames": 4, "frame_stride": 1,
                              "kid_subsets": 3, "kid_subset_size": size, "stats_cache_dir": str(tmp_path / str(size))})
        assert build_metric("kid", EvalSetup(m, *nets, fields=fields)).subset_size == expected
        out, ranked = evaluate_videos([fake], real, m, nets, None, fields, None, None)
        assert out["eval/kid"] == out["eval/kid"] and ranked == {"fvd": False, "fid": False, "kid": False}


# ---- two axes: the text pathway x the timestep pathway -------------------------------------------------------

AXES = [(name, t) for name in sorted(STRATEGIES) for t in STRATEGIES[name].timesteps]


@pytest.mark.parametrize("name, timestep", AXES, ids=lambda v: str(v))
def test_every_text_pathway_with_every_timestep_pathway_builds_and_starts_at_zero(name, timestep):
    model = tiny_dit(name, timestep=timestep)
    x, t, text = inputs()
    out = model(x, t, text)
    assert out.shape == x.shape and torch.equal(out.detach(), torch.zeros_like(x))
    out.square().sum().backward()  # the graph is connected
    assert model.final_layer.linear.weight.grad is not None


def test_held_equal_timestep_is_adaln_zero_modulation_without_a_t_token():
    from sorabench.models.blocks import ModulatedBlock

    x, t, text = inputs()
    for name in ("in_context", "cross_attention"):
        model = tiny_dit(name, timestep="adaln_zero")
        cond = model.conditioning(model.t_embedder(t), text)
        # t enters only as c = SiLU(t_emb), exactly adaln_zero's c without the pooled text ...
        assert torch.equal(cond.c, torch.nn.functional.silu(model.t_embedder(t)))
        assert all(isinstance(b, ModulatedBlock) for b in model.blocks)
        # ... and never as a token: in-context prepends the text tokens alone
        assert model.conditioning.prepend_tokens(torch.zeros(2, 64, 64), cond).shape[1] == 64 + (
            text.tokens.shape[1] if name == "in_context" else 0)
    paper = tiny_dit("in_context")  # the name keeps DiT's meaning: [t; text] tokens, plain blocks
    cond = paper.conditioning(paper.t_embedder(t), text)
    assert cond.tokens.shape[1] == 1 + text.tokens.shape[1]


def test_timestep_axis_errors_and_labels():
    from sorabench.models.conditioning import strategy_label

    with pytest.raises(ValueError, match=r"conditioning.timestep='adaln_zero'.*\['adaln_single'\]"):
        tiny_dit("hybrid", timestep="adaln_zero")
    with pytest.raises(ValueError, match="conditioning.timestep='film'"):
        tiny_dit("mmdit", timestep="film")
    assert strategy_label("in_context", "token") == "in_context"
    assert strategy_label("in_context", "adaln_zero") == "in_context+t=adaln_zero"
    assert strategy_label("mmdit", "adaln_zero") == "mmdit" and strategy_label("adaln_zero", None) == "adaln_zero"


def test_flops_budget_gives_every_strategy_the_reference_training_flops():
    from sorabench.models.text import LearnedTextEncoder
    from sorabench.config import ConfigError, compose_config
    from sorabench.training.dit_module import DiTModule, flops_budget_steps
    from sorabench.training.dit_run import budget_reference

    captions = ["a red circle moving left", "a big blue square moving up quickly", "green triangle"]

    def module(name: str) -> DiTModule:
        return DiTModule((4, 4, 8, 8), dit=dict(width=32, depth=1, heads=2, patch_size=[1, 2, 2]),
                         conditioning={"name": name}, diffusion={"name": "flow"}, optim={"lr": 1e-3},
                         text_encoder={"name": "learned", "width": 16, "depth": 1, "heads": 2, "max_length": 32},
                         vocab=LearnedTextEncoder.from_captions(captions).vocab)

    # the reference strategy's config, composed as conditioning=adaln_zero is (its YAML options included)
    reference = budget_reference(compose_config("train", ["budget=flops", "budget_reference=adaln_zero"]))
    assert reference == {"name": "adaln_zero", "timestep": "adaln_zero"}
    ref = module("adaln_zero")
    assert flops_budget_steps(ref, captions, reference, 1000) == 1000
    for name in ("in_context", "mmdit"):
        m = module(name)
        steps = flops_budget_steps(m, captions, reference, 1000)
        ratio = ref.gflops(captions) / m.gflops(captions)
        assert steps < 1000 and steps == round(1000 * ratio)  # costlier per step: fewer steps, equal FLOPs
    with pytest.raises(ConfigError, match="budget_reference='nope'"):
        budget_reference(compose_config("train", ["budget=flops", "budget_reference=nope"]))
