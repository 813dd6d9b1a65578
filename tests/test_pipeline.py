"""Every generation task end to end on a tiny random model: shapes, ranges, determinism, batch invariance,
re-ranking, retrieval-augmented prompts and bad input."""
from __future__ import annotations

import pytest
import torch
from pipeline_fixtures import WORLD, RedScorer, parts, pipeline, retrieval

import cm3leon.pipeline.core as core
from cm3leon.data import render_edges, segmentation_mask, edge_map
from cm3leon.pipeline import ImageDecoding, rerank
from cm3leon.retrieval import RetrievalDocument

S = 16  # image side of the tiny image tokenizer
G = 4   # its token grid side


@pytest.fixture(scope="module")
def pipe():
    return pipeline(scorer=RedScorer())


def _check_images(result, prompts, samples):
    assert result.images.shape == (prompts, samples, 3, S, S) and result.images.dtype == torch.uint8
    assert result.tokens.shape == (prompts, samples, G, G) and result.tokens.dtype == torch.int64
    assert 0 <= int(result.tokens.min()) and int(result.tokens.max()) < 64
    assert len(result.strategies) == prompts and all(len(s) == samples for s in result.strategies)


def test_text_to_image_mix_is_reranked_deterministic_and_batch_invariant(pipe):
    captions = ["a large red circle in the center", "a small blue square at the top left"]
    result = pipe.text_to_image(captions, n_samples=4, strategy="mix", seed=7)
    _check_images(result, 2, 4)
    assert sorted(result.strategies[0]) == ["cdk", "cdk", "topp", "topp"]
    # re-ranked: best first, scores are the scorer's on the returned images
    assert torch.equal(result.scores, result.scores.sort(dim=1, descending=True).values)
    torch.testing.assert_close(result.scores, RedScorer().score(result.images.flatten(0, 1), ["x"] * 8).view(2, 4))
    again = pipe.text_to_image(captions, n_samples=4, strategy="mix", seed=7)
    assert torch.equal(again.tokens, result.tokens)
    alone = pipe.text_to_image(captions[1:], n_samples=4, strategy="mix", seed=7)
    assert torch.equal(alone.tokens[0], result.tokens[1])
    other = pipe.text_to_image(captions, n_samples=4, strategy="mix", seed=8)
    assert not torch.equal(other.tokens, result.tokens)


@pytest.mark.parametrize("strategy", ["topp", "cdk"])
def test_text_to_image_single_strategy_without_rerank(pipe, strategy):
    result = pipe.text_to_image("a red circle", n_samples=2, strategy=strategy, rerank=False, seed=1,
                                decoding=ImageDecoding(top_p=0.8, cd_k=4))
    _check_images(result, 1, 2)
    assert result.scores is None and result.strategies == [[strategy] * 2]
    assert torch.equal(result.best, result.images[:, 0])
    # the images are the image tokenizer's decoding of the tokens
    _, _, images = parts()
    assert torch.equal(result.images[0], images.decode(result.tokens[0], as_uint8=True))


def test_rerank_returns_the_argmax_first():
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.9], [3.0, -1.0, 2.0, 0.0]])
    order = rerank(scores)
    assert order[:, 0].tolist() == scores.argmax(dim=1).tolist()
    assert order.tolist() == [[1, 3, 2, 0], [0, 2, 3, 1]]
    with pytest.raises(ValueError, match="finite"):
        rerank(torch.tensor([[float("nan"), 1.0]]))


def test_retrieved_documents_are_prepended_and_the_dual_encoder_reranks(monkeypatch):
    retriever, scorer = retrieval()
    seen = []
    real = core.generate
    monkeypatch.setattr(core, "generate", lambda model, prompts, **kw: seen.append(prompts) or real(model, prompts, **kw))
    pipe = pipeline(retriever=retriever, scorer=scorer)
    result = pipe.text_to_image("a large red circle", n_samples=2, retrieved=2, seed=1)
    eos = pipe.vocabulary.eos_id
    docs = retriever.retrieve([RetrievalDocument("a large red circle", None)], 2, by="text")[0]
    want = [eos, *docs[0].token_ids, eos, *docs[1].token_ids, eos]
    assert all(prompt[: len(want)] == want for prompt in seen[0])
    torch.testing.assert_close(result.scores[0], scorer.score(result.images[0], ["a large red circle"] * 2))
    assert result.scores[0, 0] >= result.scores[0, 1]
    image = WORLD.images(1)
    pipe.image_to_text(image, retrieved=1, max_new_tokens=2)
    doc = retriever.retrieve([RetrievalDocument(None, image[0])], 1, by="image")[0][0]
    assert seen[1][0][: len(doc.token_ids) + 2] == [eos, *doc.token_ids, eos]
    assert len(pipe.answer(image, ["what colour is it?"], retrieved=1, max_new_tokens=2)) == 1


def test_caption_answer_and_infill_generate_text(pipe):
    images = WORLD.images(2)
    captions = pipe.image_to_text(images, max_new_tokens=6)
    assert len(captions) == 2 and all(isinstance(c, str) for c in captions)
    assert pipe.image_to_text(images[1], max_new_tokens=6) == captions[1:]  # batch invariance
    sampled = pipe.image_to_text(images, max_new_tokens=6, temperature=1.0, seed=3)
    assert sampled == pipe.image_to_text(images, max_new_tokens=6, temperature=1.0, seed=3)
    answers = pipe.answer(images, ["what colour is it?", "how many shapes?"], max_new_tokens=4)
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)
    filled = pipe.infill(["a large <mask> in the <mask>", images[0]], max_new_tokens=3)
    assert len(filled) == 1 and len(filled[0].spans) == 2
    assert filled[0].segments[0] == f"a large{filled[0].spans[0]} in the{filled[0].spans[1]}"
    assert torch.equal(filled[0].segments[1], images[0])


def test_text_spans_stop_at_their_stop_tokens(pipe, monkeypatch):
    """Spans are drawn from text ids plus the stop tokens only, and the stop tokens end them."""
    seen = {}
    real = core.generate
    monkeypatch.setattr(core, "generate", lambda *a, **kw: seen.update(kw) or real(*a, **kw))
    pipe.image_to_text(WORLD.images(1), max_new_tokens=3)
    v = pipe.vocabulary
    assert sorted(seen["stop_tokens"]) == sorted([v.eos_id, v.break_id, v.sentinel_id(1)])
    allowed = seen["allowed_mask"].nonzero().flatten().tolist()
    assert allowed == sorted(seen["stop_tokens"]) + list(range(*v.text_range))


def test_edit_structure_and_grounded(pipe, monkeypatch):
    seen = {}
    real = core.generate
    monkeypatch.setattr(core, "generate", lambda *a, **kw: seen.update(kw) or real(*a, **kw))
    images = WORLD.images(2)
    edited = pipe.edit(images, ["make it red", "move it left"], n_samples=2, seed=4)
    _check_images(edited, 2, 2)
    assert seen["image_conditional_prompts"] is not None
    assert {o.guidance_scale for o in seen["options"]} == {(1.5, 7.5)}
    assert torch.equal(pipe.edit(images[1], "move it left", n_samples=2, seed=4).tokens[0], edited.tokens[1])
    conditions = torch.stack([render_edges(edge_map(segmentation_mask(s))) for s in WORLD.scenes(2)])
    structured = pipe.structure_to_image(conditions, "edges", ["a red circle", "a blue square"])
    _check_images(structured, 2, 1)
    assert seen["image_conditional_prompts"] is None and seen["options"][0].guidance_scale == 3.0
    grounded = pipe.grounded([("large red circle", (2, 2, 10, 10))], n_samples=3, strategy="mix")
    _check_images(grounded, 1, 3)
    assert grounded.strategies == [["topp", "topp", "cdk"]]


def test_compiled_decode_step_gives_the_same_images():
    from cm3leon.generate import compile_decode_step

    model, _, _ = parts()
    eager = pipeline().text_to_image("a red circle", n_samples=2, rerank=False, seed=2)
    compiled = pipeline(decode_step=compile_decode_step(model, backend="aot_eager"))
    assert torch.equal(compiled.text_to_image("a red circle", n_samples=2, rerank=False, seed=2).tokens,
                       eager.tokens)


@pytest.mark.parametrize("call,error,match", [
    (lambda p: p.text_to_image("a"), ValueError, "rerank=True needs a scorer"),
    (lambda p: p.text_to_image("a", strategy="beam", rerank=False), ValueError, "strategy must be one of"),
    (lambda p: p.text_to_image("a", n_samples=0, rerank=False), ValueError, "n_samples"),
    (lambda p: p.text_to_image("a", retrieved=1, rerank=False), ValueError, "needs a retriever"),
    (lambda p: p.text_to_image(["a", 3], rerank=False), TypeError, "captions must be"),
    (lambda p: p.text_to_image("a", rerank=False, seed=[1, 2]), ValueError, "seed must be"),
    (lambda p: p.text_to_image("a " * 200, rerank=False), ValueError, "exceeds the model's max_seq_len"),
    (lambda p: p.image_to_text(torch.zeros(1, 3, 8, 8, dtype=torch.uint8)), ValueError, r"images must be uint8 RGB"),
    (lambda p: p.image_to_text(torch.zeros(1, 4, S, S, dtype=torch.uint8)), ValueError, r"\[N, 3, 16, 16\]"),
    (lambda p: p.image_to_text(torch.zeros(1, 3, S, S)), ValueError, "uint8"),
    (lambda p: p.answer(WORLD.images(2), ["q"]), ValueError, "one question per image"),
    (lambda p: p.edit(WORLD.images(1), ["a", "b"]), ValueError, "one per image"),
    (lambda p: p.edit(WORLD.images(1), "a", guidance_scale=3.0), TypeError, "guidance_scale must be a pair"),
    (lambda p: p.grounded([("red circle", (9, 2, 3, 14))]), ValueError, r"box must have 0 <= x0 < x1"),
    (lambda p: p.grounded([]), TypeError, "boxes must be"),
    (lambda p: p.infill("a <mask>"), TypeError, "documents must be"),
])
def test_bad_input_raises(call, error, match):
    with pytest.raises(error, match=match):
        call(pipeline())


def test_pipeline_checks_its_parts():
    model, codec, images = parts()
    from cm3leon.pipeline import Pipeline
    from cm3leon.tokenizer import ImageTokenizer, ImageTokenizerConfig

    with pytest.raises(ValueError, match="codes"):
        Pipeline(model, codec, ImageTokenizer(ImageTokenizerConfig.preset("tiny", codebook_size=32)))
    with pytest.raises(TypeError, match="model must be"):
        Pipeline(None, codec, images)
    with pytest.raises(TypeError, match="scorer must have"):
        Pipeline(model, codec, images, scorer=object())
