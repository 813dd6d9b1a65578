"""The CM3 objective: layout, exact inverse, span placement and count distribution, loss weights, training
sequences (order, truncation, dropping), and bad input."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cm3leon.data import ShapesWorld, caption
from cm3leon.objective import CM3Example, cm3_restore, cm3_transform, training_sequence
from cm3leon.tokenizer import NUM_SENTINELS, DocumentCodec, TextTokenizer, Vocabulary

VOCAB = Vocabulary(text_size=50, image_codes=64)
TEXT, IMAGE = VOCAB.text_range, VOCAB.image_range
SENTINELS = range(VOCAB.sentinel_id(0), VOCAB.sentinel_id(0) + NUM_SENTINELS)
# chi2.ppf(1 - 1e-3, dof): the chi-square tests below false-alarm once in 1000 seeds.
CHI2_999 = {3: 16.266, 4: 18.467}


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _doc(text: int, image: int, seed: int = 0) -> list[int]:
    """A synthetic caption-image document ``text <break> image`` with random ids."""
    g = _gen(seed)
    return (torch.randint(*TEXT, (text,), generator=g).tolist() + [VOCAB.break_id]
            + torch.randint(*IMAGE, (image,), generator=g).tolist())


# Documents: text / image segments joined by <break>; a segment may hold a plain <mask> or <pad> (specials
# that are not the objective's own, which must stay in place).
_segment = st.one_of(
    st.lists(st.one_of(st.integers(TEXT[0], TEXT[1] - 1), st.just(VOCAB.mask_id)), min_size=1, max_size=12),
    st.lists(st.integers(IMAGE[0], IMAGE[1] - 1), min_size=1, max_size=24),
    st.just([VOCAB.pad_id]),
)
documents = st.lists(_segment, min_size=1, max_size=5).map(
    lambda segs: [t for i, s in enumerate(segs) for t in ([VOCAB.break_id] if i else []) + s])


def _split_transformed(tokens: list[int]) -> tuple[list[int], list[list[int]]]:
    """(body, spans) of a transformed document, read independently of cm3_restore."""
    if VOCAB.infill_id not in tokens:
        return tokens, []
    p = tokens.index(VOCAB.infill_id)
    spans: list[list[int]] = []
    for t in tokens[p + 1:]:
        if t in SENTINELS:
            spans.append([])
        else:
            spans[-1].append(t)
    return tokens[:p], spans


# ---- cm3_transform / cm3_restore ------------------------------------------------------------------------

@settings(max_examples=150, deadline=None)
@given(documents, st.integers(0, 2**32), st.floats(0, 20), st.integers(1, NUM_SENTINELS))
def test_round_trip_layout_and_weights(doc, seed, rate, max_spans):
    ex = cm3_transform(doc, VOCAB, generator=_gen(seed), poisson_rate=rate, max_spans=max_spans)
    tokens = ex.tokens.tolist()
    assert ex.tokens.dtype == torch.int64 and ex.loss_weights.dtype == torch.float32
    assert cm3_restore(ex.tokens, VOCAB) == doc
    body, spans = _split_transformed(tokens)
    n = ex.n_spans
    assert len(spans) == n and len(tokens) == len(doc) + (2 * n + 1 if n else 0)
    maskable = sum(t >= VOCAB.num_special for t in doc)
    assert (n == 0) == (maskable == 0)
    assert n <= max_spans
    if n == 0:
        assert tokens == doc
    # body sentinels are <mask:0>..<mask:n-1> in order, the tail repeats them in order
    assert [t for t in body if t in SENTINELS] == list(SENTINELS[:n])
    assert [t for t in tokens[len(body) + 1:] if t in SENTINELS] == list(SENTINELS[:n])
    # a span is non-empty, holds no special (so never crosses <break>) and is one modality
    for span in spans:
        assert span and all(t >= VOCAB.num_special for t in span)
        assert all(VOCAB.is_text(t) for t in span) or all(VOCAB.is_image(t) for t in span)
    # weight 0 exactly where the predicted token is a sentinel
    assert ex.loss_weights.tolist() == [0.0 if t in SENTINELS else 1.0 for t in tokens]


def test_layout_example():
    """``A <mask:0> B <mask:1> C <infill> <mask:0> span0 <mask:1> span1`` on a document that can only hold
    two spans of one token each: ``x y z`` -> spans ``x`` and ``z``."""
    doc = [30, 31, 32]
    ex = cm3_transform(doc, VOCAB, generator=_gen(0), poisson_rate=50.0)
    s0, s1 = VOCAB.sentinel_id(0), VOCAB.sentinel_id(1)
    assert ex.n_spans == 2
    assert ex.tokens.tolist() == [s0, 31, s1, VOCAB.infill_id, s0, 30, s1, 32]
    assert ex.loss_weights.tolist() == [0, 1, 0, 1, 0, 1, 0, 1]


def test_as_many_spans_as_fit_and_unmaskable_documents():
    g = _gen(1)
    # one token holds one span; <break> and <pad> hold none
    assert cm3_transform([40], VOCAB, generator=g, poisson_rate=30.0).n_spans == 1
    assert cm3_transform([40, VOCAB.break_id, 41], VOCAB, generator=g, poisson_rate=30.0).n_spans == 2
    for doc in ([VOCAB.break_id], [VOCAB.pad_id, VOCAB.break_id, VOCAB.mask_id]):
        ex = cm3_transform(doc, VOCAB, generator=g)
        assert ex.n_spans == 0 and ex.tokens.tolist() == doc and ex.loss_weights.tolist() == [1.0] * len(doc)


def test_accepts_tensors_and_does_not_alias():
    doc = torch.tensor([VOCAB.break_id, VOCAB.pad_id], dtype=torch.int32)
    ex = cm3_transform(doc, VOCAB, generator=_gen(0))
    doc[0] = 0
    assert ex.tokens.tolist() == [VOCAB.break_id, VOCAB.pad_id]
    a = cm3_transform(torch.tensor(_doc(5, 9)), VOCAB, generator=_gen(3))
    b = cm3_transform(_doc(5, 9), VOCAB, generator=_gen(3))
    assert torch.equal(a.tokens, b.tokens) and a.n_spans == b.n_spans


def _chi2(counts: list[int], probs: list[float]) -> float:
    total = sum(counts)
    return sum((c - total * p) ** 2 / (total * p) for c, p in zip(counts, probs))


def test_span_count_matches_clamped_poisson():
    """n ~ Clamp(Poisson(1), 1, 16) on documents that hold 16 spans: bins 1, 2, 3, 4, >=5 (4 degrees of
    freedom), 4000 draws, false-alarm rate 1e-3 (fixed seed, so the outcome is deterministic)."""
    doc = _doc(40, 64)
    g = _gen(2024)
    counts = [0] * 5
    for _ in range(4000):
        n = cm3_transform(doc, VOCAB, generator=g).n_spans
        counts[min(n, 5) - 1] += 1
    pois = [math.exp(-1) / math.factorial(k) for k in range(5)]
    probs = [pois[0] + pois[1], pois[2], pois[3], pois[4]]
    probs.append(1 - sum(probs))
    assert _chi2(counts, probs) < CHI2_999[4], counts


def test_max_spans_clamps():
    doc = _doc(40, 64)
    g = _gen(5)
    ns = {cm3_transform(doc, VOCAB, generator=g, poisson_rate=8.0, max_spans=3).n_spans for _ in range(200)}
    assert ns == {3} | (ns & {1, 2}) and 3 in ns
    assert {cm3_transform(doc, VOCAB, generator=g, poisson_rate=0.0).n_spans for _ in range(20)} == {1}


def test_span_sets_are_uniform():
    """Given n, every valid set of spans is equally likely. ``a <break> b c`` with one span (rate 0):
    ``[a]``, ``[b]``, ``[b c]``, ``[c]`` at 1/4 each; chi-square, 3 dof, false-alarm rate 1e-3."""
    a, b, c = 30, 31, 32
    doc = [a, VOCAB.break_id, b, c]
    g = _gen(7)
    seen = {(a,): 0, (b,): 0, (b, c): 0, (c,): 0}
    for _ in range(2000):
        ex = cm3_transform(doc, VOCAB, generator=g, poisson_rate=0.0)
        seen[tuple(_split_transformed(ex.tokens.tolist())[1][0])] += 1
    assert _chi2(list(seen.values()), [0.25] * 4) < CHI2_999[3], seen


def test_real_shapes_document_round_trip():
    world = ShapesWorld(seed=3)
    captions = [caption(world.scene(i)) for i in range(40)]
    text_tok = TextTokenizer.train(captions, vocab_size=300)
    vocab = Vocabulary(text_size=text_tok.vocab_size, image_codes=64)
    codec = DocumentCodec(text_tok, vocab, image_shape=(8, 8))
    g = _gen(11)
    for i, cap in enumerate(captions[:10]):
        grid = torch.randint(0, 64, (8, 8), generator=g)
        ids = codec.encode_caption_image(cap, grid)
        ex = training_sequence(ids, [], vocab, generator=g, max_seq_len=256)
        body = ex.tokens[1:-1]
        back_caption, back_grid = codec.decode(cm3_restore(body, vocab))
        assert back_caption == cap and torch.equal(back_grid, grid)


# ---- training_sequence ----------------------------------------------------------------------------------

def _documents_of(ex: CM3Example) -> list[list[int]]:
    tokens = ex.tokens.tolist()
    assert tokens[0] == VOCAB.eos_id and tokens[-1] == VOCAB.eos_id
    docs, cur = [], []
    for t in tokens[1:]:
        if t == VOCAB.eos_id:
            docs.append(cm3_restore(cur, VOCAB))
            cur = []
        else:
            cur.append(t)
    return docs


@settings(max_examples=100, deadline=None)
@given(documents, st.lists(documents, max_size=4), st.integers(3, 120), st.integers(0, 2**32))
def test_training_sequence_layout_budget_and_weights(query, retrieved, max_seq_len, seed):
    ex = training_sequence(query, retrieved, VOCAB, generator=_gen(seed), max_seq_len=max_seq_len)
    tokens = ex.tokens.tolist()
    assert len(tokens) <= max_seq_len
    docs = _documents_of(ex)
    *kept, q = docs
    assert kept == retrieved[: len(kept)]                   # retrieved docs: a prefix of the list, in order
    if len(query) + 2 <= max_seq_len - (2 * NUM_SENTINELS + 1):
        assert q == query                                    # fits whatever the spans: never truncated
    else:                                                    # truncated: a head of the query
        assert q == query[: len(q)] and len(q) >= 1
    if q != query:
        assert not kept and q[-1] != VOCAB.break_id          # retrieved docs are dropped before truncating
    if len(query) + 2 * NUM_SENTINELS + 3 + sum(len(r) + 2 * NUM_SENTINELS + 2 for r in retrieved) \
            <= max_seq_len:
        assert kept == retrieved                             # everything fits: nothing dropped
    expected = [0.0] + [0.0 if t in SENTINELS else 1.0 for t in tokens[1:]]
    assert ex.loss_weights.tolist() == expected
    again = training_sequence(query, retrieved, VOCAB, generator=_gen(seed), max_seq_len=max_seq_len)
    assert torch.equal(again.tokens, ex.tokens) and again.n_spans == ex.n_spans


def test_training_sequence_counts_spans_of_all_documents():
    docs = [_doc(6, 10, s) for s in range(3)]
    ex = training_sequence(docs[0], docs[1:], VOCAB, generator=_gen(4), max_seq_len=1000)
    assert _documents_of(ex) == docs[1:] + docs[:1]
    assert ex.n_spans == sum(t in SENTINELS for t in ex.tokens.tolist()) // 2 >= 3


def test_truncated_query_still_ends_with_its_spans():
    query = _doc(10, 300)
    for seed in range(20):
        ex = training_sequence(query, [_doc(3, 3)], VOCAB, generator=_gen(seed), max_seq_len=64)
        assert len(ex.tokens) <= 64
        (q,) = _documents_of(ex)
        assert q == query[: len(q)]
        tokens = ex.tokens.tolist()
        assert tokens[-1] == VOCAB.eos_id and VOCAB.infill_id in tokens


# ---- bad input ------------------------------------------------------------------------------------------

def test_bad_input_names_the_argument():
    g = _gen(0)
    doc = _doc(3, 4)
    with pytest.raises(ValueError, match="ids"):
        cm3_transform([len(VOCAB)], VOCAB, generator=g)
    with pytest.raises(ValueError, match="ids"):
        cm3_transform([-1, 30], VOCAB, generator=g)
    with pytest.raises(ValueError, match="ids"):
        cm3_transform([], VOCAB, generator=g)
    with pytest.raises(TypeError, match="ids"):
        cm3_transform([1.5, 30.0], VOCAB, generator=g)
    with pytest.raises(TypeError, match="ids"):
        cm3_transform(torch.ones(3), VOCAB, generator=g)
    with pytest.raises(ValueError, match="ids"):
        cm3_transform(torch.ones(2, 2, dtype=torch.long), VOCAB, generator=g)
    for reserved in (VOCAB.eos_id, VOCAB.infill_id, VOCAB.sentinel_id(3)):
        with pytest.raises(ValueError, match="ids"):
            cm3_transform([30, reserved], VOCAB, generator=g)
    with pytest.raises(ValueError, match="poisson_rate"):
        cm3_transform(doc, VOCAB, generator=g, poisson_rate=-0.5)
    with pytest.raises(ValueError, match="poisson_rate"):
        cm3_transform(doc, VOCAB, generator=g, poisson_rate=float("nan"))
    with pytest.raises(TypeError, match="poisson_rate"):
        cm3_transform(doc, VOCAB, generator=g, poisson_rate="1")
    for bad in (0, NUM_SENTINELS + 1):
        with pytest.raises(ValueError, match="max_spans"):
            cm3_transform(doc, VOCAB, generator=g, max_spans=bad)
    with pytest.raises(TypeError, match="max_spans"):
        cm3_transform(doc, VOCAB, generator=g, max_spans=2.0)
    with pytest.raises(TypeError, match="generator"):
        cm3_transform(doc, VOCAB, generator=0)
    with pytest.raises(TypeError, match="vocabulary"):
        cm3_transform(doc, None, generator=g)
    for bad in (2, 1, 0, -5):
        with pytest.raises(ValueError, match="max_seq_len"):
            training_sequence(doc, [], VOCAB, generator=g, max_seq_len=bad)
    with pytest.raises(TypeError, match="max_seq_len"):
        training_sequence(doc, [], VOCAB, generator=g, max_seq_len=64.0)
    with pytest.raises(ValueError, match="query_doc"):
        training_sequence([], [], VOCAB, generator=g, max_seq_len=64)
    with pytest.raises(ValueError, match=r"retrieved_docs\[1\]"):
        training_sequence(doc, [doc, [999]], VOCAB, generator=g, max_seq_len=64)
    with pytest.raises(TypeError, match="retrieved_docs"):
        training_sequence(doc, torch.tensor(doc), VOCAB, generator=g, max_seq_len=64)


def test_restore_rejects_malformed_sequences():
    s0, s1, inf = VOCAB.sentinel_id(0), VOCAB.sentinel_id(1), VOCAB.infill_id
    bad = {
        "empty": [],
        "sentinel without <infill>": [30, s0, 31],
        "<infill> without sentinels": [30, inf, 31],
        "two <infill>": [s0, 30, inf, s0, 31, inf],
        "body sentinels out of order": [s1, 30, s0, inf, s0, 31, s1, 32],
        "tail spans out of order": [s0, 30, s1, inf, s1, 31, s0, 32],
        "sentinel with no span": [s0, 30, s1, inf, s0, 31, s1],
        "missing span": [s0, 30, s1, inf, s0, 31],
        "tail does not start with a sentinel": [s0, 30, inf, 31, s0, 32],
        "span holding <break>": [s0, 30, inf, s0, 31, VOCAB.break_id, 32],
        "<eos> inside": [s0, 30, inf, s0, 31, VOCAB.eos_id],
        "outside the vocabulary": [s0, 30, inf, s0, len(VOCAB)],
    }
    for why, tokens in bad.items():
        with pytest.raises(ValueError, match="tokens"):
            cm3_restore(tokens, VOCAB)
            pytest.fail(why)
    with pytest.raises(TypeError, match="tokens"):
        cm3_restore(torch.zeros(3), VOCAB)


def test_transform_probability_keeps_that_share_of_documents_plain():
    vocab = Vocabulary(text_size=50, image_codes=64)
    doc = vocab.text_to_global(list(range(12))) + [vocab.break_id] + vocab.image_to_global(list(range(16)))
    gen = torch.Generator().manual_seed(3)
    plain = sum(training_sequence(doc, [], vocab, generator=gen, max_seq_len=64,
                                  transform_probability=0.25).n_spans == 0 for _ in range(2000))
    assert abs(plain / 2000 - 0.75) < 0.04   # binomial std 0.0097: a 4-sigma band
    untouched = training_sequence(doc, [], vocab, generator=gen, max_seq_len=64, transform_probability=0.0)
    assert untouched.tokens.tolist() == [vocab.eos_id, *doc, vocab.eos_id] and untouched.n_spans == 0
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match="transform_probability"):
            training_sequence(doc, [], vocab, generator=gen, max_seq_len=64, transform_probability=bad)
    with pytest.raises(TypeError, match="transform_probability"):
        training_sequence(doc, [], vocab, generator=gen, max_seq_len=64, transform_probability=True)
