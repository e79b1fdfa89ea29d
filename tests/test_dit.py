"""The DiT backbone and the conditioning strategies, on tiny configurations (CPU, a few seconds each)."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn

from sorabench.diffusion import RectifiedFlow
from sorabench.models.blocks import FinalLayer
from sorabench.models.conditioning import STRATEGIES, ConditioningStrategy, JointSequence, register
from sorabench.models.dit import DiT, forward_flops, patchify, unpatchify
from sorabench.models.layers import BlockSpec, Mlp, SelfAttention
from sorabench.models.text import TextEmbedding

CONF = Path(__file__).resolve().parents[1] / "conf"
# Every registered strategy (a new one cannot skip the shape and overfit tests); each has its YAML (checked below).
STRATEGY_NAMES = sorted(STRATEGIES)
# Text tokens updated through depth on one joined [text; video] sequence (SD3, Flux, CogVideoX).
JOINT_SEQUENCE = [name for name in STRATEGY_NAMES if issubclass(STRATEGIES[name], JointSequence)]
LATENT = (4, 4, 8, 8)  # (C, T, H, W): 4 frames of 4×4 tokens with patch (1, 2, 2)
TEXT_DIM = 16


def tiny_dit(conditioning: str, **kwargs) -> DiT:
    config = dict(width=64, depth=2, heads=4, text_dim=TEXT_DIM, max_text_len=8) | kwargs
    return DiT(LATENT, conditioning=conditioning, **config)


def random_text(batch: int, length: int = 6, lengths: list[int] | None = None, seed: int = 0) -> TextEmbedding:
    """Random text with per-row valid lengths (default: decreasing, so most rows have padding)."""
    g = torch.Generator().manual_seed(seed)
    lengths = lengths or [max(1, length - i) for i in range(batch)]
    mask = torch.arange(length)[None] < torch.tensor(lengths)[:, None]
    tokens = torch.randn(batch, length, TEXT_DIM, generator=g) * mask[..., None]
    return TextEmbedding(tokens, mask, torch.randn(batch, TEXT_DIM, generator=g))


def inputs(batch: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, *LATENT, generator=g), torch.rand(batch, generator=g), random_text(batch, seed=seed)


@pytest.mark.parametrize("patch_size", [(1, 1, 1), (1, 2, 2), (2, 2, 2), (2, 4, 1), (4, 2, 2)])
def test_unpatchify_inverts_patchify(patch_size):
    x = torch.randn(2, 3, 4, 8, 4)
    tokens = patchify(x, patch_size)
    pt, ph, pw = patch_size
    assert tokens.shape == (2, (4 // pt) * (8 // ph) * (4 // pw), 3 * pt * ph * pw)
    assert torch.equal(tokens[:, 0], x[:, :, :pt, :ph, :pw].flatten(1))  # first token = first patch, (c, t, h, w)
    assert torch.equal(unpatchify(tokens, patch_size, x.shape[1:]), x)


def test_patch_size_must_divide_latent():
    with pytest.raises(ValueError, match=r"\(2, 3, 2\).*\(4, 8, 8\)"):
        DiT(LATENT, patch_size=(2, 3, 2))
    with pytest.raises(ValueError, match="does not divide"):
        patchify(torch.zeros(1, 4, 3, 8, 8), (2, 2, 2))


@pytest.mark.parametrize("name", STRATEGY_NAMES)
@pytest.mark.parametrize("attention", ["full", "factorised"])
def test_every_strategy_keeps_the_latent_shape(name, attention):
    if attention == "factorised" and name in JOINT_SEQUENCE:  # one attention over [text; video]: no factorising
        with pytest.raises(ValueError, match="needs dit.attention=full"):
            tiny_dit(name, attention=attention)
        return
    model = tiny_dit(name, attention=attention)
    x, t, text = inputs()
    out = model(x, t, text)
    assert out.shape == x.shape and torch.isfinite(out).all()
    (out - x).square().sum().backward()  # with a zero output layer only that layer gets gradient at step 0
    assert model.final_layer.linear.weight.grad.abs().sum() > 0


def test_adaln_zero_is_identity_at_init():
    model = tiny_dit("adaln_zero")
    blocks_identity = []
    for block in model.blocks:
        block.register_forward_hook(lambda m, args, out: blocks_identity.append(torch.equal(out, args[0])))
    x, t, text = inputs()
    assert torch.equal(model(x, t, text), torch.zeros_like(x))
    assert blocks_identity == [True, True]


def test_in_context_drops_the_condition_tokens():
    model = tiny_dit("in_context")
    seen = {}
    model.blocks[0].register_forward_pre_hook(lambda m, args: seen.update(block=args[0].shape))
    model.final_layer.register_forward_pre_hook(lambda m, args: seen.update(final=args[0].shape))
    x, t, text = inputs()
    assert model(x, t, text).shape == x.shape
    video_tokens = 4 * 4 * 4
    assert seen["block"] == (2, 1 + text.tokens.shape[1] + video_tokens, 64)  # [t; text; video]
    assert seen["final"] == (2, video_tokens, 64)


@pytest.mark.parametrize(
    "name, attention",
    [("in_context", "full"), ("in_context", "factorised"), ("cross_attention", "full"), ("hybrid", "full")],
)
def test_padded_text_tokens_are_ignored(name, attention):
    options = {"zero_init_cross_attn": False} if name == "hybrid" else {}  # else text has no effect at init
    model = tiny_dit(name, attention=attention, **options)
    nn.init.normal_(model.final_layer.linear.weight, std=0.1)  # a zero output layer would hide everything
    x, t, text = inputs(batch=2)
    text = random_text(2, length=6, lengths=[3, 6])
    base = model(x, t, text)

    padded = text.tokens.clone()
    padded[0, 3:] = 100.0 * torch.randn(3, TEXT_DIM)  # row 0's padding
    out = model(x, t, TextEmbedding(padded, text.mask, text.pooled))
    torch.testing.assert_close(out, base, rtol=0, atol=1e-5)

    valid = text.tokens.clone()
    valid[0, 1] += 1.0
    out = model(x, t, TextEmbedding(valid, text.mask, text.pooled))
    assert not torch.allclose(out[0], base[0], atol=1e-4)
    torch.testing.assert_close(out[1], base[1], rtol=0, atol=1e-5)  # rows stay independent


@pytest.mark.parametrize("name", STRATEGY_NAMES)
def test_every_strategy_overfits_four_clips(name):
    torch.manual_seed(0)
    model = tiny_dit(name)
    g = torch.Generator().manual_seed(0)
    # Smooth clips (random 2×2×2 latents, upsampled): learnable in 100 steps, unlike 4096 independent numbers.
    x0 = F.interpolate(torch.randn(4, 4, 2, 2, 2, generator=g), size=LATENT[1:], mode="trilinear")
    text = random_text(4, seed=1)
    flow = RectifiedFlow()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(100):
        loss = flow.training_loss(model, x0, text, generator=g)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < 0.5 * first, f"{name}: loss {first:.3f} -> {last:.3f}"


def test_factorised_attention_axes():
    spec = BlockSpec(width=32, heads=4, mlp_ratio=4.0, attention="factorised", frames=3, positions=5)
    x = torch.randn(2, 3 * 5, 32)
    changed = x.clone()
    changed[:, 0] += 1.0  # frame 0, position 0

    space = SelfAttention(spec, "space")
    delta = (space(changed) - space(x)).reshape(2, 3, 5, 32).abs().sum(dim=(0, 3))
    assert delta[0].gt(0).all() and delta[1:].eq(0).all()  # only frame 0 sees it

    time = SelfAttention(spec, "time")
    delta = (time(changed) - time(x)).reshape(2, 3, 5, 32).abs().sum(dim=(0, 3))
    assert delta[:, 0].gt(0).all() and delta[:, 1:].eq(0).all()  # only position 0, in every frame

    # Condition tokens (in-context) join every frame's spatial attention and are left alone by the temporal one.
    prefix_mask = torch.tensor([[True, True], [True, False]])
    with_prefix = torch.cat([torch.randn(2, 2, 32), x], dim=1)
    assert space(with_prefix, prefix_mask).shape == with_prefix.shape
    assert time(with_prefix, prefix_mask)[:, :2].eq(0).all()


def test_factorised_dit_trains():
    model = tiny_dit("adaln_zero", attention="factorised")
    assert len(model.blocks[0].attn) == 2
    x, t, text = inputs()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    # Zero init: step 1 trains only the output layer, step 2 opens the gates, step 3 reaches the attention.
    for _ in range(3):
        optimizer.zero_grad()
        RectifiedFlow().training_loss(model, x, text).backward()
        optimizer.step()
    assert model.blocks[0].attn[1].qkv.weight.grad.abs().sum() > 0


def test_drop_text_uses_the_null_condition():
    model = tiny_dit("cross_attention")
    text = random_text(3, length=5)
    dropped = model.drop_text(text, torch.tensor([True, False, True]))
    null = model.null_text(3).pad_to(5)
    for i, is_null in enumerate([True, False, True]):
        source = null if is_null else text
        assert torch.equal(dropped.tokens[i], source.tokens[i]) and torch.equal(dropped.mask[i], source.mask[i])
        assert torch.equal(dropped.pooled[i], source.pooled[i])
    dropped.tokens.sum().backward()
    assert model.null_tokens.grad is not None

    # The null condition is the same input at any padded length.
    nn.init.normal_(model.final_layer.linear.weight, std=0.1)
    x, t, _ = inputs(batch=3)
    torch.testing.assert_close(model(x, t, model.null_text(3)), model(x, t, null), rtol=0, atol=1e-5)


def test_text_longer_than_max_text_len_is_rejected():
    model = tiny_dit("adaln_zero")
    x, t, _ = inputs()
    with pytest.raises(ValueError, match="max_text_len"):
        model(x, t, random_text(2, length=9))


def test_unknown_strategy_lists_the_registered_ones():
    with pytest.raises(ValueError, match="adaln_zero"):
        tiny_dit("film")


# A sixth strategy, defined and registered outside the package: one class here plus one YAML.
class AdditiveBlock(nn.Module):
    def __init__(self, spec: BlockSpec):
        super().__init__()
        self.norm = nn.LayerNorm(spec.width)
        self.mlp = Mlp(spec.width, spec.width, spec.width)

    def forward(self, x, cond):
        return x + self.mlp(self.norm(x + cond.unsqueeze(1)))


@register("test_additive")
class Additive(ConditioningStrategy):
    """t + projected pooled text added to the tokens in every block (no attention at all)."""

    def __init__(self, spec: BlockSpec, text_dim: int, text_scale: float = 1.0):
        super().__init__(spec)
        self.text_scale = text_scale
        self.text_proj = nn.Linear(text_dim, spec.width)

    def forward(self, t_emb, text):
        return t_emb + self.text_scale * self.text_proj(text.pooled)

    def block(self):
        return AdditiveBlock(self.spec)

    def final_layer(self, out_dim):
        return FinalLayer(self.spec.width, out_dim)


def test_a_strategy_registered_outside_the_package(tmp_path):
    assert STRATEGIES["test_additive"] is Additive
    path = tmp_path / "test_additive.yaml"
    path.write_text("name: test_additive\ntext_scale: 0.5\n")
    options = yaml.safe_load(path.read_text())
    model = tiny_dit(options.pop("name"), **options)
    assert isinstance(model.conditioning, Additive) and model.conditioning.text_scale == 0.5
    x, t, text = inputs()
    assert model(x, t, text).shape == x.shape
    with pytest.raises(ValueError, match="already registered"):
        register("test_additive")(Additive)


def test_forward_flops_and_parameters():
    flops = {name: forward_flops(tiny_dit(name), batch_size=2) for name in ["adaln_zero", "cross_attention"]}
    assert flops["cross_attention"] > flops["adaln_zero"] > 0

    # Every matmul of adaLN-Zero counted once per clip, attention included (multiply-adds, ×2 for FLOPs):
    D, N, patch, text, hidden, depth = 64, 64, 16, TEXT_DIM, 256, 2
    block = D * 6 * D + N * D * 3 * D + 2 * N * N * D + N * D * D + 2 * N * D * hidden
    macs = N * patch * D + (256 * D + D * D) + (text * D + D * D) + depth * block + (D * 2 * D + N * D * patch)
    assert forward_flops(tiny_dit("adaln_zero"), batch_size=3) == pytest.approx(2 * macs / 1e9)

    model = tiny_dit("adaln_zero")
    assert model.num_parameters() == sum(p.numel() for p in model.parameters()) > 0


def test_size_configs_match_dit():
    sizes = {path.stem: yaml.safe_load(path.read_text()) for path in (CONF / "dit").glob("*.yaml")}
    assert set(sizes) == {"tiny", "S", "B", "L", "XL"}
    with torch.device("meta"):  # shapes only: no memory, no init cost
        params = {name: DiT((4, 8, 32, 32), **config).num_parameters() / 1e6 for name, config in sizes.items()}
    # adaLN-Zero with pooled text in place of DiT's class embedding: DiT's Table 1 sizes (33, 130, 458, 675 M).
    assert [round(params[n]) for n in ["S", "B", "L", "XL"]] == [33, 130, 458, 675]
    assert params["tiny"] < params["S"]


@pytest.mark.parametrize("path", sorted((CONF / "conditioning").glob("*.yaml")), ids=lambda p: p.stem)
def test_conditioning_configs_build(path):
    options = yaml.safe_load(path.read_text())
    assert options.pop("name") == path.stem
    x, t, text = inputs()
    assert tiny_dit(path.stem, **options)(x, t, text).shape == x.shape


def test_every_strategy_has_a_yaml_and_every_yaml_a_strategy():
    names = {yaml.safe_load(p.read_text())["name"] for p in (CONF / "conditioning").glob("*.yaml")}
    assert names == set(STRATEGY_NAMES) and len(STRATEGY_NAMES) >= 8
