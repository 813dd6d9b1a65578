"""Every CM3Leon generation task behind one object: text -> image, captioning, VQA, infilling, editing,
structure-guided and grounded generation (see :mod:`cm3leon.pipeline.prompts` for the prompt layouts).

Each call decodes all of its prompts x samples x guidance streams as rows of one KV-cached batch
(:func:`cm3leon.generate`). Randomness is keyed per request: sample ``n`` of a prompt with seed ``s`` draws the
same tokens whichever other prompts share the call.
"""
from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from .._checks import check_int, is_int
from ..generate import DecodeStep, SamplingOptions, generate
from ..model import CM3Leon
from ..tokenizer import NUM_SENTINELS, DocumentCodec, ImageTokenizer, tokenize_images
from .prompts import MASK_TEXT, GuidedPrompt, PromptBuilder
from . import results
from .results import ImageResult, InfillResult

__all__ = ["STRATEGIES", "ImageDecoding", "Pipeline"]

STRATEGIES = ("topp", "cdk", "mix")
Box = tuple[int, int, int, int]


@dataclass(frozen=True)
class ImageDecoding:
    """Sampling settings of image tokens.

    ``temperature`` and ``top_p``/``top_k`` apply to guided top-p sampling; ``cd_alpha`` and ``cd_k`` set the
    head set of contrastive decoding (CD-K: tokens whose expert probability is at least ``cd_alpha`` times
    the ``cd_k``-th largest), sampled at ``temperature``. The paper leaves CD-K's alpha and k open; alpha 0.1
    is contrastive decoding's original value and k = 8 keeps a few candidates per image token.
    """

    temperature: float = 1.0
    top_p: float = 0.9
    top_k: int = 0
    cd_alpha: float = 0.1
    cd_k: int = 8


class Scorer(Protocol):
    def score(self, images: torch.Tensor, captions: Sequence[str]) -> torch.Tensor: ...


class Retriever(Protocol):
    def retrieve(self, queries: Sequence[Any], k: int, *, by: str = "text", generator: Any = None
                 ) -> list[list[Any]]: ...


def _as_list(value: Any, name: str, kind: type | tuple[type, ...]) -> list:
    """A single item or a non-empty sequence of items -> list."""
    items = [value] if isinstance(value, kind) else list(value) if isinstance(value, Sequence) else None
    if items is None or not items or not all(isinstance(x, kind) for x in items):
        names = kind.__name__ if isinstance(kind, type) else " / ".join(k.__name__ for k in kind)
        raise TypeError(f"{name} must be a {names} or a non-empty sequence of them")
    return items


def _seeds(seed: int | Sequence[int], n: int) -> list[int]:
    """One seed per request: an int is every request's seed (so a request's output does not depend on its
    batch), a sequence gives one per request."""
    if is_int(seed):
        return [operator.index(seed)] * n
    seeds = list(seed) if isinstance(seed, Sequence) else None
    if seeds is None or len(seeds) != n or not all(is_int(s) for s in seeds):
        raise ValueError(f"seed must be an int or one int per prompt ({n}), got {seed!r}")
    return [operator.index(s) for s in seeds]


def _sample_seed(seed: int, sample: int) -> int:
    """The sampler seed of sample ``sample`` of a request seeded ``seed`` (a distinct int64 per pair)."""
    mixed = (seed * 1_000_003 + sample) & ((1 << 64) - 1)
    return mixed - (1 << 64) if mixed >= 1 << 63 else mixed


class Pipeline:
    """The generation tasks of a CM3Leon model.

    Args:
        model: the language model; its vocabulary must hold ``codec.vocabulary``'s ids.
        codec: text tokenizer + vocabulary (:class:`DocumentCodec`).
        image_tokenizer: images <-> token grids; its codebook must match the vocabulary's image codes.
        retriever: optional, for retrieval-augmented prompts (``retrieved=k``): an object with
            ``retrieve(queries, k, by=...)`` returning documents with ``token_ids`` (``cm3leon.retrieval``).
        scorer: optional image-text scorer with ``score(images, captions) -> [N]`` for re-ranking (CLIP's role).
        decode_step: optional replacement of the decode step (``cm3leon.generate.compile_decode_step``).
        progress: show progress bars while decoding.
    """

    def __init__(self, model: CM3Leon, codec: DocumentCodec, image_tokenizer: ImageTokenizer, *,
                 retriever: Retriever | None = None, scorer: Scorer | None = None,
                 decode_step: DecodeStep | None = None, progress: bool = False) -> None:
        if not isinstance(model, CM3Leon):
            raise TypeError(f"model must be a CM3Leon, got {type(model).__name__}")
        if not isinstance(image_tokenizer, ImageTokenizer):
            raise TypeError(f"image_tokenizer must be an ImageTokenizer, got {type(image_tokenizer).__name__}")
        self.prompts = PromptBuilder(codec)
        vocab = codec.vocabulary
        if len(vocab) > model.config.vocab_size:
            raise ValueError(f"codec's vocabulary has {len(vocab)} ids, more than the model's vocab_size "
                             f"{model.config.vocab_size}")
        if image_tokenizer.config.codebook_size != vocab.image_codes:
            raise ValueError(f"image_tokenizer has {image_tokenizer.config.codebook_size} codes, the vocabulary "
                             f"{vocab.image_codes}")
        grid = (image_tokenizer.config.grid_size,) * 2
        if codec.image_shape not in (None, grid):
            raise ValueError(f"codec.image_shape {codec.image_shape} != the image tokenizer's grid {grid}")
        if retriever is not None and not callable(getattr(retriever, "retrieve", None)):
            raise TypeError("retriever must have a retrieve(queries, k, by=...) method")
        if scorer is not None and not callable(getattr(scorer, "score", None)):
            raise TypeError("scorer must have a score(images, captions) method")
        self.model, self.codec, self.image_tokenizer = model, codec, image_tokenizer
        self.vocabulary = vocab
        self.grid = grid
        self.retriever, self.scorer = retriever, scorer
        self.decode_step, self.progress = decode_step, progress

    @property
    def image_size(self) -> int:
        """Side of the images this pipeline reads and writes (pixels)."""
        return self.image_tokenizer.config.image_size

    # ---- inputs ----------------------------------------------------------------------------------------------
    def _check_images(self, images: torch.Tensor | Sequence[torch.Tensor], name: str) -> torch.Tensor:
        """uint8 images ``[N, 3, H, W]`` / ``[3, H, W]`` / a list of ``[3, H, W]`` -> one ``[N, 3, H, W]``."""
        if isinstance(images, torch.Tensor):
            batch = images[None] if images.ndim == 3 else images
        elif isinstance(images, Sequence) and images and all(isinstance(i, torch.Tensor) for i in images):
            if any(i.shape != images[0].shape for i in images):
                raise ValueError(f"{name} must all have the same shape")
            batch = torch.stack(list(images))
        else:
            raise TypeError(f"{name} must be a uint8 tensor [N, 3, H, W] / [3, H, W] or a list of [3, H, W]")
        size = self.image_size
        if batch.ndim != 4 or batch.shape[1:] != (3, size, size) or batch.dtype != torch.uint8:
            raise ValueError(f"{name} must be uint8 RGB images [N, 3, {size}, {size}] (or [3, {size}, {size}]), "
                             f"got {batch.dtype} of shape {tuple(batch.shape)}")
        return batch

    def _grids(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Checked images ``[N, 3, H, W]`` -> their token grids ``[h, w]``."""
        return list(self.image_tokenizer.encode(images).cpu())

    def _retrieve(self, queries: list[Any], k: int, by: str) -> list[list[list[int]]]:
        """The token ids of ``k`` retrieved documents per query (``[[]] * n`` when ``k == 0``)."""
        check_int("retrieved", k, 0)
        if k == 0:
            return [[] for _ in queries]
        if self.retriever is None:
            raise ValueError(f"retrieved={k} needs a retriever (Pipeline(..., retriever=...))")
        from ..retrieval import RetrievalDocument  # noqa: PLC0415 - retrieval needs faiss; only here

        docs = self.retriever.retrieve([RetrievalDocument(**q) for q in queries], k, by=by)
        if len(docs) != len(queries) or any(len(d) > k for d in docs):
            raise ValueError(f"the retriever returned {[len(d) for d in docs]} documents, expected up to {k} per "
                             "query")
        if any(d.token_ids is None for row in docs for d in row):
            raise ValueError("retrieved documents must carry token_ids to be prepended to prompts")
        return [[list(d.token_ids) for d in row] for row in docs]

    # ---- decoding cores ----------------------------------------------------------------------------------------
    def _image_options(self, strategy: str, n_samples: int, guidance_scale: Any,
                       decoding: ImageDecoding) -> list[tuple[str, SamplingOptions]]:
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
        if not isinstance(decoding, ImageDecoding):
            raise TypeError(f"decoding must be an ImageDecoding, got {type(decoding).__name__}")
        image_range = self.vocabulary.image_range
        topp = SamplingOptions(temperature=decoding.temperature, top_p=decoding.top_p, top_k=decoding.top_k,
                               guidance_scale=guidance_scale, allowed_range=image_range)
        cdk = SamplingOptions(temperature=decoding.temperature, contrastive=True, cd_alpha=decoding.cd_alpha,
                              cd_k=decoding.cd_k, allowed_range=image_range)
        # "mix": the first half of a prompt's samples (rounded up) with top-p + guidance, the rest with CD-K.
        n_topp = {"topp": n_samples, "cdk": 0, "mix": (n_samples + 1) // 2}[strategy]
        return [("topp", topp) if j < n_topp else ("cdk", cdk) for j in range(n_samples)]

    def _sample_images(self, guided: list[GuidedPrompt], *, n_samples: int, strategy: str, guidance_scale: Any,
                       decoding: ImageDecoding, seed: int | Sequence[int]) -> tuple[torch.Tensor, list[list[str]]]:
        """Token grids ``[P, N, h, w]`` for ``N`` samples of each guided prompt, in one batched decode."""
        check_int("n_samples", n_samples, 1)
        per_sample = self._image_options(strategy, n_samples, guidance_scale, decoding)
        seeds = _seeds(seed, len(guided))
        requests = [(g, p, j) for p, g in enumerate(guided) for j in range(n_samples)]
        three = guided[0].image_conditional is not None
        out = generate(
            self.model, [g.conditional for g, _, _ in requests],
            unconditional_prompts=[g.unconditional for g, _, _ in requests],
            image_conditional_prompts=[g.image_conditional for g, _, _ in requests] if three else None,
            options=[per_sample[j][1] for _, _, j in requests],
            seeds=[_sample_seed(seeds[p], j) for _, p, j in requests],
            max_new_tokens=self.grid[0] * self.grid[1], decode_step=self.decode_step, progress=self.progress)
        tokens = torch.tensor(out, dtype=torch.int64) - self.vocabulary.image_range[0]
        strategies = [[name for name, _ in per_sample] for _ in guided]
        return tokens.view(len(guided), n_samples, *self.grid), strategies

    def _images(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token grids ``[P, N, h, w]`` -> uint8 images ``[P, N, 3, H, W]``."""
        images = self.image_tokenizer.decode(tokens.flatten(0, 1), as_uint8=True).cpu()
        return images.view(*tokens.shape[:2], *images.shape[1:])

    def _image_result(self, guided: list[GuidedPrompt], n_samples: int, strategy: str, guidance_scale: Any,
                      decoding: ImageDecoding, seed: int | Sequence[int]) -> ImageResult:
        tokens, strategies = self._sample_images(guided, n_samples=n_samples, strategy=strategy,
                                                 guidance_scale=guidance_scale, decoding=decoding, seed=seed)
        return ImageResult(self._images(tokens), tokens, None, strategies)

    def _generate_text(self, prompts: list[list[int]], *, stops: list[int], max_new_tokens: int,
                       temperature: float, top_p: float, seed: int | Sequence[int]) -> list[list[int]]:
        """Text ids after each prompt until a stop token; only text ids (and the stops) can be drawn."""
        check_int("max_new_tokens", max_new_tokens, 1)
        allowed = torch.zeros(self.model.config.vocab_size, dtype=torch.bool)
        lo, hi = self.vocabulary.text_range
        allowed[lo:hi] = True
        allowed[stops] = True
        return generate(self.model, prompts, max_new_tokens=max_new_tokens,
                        options=SamplingOptions(temperature=temperature, top_p=top_p), stop_tokens=stops,
                        seeds=_seeds(seed, len(prompts)), allowed_mask=allowed, stop_check_every=8,
                        decode_step=self.decode_step, progress=self.progress)

    def _text(self, ids: list[int]) -> str:
        return self.codec.text_tokenizer.decode(self.vocabulary.global_to_text(ids))

    # ---- tasks -------------------------------------------------------------------------------------------------
    def text_to_image(self, captions: str | Sequence[str], n_samples: int = 8, *, strategy: str = "mix",
                      guidance_scale: float = 3.0, retrieved: int = 0, rerank: bool = True,
                      decoding: ImageDecoding = ImageDecoding(), seed: int | Sequence[int] = 0) -> ImageResult:
        """``n_samples`` images per caption.

        Args:
            captions: one caption or several.
            strategy: ``"topp"`` (top-p + classifier-free guidance), ``"cdk"`` (contrastive decoding, the
                unconditional stream as amateur) or ``"mix"`` (half each: the paper's best).
            guidance_scale: CFG scale ``s`` in ``u + s·(c − u)``.
            retrieved: documents prepended from the retriever (queried by the caption's text).
            rerank: sort each caption's samples by the scorer's image-text score, best first (needs a scorer).
            seed: every caption's seed, or one per caption.
        """
        captions = _as_list(captions, "captions", str)
        if rerank and self.scorer is None:
            raise ValueError("rerank=True needs a scorer (Pipeline(..., scorer=...)); pass rerank=False")
        context = self._retrieve([{"text": c, "image": None, "token_ids": None} for c in captions], retrieved,
                                 by="text")
        guided = [self.prompts.text_to_image(c, r) for c, r in zip(captions, context)]
        result = self._image_result(guided, n_samples, strategy, guidance_scale, decoding, seed)
        if not rerank:
            return result
        n = result.images.shape[1]
        scores = self.scorer.score(result.images.flatten(0, 1), [c for c in captions for _ in range(n)])
        scores = torch.as_tensor(scores).detach().float().cpu().view(len(captions), n)
        order = results.rerank(scores)
        take = lambda t: torch.stack([t[p, order[p]] for p in range(len(captions))])  # noqa: E731
        strategies = [[result.strategies[p][j] for j in order[p].tolist()] for p in range(len(captions))]
        return ImageResult(take(result.images), take(result.tokens), take(scores), strategies)

    def image_to_text(self, images: torch.Tensor | Sequence[torch.Tensor], *, retrieved: int = 0,
                      instruction: str | None = None, max_new_tokens: int = 32, temperature: float = 0.0,
                      top_p: float = 1.0, seed: int | Sequence[int] = 0) -> list[str]:
        """A caption per image, generated as the masked text span before the image (infilling layout).

        ``instruction`` puts task words before the span (e.g. ``"Describe the given picture."`` for models
        tuned on that template); ``temperature=0`` is greedy."""
        images = self._check_images(images, "images")
        context = self._retrieve([{"text": None, "image": img, "token_ids": None} for img in images], retrieved,
                                 by="image")
        prompts = [self.prompts.image_to_text(g, r, instruction) for g, r in zip(self._grids(images), context)]
        out = self._generate_text(prompts, stops=self._span_stops(1), max_new_tokens=max_new_tokens,
                                  temperature=temperature, top_p=top_p, seed=seed)
        return [self._text(ids).strip() for ids in out]

    def answer(self, images: torch.Tensor | Sequence[torch.Tensor], questions: str | Sequence[str], *,
               retrieved: int = 0, max_new_tokens: int = 16, temperature: float = 0.0, top_p: float = 1.0,
               seed: int | Sequence[int] = 0) -> list[str]:
        """Visual question answering: the answer is the masked span of ``Question: {q} Answer: {a}.`` before
        the image; the trailing period of the template is removed."""
        images = self._check_images(images, "images")
        questions = _as_list(questions, "questions", str)
        if len(questions) != len(images):
            raise ValueError(f"questions must hold one question per image ({len(images)}), got {len(questions)}")
        context = self._retrieve([{"text": q, "image": img, "token_ids": None} for q, img in zip(questions, images)],
                                 retrieved, by="both")
        prompts = [self.prompts.vqa(g, q, r) for g, q, r in zip(self._grids(images), questions, context)]
        out = self._generate_text(prompts, stops=self._span_stops(1), max_new_tokens=max_new_tokens,
                                  temperature=temperature, top_p=top_p, seed=seed)
        return [self._text(ids).strip().removesuffix(".").strip() for ids in out]

    def infill(self, documents: Sequence[Any], *, max_new_tokens: int = 16, temperature: float = 0.0,
               top_p: float = 1.0, seed: int | Sequence[int] = 0) -> list[InfillResult]:
        """Fills every ``<mask>`` written in the text segments of a document (a list of text / uint8 image
        ``[3, H, W]`` / token grid ``[h, w]`` segments), or of each of a list of documents.

        Span ``i`` is generated after ``<infill> <mask:0> span0 ... <mask:i>`` until ``<mask:i+1>`` (or
        ``<eos>`` / ``<break>``), with at most ``max_new_tokens`` tokens per span."""
        if isinstance(documents, (str, torch.Tensor)) or not isinstance(documents, Sequence) or not documents:
            raise TypeError("documents must be a document (list of segments) or a non-empty list of documents")
        if isinstance(documents[0], (str, torch.Tensor)):
            documents = [documents]
        if not all(isinstance(d, Sequence) and not isinstance(d, str) for d in documents):
            raise TypeError("documents must be a document (list of segments) or a non-empty list of documents")
        docs = tokenize_images([list(d) for d in documents], self.image_tokenizer)
        built = [self.prompts.infill(d) for d in docs]
        seeds = _seeds(seed, len(docs))
        sequences = [ids for ids, _ in built]
        spans: list[list[str]] = [[] for _ in docs]
        for i in range(max(n for _, n in built)):
            active = [d for d, (_, n) in enumerate(built) if n > i]
            for d in active:
                sequences[d] = sequences[d] + [self.vocabulary.sentinel_id(i)]
            out = self._generate_text([sequences[d] for d in active], stops=self._span_stops(i + 1),
                                      max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                      seed=[_sample_seed(seeds[d], i) for d in active])
            for d, ids in zip(active, out):
                spans[d].append(self._text(ids))
                sequences[d] = sequences[d] + ids
        return [InfillResult(_fill(list(doc), s), s) for doc, s in zip(documents, spans)]

    def edit(self, images: torch.Tensor | Sequence[torch.Tensor], instructions: str | Sequence[str], *,
             n_samples: int = 1, guidance_scale: tuple[float, float] = (1.5, 7.5),
             decoding: ImageDecoding = ImageDecoding(), seed: int | Sequence[int] = 0) -> ImageResult:
        """Text-guided editing with three-stream instruct guidance ``u + s_img·(img − u) + s_txt·(full − img)``
        (``guidance_scale = (s_img, s_txt)``) and top-p sampling."""
        if isinstance(guidance_scale, (str, bytes)) or not isinstance(guidance_scale, Sequence) \
                or len(guidance_scale) != 2:
            raise TypeError(f"guidance_scale must be a pair (s_img, s_txt) for instruct guidance, "
                            f"got {guidance_scale!r}")
        grids = self._grids(self._check_images(images, "images"))
        instructions = _as_list(instructions, "instructions", str)
        if len(instructions) != len(grids):
            raise ValueError(f"instructions must hold one per image ({len(grids)}), got {len(instructions)}")
        guided = [self.prompts.edit(g, t) for g, t in zip(grids, instructions)]
        return self._image_result(guided, n_samples, "topp", tuple(guidance_scale), decoding, seed)

    def structure_to_image(self, conditions: torch.Tensor | Sequence[torch.Tensor], kind: str,
                           captions: str | Sequence[str], *, n_samples: int = 1, strategy: str = "topp",
                           guidance_scale: float = 3.0, decoding: ImageDecoding = ImageDecoding(),
                           seed: int | Sequence[int] = 0) -> ImageResult:
        """Images following a structure image (``kind`` = ``"edges"`` or ``"segmentation"``, rendered as
        uint8 RGB like ``cm3leon.data.render_edges`` / ``render_segmentation``) and a caption, with CFG."""
        grids = self._grids(self._check_images(conditions, "conditions"))
        captions = _as_list(captions, "captions", str)
        if len(captions) != len(grids):
            raise ValueError(f"captions must hold one caption per condition ({len(grids)}), got {len(captions)}")
        guided = [self.prompts.structure(g, kind, c) for g, c in zip(grids, captions)]
        return self._image_result(guided, n_samples, strategy, guidance_scale, decoding, seed)

    def grounded(self, boxes: Sequence[Sequence[tuple[str, Box]]], *, n_samples: int = 1, strategy: str = "topp",
                 guidance_scale: float = 3.0, decoding: ImageDecoding = ImageDecoding(),
                 seed: int | Sequence[int] = 0) -> ImageResult:
        """Images with the given objects at the given pixel boxes: ``boxes`` holds one layout per request, a
        list of ``(description, (x0, y0, x1, y1))`` such as ``("large red circle", (2, 2, 14, 14))``."""
        if isinstance(boxes, Sequence) and boxes and isinstance(boxes[0], tuple) and boxes[0] \
                and isinstance(boxes[0][0], str):
            boxes = [boxes]  # a single layout
        if not isinstance(boxes, Sequence) or not boxes:
            raise TypeError("boxes must be a layout or a non-empty list of layouts, each a list of "
                            "(description, (x0, y0, x1, y1))")
        guided = [self.prompts.grounded(layout) for layout in boxes]
        return self._image_result(guided, n_samples, strategy, guidance_scale, decoding, seed)

    # ---- helpers ---------------------------------------------------------------------------------------------
    def _span_stops(self, next_sentinel: int) -> list[int]:
        v = self.vocabulary
        stops = [v.eos_id, v.break_id]
        return stops + [v.sentinel_id(next_sentinel)] if next_sentinel < NUM_SENTINELS else stops


def _fill(segments: list[Any], spans: list[str]) -> list[Any]:
    """Puts the spans back where the ``<mask>`` markers were (whitespace before a marker belongs to its span,
    as in :meth:`PromptBuilder.infill`)."""
    spans_left = iter(spans)
    out = []
    for seg in segments:
        if not isinstance(seg, str):
            out.append(seg)
            continue
        pieces = seg.split(MASK_TEXT)
        text = pieces[0] if len(pieces) == 1 else pieces[0].rstrip()
        for j, piece in enumerate(pieces[1:], start=1):
            text += next(spans_left) + (piece.rstrip() if j < len(pieces) - 1 else piece)
        out.append(text)
    return out
