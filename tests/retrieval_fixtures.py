"""Small pieces shared by the retrieval tests: a BPE over shapes captions, a tiny dual encoder, a fake encoder
whose embeddings are easy to control, and shapes documents."""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from cm3leon.data import ShapesCaptions, ShapesWorld
from cm3leon.retrieval import DualEncoder, DualEncoderConfig, RetrievalDocument
from cm3leon.retrieval.dropout import patch_keep_indices
from cm3leon.tokenizer import TextTokenizer, Vocabulary

WORLD = ShapesWorld(image_size=16, seed=3)


@functools.cache
def tokenizer() -> TextTokenizer:
    return TextTokenizer.train([text for _, text in ShapesCaptions(WORLD, 200)], vocab_size=300)


@functools.cache
def vocabulary() -> Vocabulary:
    return Vocabulary(text_size=tokenizer().vocab_size, image_codes=64)


def tiny_config(**overrides) -> DualEncoderConfig:
    base = dict(image_size=16, patch_size=4, image_width=32, image_layers=1, image_heads=2,
                text_vocab_size=tokenizer().vocab_size, text_max_len=40, text_width=32, text_layers=1,
                text_heads=2, embed_dim=16)
    return DualEncoderConfig(**(base | overrides))


def tiny_encoder(seed: int = 0, **kwargs) -> DualEncoder:
    torch.manual_seed(seed)
    return DualEncoder(tiny_config(), **kwargs).eval()


def shapes_documents(n: int, start: int = 0) -> list[RetrievalDocument]:
    """Caption-image documents of scenes ``start ..``; ``token_ids`` are the caption's global ids (a stand-in
    for ``caption <break> image tokens``, enough where no image tokenizer is needed)."""
    items = ShapesCaptions(WORLD, n, start)
    pairs = (items[i] for i in range(n))
    return [RetrievalDocument(text, image, vocabulary().text_to_global(tokenizer().encode(text)))
            for image, text in pairs]


class FakeEncoder:
    """Deterministic, easy-to-reason-about encoder: a caption is the normalised sum of per-id random vectors,
    an image the normalised mean of projected 4x4 patches (each minus its own mean, so flat background patches
    count for nothing; dropout drops patches). It records what it was asked to encode."""

    def __init__(self, vocab_size: int = 300, embed_dim: int = 16, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.embed_dim = embed_dim
        self.table = torch.randn(vocab_size, embed_dim, generator=g)
        self.patch_proj = torch.randn(3 * 16, embed_dim, generator=g)
        self.text_calls: list[list[list[int]]] = []
        self.image_calls: list[tuple[int, float, int]] = []  # (batch, drop, patches kept)

    def encode_texts(self, text_ids):
        self.text_calls.append([list(ids) for ids in text_ids])
        return F.normalize(torch.stack([self.table[list(ids)].sum(0) for ids in text_ids]), dim=-1)

    def encode_images(self, images, *, drop=0.0, generator=None):
        x = images.float() / 255.0
        n, _, h, w = x.shape
        patches = x.unfold(2, 4, 4).unfold(3, 4, 4).permute(0, 2, 3, 1, 4, 5).reshape(n, -1, 48)
        patches = patches - patches.mean(-1, keepdim=True)
        if drop:
            keep = patch_keep_indices(n, patches.shape[1], drop, generator)
            patches = torch.gather(patches, 1, keep[..., None].expand(-1, -1, 48))
        self.image_calls.append((n, drop, patches.shape[1]))
        return F.normalize((patches @ self.patch_proj).mean(1), dim=-1)
