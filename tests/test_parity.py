"""Parity with the reference implementations users trust: diffusers' SD3 `JointTransformerBlock`, Flux
`FluxTransformerBlock` / `FluxSingleTransformerBlock` and CogVideoX `CogVideoXBlock`. Their weights are loaded into
sorabench's blocks and the outputs must match (max abs error <= 1e-5 in fp32). Tiny widths: seconds in all."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sorabench.models.blocks import Context, DoubleStreamBlock, ExpertAdaLNBlock, JointCond, SingleStreamBlock
from sorabench.models.layers import BlockSpec
from tests.test_dit import JOINT_SEQUENCE, inputs, random_text, tiny_dit

diffusers = pytest.importorskip("diffusers")  # a `test` extra dependency: installed in CI, so this never skips there

WIDTH, HEADS, TEXT, VIDEO, BATCH = 32, 4, 5, 12, 2
SPEC = BlockSpec(WIDTH, HEADS, 4.0, "full", frames=3, positions=4)


def copy_(dst: nn.Module, *sources: nn.Module) -> None:
    """dst.weight/bias = the sources' concatenated along the output dimension (fused QKV from to_q, to_k, to_v)."""
    with torch.no_grad():
        dst.weight.copy_(torch.cat([s.weight for s in sources]))
        if getattr(dst, "bias", None) is not None:
            dst.bias.copy_(torch.cat([s.bias for s in sources]))


def randomise(module: nn.Module, seed: int, std: float = 0.3) -> None:
    """Every parameter random (norm weights and gates included: an init-time 0 or 1 would hide a swapped chunk)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)


def streams(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    video = torch.randn(BATCH, VIDEO, WIDTH, generator=g)
    text = torch.randn(BATCH, TEXT, WIDTH, generator=g)
    temb = torch.randn(BATCH, WIDTH, generator=g)
    full = torch.ones(BATCH, TEXT, dtype=torch.bool)  # the references take no text mask: all tokens valid
    return video, text, temb, JointCond(F.silu(temb), Context(text, full))


def load_double_stream(ours: DoubleStreamBlock, ref: nn.Module) -> None:
    attn = ref.attn
    copy_(ours.modulation, ref.norm1.linear)
    copy_(ours.context_modulation, ref.norm1_context.linear)
    copy_(ours.attn.qkv, attn.to_q, attn.to_k, attn.to_v)
    copy_(ours.context_attn.qkv, attn.add_q_proj, attn.add_k_proj, attn.add_v_proj)
    copy_(ours.proj, attn.to_out[0])
    copy_(ours.context_proj, attn.to_add_out)
    copy_(ours.mlp.fc1, ref.ff.net[0].proj)
    copy_(ours.mlp.fc2, ref.ff.net[2])
    copy_(ours.context_mlp.fc1, ref.ff_context.net[0].proj)
    copy_(ours.context_mlp.fc2, ref.ff_context.net[2])
    if attn.norm_q is not None:
        for mine, theirs in [(ours.attn.q_norm, attn.norm_q), (ours.attn.k_norm, attn.norm_k),
                             (ours.context_attn.q_norm, attn.norm_added_q), (ours.context_attn.k_norm, attn.norm_added_k)]:
            copy_(mine, theirs)


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


@pytest.mark.parametrize("qk_norm", [None, "rms"])
def test_mmdit_block_matches_diffusers_sd3_joint_block(qk_norm):
    from diffusers.models.attention import JointTransformerBlock

    torch.manual_seed(0)
    ref = JointTransformerBlock(WIDTH, HEADS, WIDTH // HEADS, context_pre_only=False,
                                qk_norm={None: None, "rms": "rms_norm"}[qk_norm]).eval()
    randomise(ref, 1)
    ours = DoubleStreamBlock(SPEC, qk_norm).eval()
    load_double_stream(ours, ref)
    video, text, temb, cond = streams()
    with torch.no_grad():
        ref_text, ref_video = ref(video, text, temb)
        out = ours(torch.cat([text, video], 1), cond)
    assert max_err(out[:, TEXT:], ref_video) <= 1e-5 and max_err(out[:, :TEXT], ref_text) <= 1e-5


def test_double_stream_block_matches_diffusers_flux_block():
    from diffusers.models.transformers.transformer_flux import FluxTransformerBlock

    torch.manual_seed(0)
    ref = FluxTransformerBlock(WIDTH, HEADS, WIDTH // HEADS).eval()  # qk_norm rms_norm
    randomise(ref, 2)
    ours = DoubleStreamBlock(SPEC, "rms").eval()
    load_double_stream(ours, ref)
    video, text, temb, cond = streams(1)
    with torch.no_grad():
        ref_text, ref_video = ref(video, text, temb)  # no rotary embedding: sorabench adds sin-cos positions
        out = ours(torch.cat([text, video], 1), cond)
    assert max_err(out[:, TEXT:], ref_video) <= 1e-5 and max_err(out[:, :TEXT], ref_text) <= 1e-5


def test_single_stream_block_matches_diffusers_flux_single_block():
    from diffusers.models.transformers.transformer_flux import FluxSingleTransformerBlock

    torch.manual_seed(0)
    ref = FluxSingleTransformerBlock(WIDTH, HEADS, WIDTH // HEADS, mlp_ratio=4.0).eval()
    randomise(ref, 3)
    ours = SingleStreamBlock(SPEC, "rms").eval()
    copy_(ours.modulation, ref.norm.linear)
    copy_(ours.attn.qkv, ref.attn.to_q, ref.attn.to_k, ref.attn.to_v)
    copy_(ours.attn.q_norm, ref.attn.norm_q)
    copy_(ours.attn.k_norm, ref.attn.norm_k)
    copy_(ours.mlp_in, ref.proj_mlp)
    copy_(ours.proj, ref.proj_out)
    video, text, temb, cond = streams(2)
    with torch.no_grad():
        ref_text, ref_video = ref(video, text, temb)
        out = ours(torch.cat([text, video], 1), cond)
    assert max_err(out[:, TEXT:], ref_video) <= 1e-5 and max_err(out[:, :TEXT], ref_text) <= 1e-5


def test_expert_adaln_block_matches_diffusers_cogvideox_block():
    from diffusers.models.transformers.cogvideox_transformer_3d import CogVideoXBlock

    torch.manual_seed(0)
    ref = CogVideoXBlock(WIDTH, HEADS, WIDTH // HEADS, time_embed_dim=WIDTH, attention_bias=True, qk_norm=True,
                         norm_elementwise_affine=True, norm_eps=1e-5).eval()
    randomise(ref, 4)
    ours = ExpertAdaLNBlock(SPEC, "layer").eval()
    copy_(ours.modulation1, ref.norm1.linear)
    copy_(ours.norm1, ref.norm1.norm)
    copy_(ours.modulation2, ref.norm2.linear)
    copy_(ours.norm2, ref.norm2.norm)
    copy_(ours.attn.qkv, ref.attn1.to_q, ref.attn1.to_k, ref.attn1.to_v)
    copy_(ours.attn.q_norm, ref.attn1.norm_q)
    copy_(ours.attn.k_norm, ref.attn1.norm_k)
    copy_(ours.proj, ref.attn1.to_out[0])
    copy_(ours.mlp.fc1, ref.ff.net[0].proj)
    copy_(ours.mlp.fc2, ref.ff.net[2])
    video, text, temb, cond = streams(3)
    with torch.no_grad():
        ref_video, ref_text = ref(video, text, temb)
        out = ours(torch.cat([text, video], 1), cond)
    assert max_err(out[:, TEXT:], ref_video) <= 1e-5 and max_err(out[:, :TEXT], ref_text) <= 1e-5


# ---- the strategies in the DiT: masks, the null condition, the Flux split, zero init --------------------------



def randomised_dit(name: str, **options):
    model = tiny_dit(name, depth=3, **options).eval()
    randomise(model, 5, std=0.15)  # away from the zero init, so the text matters
    return model


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal up to fp32 rounding of a different summation order (batch rows, sequence lengths)."""
    return torch.allclose(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", JOINT_SEQUENCE)
def test_padding_text_tokens_are_never_attended(name):
    model = randomised_dit(name)
    x, t, _ = inputs()
    text = random_text(2, length=4, lengths=[4, 2])
    longer = text.pad_to(7)
    longer.tokens[:, 4:] = 100.0  # garbage in the padding: must not reach the video tokens
    longer.tokens[1, 2:] = 100.0
    with torch.no_grad():
        assert same(model(x, t, text), model(x, t, longer))
        trimmed = random_text(2, length=4, lengths=[4, 2])[1:2]
        trimmed = type(trimmed)(trimmed.tokens[:, :2], trimmed.mask[:, :2], trimmed.pooled)
        assert same(model(x[1:], t[1:], trimmed), model(x, t, text)[1:])
        assert not same(model(x, t, text), model(x, t, random_text(2, length=4, lengths=[4, 2], seed=9)))


@pytest.mark.parametrize("name", JOINT_SEQUENCE)
def test_null_condition_and_caption_dropout(name):
    model = randomised_dit(name)
    x, t, text = inputs()
    null = model.null_text(2)
    with torch.no_grad():
        dropped = model.drop_text(text, torch.tensor([True, False]))
        out, uncond, cond = model(x, t, dropped), model(x, t, null), model(x, t, text)
    assert same(out[0], uncond[0]) and same(out[1], cond[1])
    assert not same(uncond, cond)


def test_double_single_splits_the_depth_like_flux():
    kinds = lambda m: [type(b).__name__[0] for b in m.blocks]  # noqa: E731
    assert kinds(tiny_dit("double_single", depth=6)) == list("DDSSSS")
    assert kinds(tiny_dit("double_single", depth=3, double_blocks=3)) == list("DDD")
    with pytest.raises(ValueError, match="double_blocks=4"):
        tiny_dit("double_single", depth=3, double_blocks=4)
    with pytest.raises(ValueError, match="attention=full"):
        tiny_dit("mmdit", attention="factorised")
