"""The measurements behind the demo's recipe-fidelity table, each on held-out shapes scenes scored exactly.

Every function returns plain per-prompt values (lists of floats) so the report can give a mean with its
confidence interval; images worth looking at are returned beside them for the grids.
"""
from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from cm3leon.baselines import SDPA, hf_style_cfg_generate
from cm3leon.data import ShapesWorld, caption, images_tensor
from cm3leon.data.edits import make_edit
from cm3leon.data.metrics import caption_match, grounding_iou, prompt_alignment
from cm3leon.data.tasks import CAPTION_PREFIX, image_of
from cm3leon.data.vqa import make_question, normalize_answer
from cm3leon.model import KERNELS, AttentionBackend, CM3Leon
from cm3leon.objective import training_sequence
from cm3leon.pipeline import Pipeline
from cm3leon.retrieval import RetrievalDocument

HELD_OUT_START = 20_000_000  # scene indices far from every training and validation scene


def heldout(world: ShapesWorld, n: int):
    """``n`` held-out scenes and their uint8 images."""
    scenes = world.scenes(n, start=HELD_OUT_START)
    return scenes, images_tensor(scenes)


def alignments(images: torch.Tensor, scenes) -> list[float]:
    return [prompt_alignment(img, scene) for img, scene in zip(images, scenes)]


# ---- retrieval -------------------------------------------------------------------------------------------
@torch.inference_mode()
def query_loss(pipe: Pipeline, scenes, images: torch.Tensor, k: int) -> list[float]:
    """Per held-out document: the mean next-token loss (nats) of the plain ``caption <break> image`` query
    after ``k`` documents retrieved by its caption (the context itself is not scored)."""
    codec, vocab, model = pipe.codec, pipe.codec.vocabulary, pipe.model
    grids = pipe.image_tokenizer.encode(images)
    losses = []
    for scene, grid in zip(scenes, grids):
        text = caption(scene)
        query = codec.encode([text, grid])
        context = [d.token_ids for d in pipe.retriever.retrieve([RetrievalDocument(text, None)], k, by="text")[0]] \
            if k else []
        example = training_sequence(query, context, vocab, generator=torch.Generator(), transform_probability=0.0,
                                    max_seq_len=model.config.max_seq_len)
        tokens = example.tokens
        start = len(tokens) - len(query) - 1  # the query's first token; predictions of it onward count
        logits = model(tokens[None])[0, :-1].float()
        nll = F.cross_entropy(logits, tokens[1:], reduction="none")
        losses.append(float(nll[start - 1:].mean()))
    return losses


def text_to_image_alignment(pipe: Pipeline, scenes, *, retrieved: int = 0, guidance_scale: float = 3.0,
                            seed: int = 0) -> tuple[list[float], torch.Tensor]:
    """One top-p + CFG image per held-out caption; its prompt alignment, and the images."""
    result = pipe.text_to_image([caption(s) for s in scenes], n_samples=1, strategy="topp", rerank=False,
                                retrieved=retrieved, guidance_scale=guidance_scale, seed=seed)
    return alignments(result.best, scenes), result.best


# ---- decoding ----------------------------------------------------------------------------------------------
def sample_order(strategies: Sequence[str]) -> list[int]:
    """Sample indices with the two strategies of a ``mix`` interleaved, so every prefix is balanced."""
    topp = [i for i, s in enumerate(strategies) if s == "topp"]
    cdk = [i for i, s in enumerate(strategies) if s == "cdk"]
    order = [i for pair in zip(topp, cdk) for i in pair]
    return order + topp[len(cdk):] + cdk[len(topp):]


def decoding_values(pipe: Pipeline, scenes, strategy: str, samples: int, counts: Sequence[int], seed: int = 0
                    ) -> tuple[dict[str, dict[int, list[float]]], torch.Tensor, torch.Tensor]:
    """For ``strategy``: per prompt, the alignment of a random pick among the first n samples (its expected
    value, "no re-ranking") and of the sample the dual encoder scores highest ("re-ranked"), for each n.
    Also returns the images ``[P, S, 3, H, W]`` and their scores ``[P, S]``."""
    captions = [caption(s) for s in scenes]
    result = pipe.text_to_image(captions, n_samples=samples, strategy=strategy, rerank=False, seed=seed)
    p, s = result.images.shape[:2]
    flat = result.images.reshape(p * s, *result.images.shape[2:])
    scores = pipe.scorer.score(flat, [c for c in captions for _ in range(s)]).view(p, s)
    align = torch.tensor([alignments(result.images[i], [scenes[i]] * s) for i in range(p)])
    values: dict[str, dict[int, list[float]]] = {"random pick": {}, "re-ranked": {}}
    for n in counts:
        picked_random, picked_best = [], []
        for i in range(p):
            idx = torch.tensor(sample_order(result.strategies[i])[:n])
            picked_random.append(float(align[i, idx].mean()))
            picked_best.append(float(align[i, idx[scores[i, idx].argmax()]]))
        values["random pick"][n], values["re-ranked"][n] = picked_random, picked_best
    return values, result.images, scores


# ---- SFT tasks ------------------------------------------------------------------------------------------
def task_scores(pipe: Pipeline, world: ShapesWorld, n: int, *, tuned: bool, seed: int = 0) -> dict[str, list[float]]:
    """Captioning attribute match, VQA correctness (0/1), editing alignment and grounded IoU on ``n`` held-out
    scenes. ``tuned``: prompts carry the SFT task words (captioning's instruction)."""
    scenes, images = heldout(world, n)
    rng = np.random.default_rng(seed)
    captions = pipe.image_to_text(images, instruction=CAPTION_PREFIX if tuned else None, seed=seed)
    questions = [make_question(s, rng) for s in scenes]
    answers = pipe.answer(images, [q.question for q in questions], seed=seed)
    edits = [make_edit(s, rng) for s in scenes]
    edited = pipe.edit(torch.stack([image_of(e.before) for e in edits]), [e.instruction for e in edits], seed=seed)
    layouts = [[(o.describe(), o.box) for o in s.objects] for s in scenes]
    grounded = pipe.grounded(layouts, seed=seed)
    return {
        "captioning": [caption_match(t, s) for t, s in zip(captions, scenes)],
        "vqa": [float(normalize_answer(a) == normalize_answer(q.answer)) for a, q in zip(answers, questions)],
        "editing": [prompt_alignment(img, e.after) for img, e in zip(edited.best, edits)],
        "grounded": [grounding_iou(img, s) for img, s in zip(grounded.best, scenes)],
    }


# ---- cost --------------------------------------------------------------------------------------------------
def _copy(model: CM3Leon, backend: AttentionBackend) -> CM3Leon:
    """The same weights, unfused, on ``backend``."""
    twin = CM3Leon(model.config, attention_backend=backend)
    twin.load_state_dict(model.state_dict())
    return twin


def train_tokens_per_second(model: CM3Leon, batch, steps: int = 3) -> dict[str, float]:
    """Optimizer steps on one packed batch: our kernels vs the same model on PyTorch SDPA."""
    rates = {}
    for name, net in (("cm3leon", _copy(model, KERNELS)), ("torch-sdpa", _copy(model, SDPA))):
        opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
        times = []
        for _ in range(steps + 1):
            start = time.perf_counter()
            loss = net.loss(batch.tokens, batch.targets, batch.loss_weights, cu_seqlens=batch.cu_seqlens,
                            max_seqlen=batch.max_seqlen)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - start)
        rates[name] = batch.tokens.numel() / float(np.median(times[1:]))  # the first step warms up
    return rates


def generation_images_per_second(pipe: Pipeline, captions: Sequence[str], seed: int = 0) -> dict[str, float]:
    """CFG top-p text -> image for ``captions``: the pipeline vs the same weights on SDPA decoded by a Python
    loop with a Hugging Face-style logits-processor chain."""
    start = time.perf_counter()
    pipe.text_to_image(list(captions), n_samples=1, strategy="topp", rerank=False, seed=seed)
    ours = len(captions) / (time.perf_counter() - start)
    twin = _copy(pipe.model, SDPA).eval()
    guided = [pipe.prompts.text_to_image(c) for c in captions]
    grid = pipe.image_tokenizer.config.grid_size
    start = time.perf_counter()
    with torch.inference_mode():
        hf_style_cfg_generate(twin, [g.conditional for g in guided], [g.unconditional for g in guided],
                              pipe.codec.vocabulary.image_range, grid * grid)
    return {"cm3leon": ours, "torch-sdpa+hf-chain": len(captions) / (time.perf_counter() - start)}
