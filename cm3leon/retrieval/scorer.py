"""Image-caption agreement for re-ranking generated images (CLIP's role in CM3Leon's decoding)."""
from __future__ import annotations

from collections.abc import Sequence

import torch

from .embed import TextTokenizerLike, encode_captions
from .encoder import ImageTextEncoder, check_images

__all__ = ["ImageTextScorer"]


class ImageTextScorer:
    """Scores ``(image_i, caption_i)`` pairs by the cosine of their embeddings.

    Args:
        encoder: a :class:`DualEncoder` (or an adapter with the same interface).
        text_tokenizer: the tokenizer of the encoder's text tower.
    """

    def __init__(self, encoder: ImageTextEncoder, text_tokenizer: TextTokenizerLike) -> None:
        self.encoder, self.text_tokenizer = encoder, text_tokenizer

    @torch.inference_mode()
    def score(self, images: torch.Tensor, captions: Sequence[str]) -> torch.Tensor:
        """uint8 ``[N, 3, H, W]`` and N captions -> float32 ``[N]`` in [-1, 1]: ``image_i · caption_i``."""
        images = check_images(images)
        if isinstance(captions, str) or not isinstance(captions, Sequence):
            raise TypeError(f"captions must be a sequence of str, got {type(captions).__name__}")
        if len(captions) != images.shape[0]:
            raise ValueError(f"captions has {len(captions)} entries but images has {images.shape[0]}")
        for i, c in enumerate(captions):
            if not isinstance(c, str) or not c:
                raise ValueError(f"captions[{i}] must be a non-empty str, got {c!r}")
        if not captions:
            return torch.empty(0)
        image_emb = self.encoder.encode_images(images).float()
        text_emb = encode_captions(self.encoder, self.text_tokenizer, captions).float()
        return (image_emb * text_emb).sum(-1).cpu()
