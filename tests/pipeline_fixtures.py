"""A tiny random CM3Leon with real (small) tokenizers over the shapes world, for the generation tests."""
from __future__ import annotations

import functools

import torch

from cm3leon.config import CM3LeonConfig
from cm3leon.data import ShapesWorld, caption
from cm3leon.data.tasks import EDIT_PREFIX, STRUCTURE_PREFIX
from cm3leon.model import CM3Leon
from cm3leon.pipeline import Pipeline
from cm3leon.retrieval import (DualEncoder, DualEncoderConfig, ImageTextScorer, MemoryBank, RetrievalDocument,
                               Retriever, embed_documents)
from cm3leon.tokenizer import (DocumentCodec, ImageTokenizer, ImageTokenizerConfig, TextTokenizer, Vocabulary,
                               tokenize_images)

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


@functools.cache
def retrieval() -> tuple[Retriever, ImageTextScorer]:
    """A tiny random dual encoder over a bank of 12 caption-image documents (token_ids: the codec's document)."""
    _, codec, images = parts()
    text = codec.text_tokenizer
    config = DualEncoderConfig(image_size=16, patch_size=4, image_width=32, image_layers=1, image_heads=2,
                               text_vocab_size=text.vocab_size, text_max_len=40, text_width=32, text_layers=1,
                               text_heads=2, embed_dim=16)
    torch.manual_seed(0)
    encoder = DualEncoder(config).eval()
    pictures = WORLD.images(12, 100)
    docs = [RetrievalDocument(caption(s), p, codec.encode(tokenize_images([[caption(s), p]], images)[0]))
            for s, p in zip(WORLD.scenes(12, 100), pictures)]
    bank = MemoryBank(config.embed_dim)
    bank.add(docs, embed_documents(docs, encoder, text))
    return Retriever(encoder, bank, text), ImageTextScorer(encoder, text)


def pipeline(**kwargs) -> Pipeline:
    model, codec, images = parts()
    return Pipeline(model, codec, images, **kwargs)
