"""A tiny random CM3Leon with real (small) tokenizers over the shapes world, for the generation tests."""
from __future__ import annotations

import functools
import types
from dataclasses import dataclass

import torch

from cm3leon.config import CM3LeonConfig
from cm3leon.data import ShapesWorld, caption
from cm3leon.data.tasks import EDIT_PREFIX, STRUCTURE_PREFIX
from cm3leon.model import CM3Leon
from cm3leon.pipeline import Pipeline
from cm3leon.tokenizer import DocumentCodec, ImageTokenizer, ImageTokenizerConfig, TextTokenizer, Vocabulary

WORLD = ShapesWorld(image_size=16, seed=3)


@functools.cache
def parts() -> tuple[CM3Leon, DocumentCodec, ImageTokenizer]:
    corpus = [caption(s) for s in WORLD.scenes(40)] + [EDIT_PREFIX, f"{STRUCTURE_PREFIX} edges",
                                                       "Question: what colour is it? Answer: red."]
    text = TextTokenizer.train(corpus * 3, vocab_size=320)
    torch.manual_seed(0)
    images = ImageTokenizer(ImageTokenizerConfig.preset("tiny")).eval()
    vocab = Vocabulary(text.vocab_size, images.config.codebook_size)
    grid = images.config.grid_size
    codec = DocumentCodec(text, vocab, (grid, grid))
    config = CM3LeonConfig(vocab_size=len(vocab), d_model=64, n_layers=2, n_heads=2, max_seq_len=192,
                           init_std=0.05, zero_init_output_proj=False)
    torch.manual_seed(0)
    return CM3Leon(config).eval(), codec, images


class RedScorer:
    """Stands in for the dual encoder's image-text score: the mean red level of each image."""

    def score(self, images: torch.Tensor, captions) -> torch.Tensor:
        assert images.dtype == torch.uint8 and len(captions) == images.shape[0]
        return images[:, 0].float().mean(dim=(1, 2))


@dataclass(frozen=True)
class FakeDocument:
    """Follows the retrieval contract's RetrievalDocument fields."""

    text: str | None
    image: torch.Tensor | None
    token_ids: list[int] | None


class FakeRetriever:
    """Returns the first ``k`` of fixed documents for every query and records the calls."""

    def __init__(self, documents: list[list[int]]) -> None:
        self.documents, self.calls = documents, []

    def retrieve(self, queries, k, *, by="text", generator=None):
        self.calls.append((list(queries), k, by))
        return [[FakeDocument("doc", None, d) for d in self.documents[:k]] for _ in queries]


def fake_retrieval_module() -> types.ModuleType:
    module = types.ModuleType("cm3leon.retrieval")
    module.RetrievalDocument = FakeDocument
    return module


def pipeline(**kwargs) -> Pipeline:
    model, codec, images = parts()
    return Pipeline(model, codec, images, **kwargs)
