"""Vocabulary id space and document layout: ranges, conversions, exact round trips, bad input."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cm3leon.tokenizer import NUM_SENTINELS, SPECIAL_TOKENS, DocumentCodec, TextTokenizer, Vocabulary

CORPUS = ["a large red circle in the top left", "a small blue square at the bottom",
          "Describe the given picture.", "Question: what shape is it? Answer: a circle."] * 10


@pytest.fixture(scope="module")
def text_tok() -> TextTokenizer:
    return TextTokenizer.train(CORPUS, vocab_size=320)


@pytest.fixture(scope="module")
def vocab(text_tok) -> Vocabulary:
    return Vocabulary(text_size=text_tok.vocab_size, image_codes=64)


@pytest.fixture(scope="module")
def codec(text_tok, vocab) -> DocumentCodec:
    return DocumentCodec(text_tok, vocab, image_shape=(4, 4))


# ---- vocabulary ----------------------------------------------------------------------------------------

def test_layout_is_contiguous_and_disjoint():
    v = Vocabulary(text_size=100, image_codes=50)
    assert SPECIAL_TOKENS[:5] == ("<pad>", "<eos>", "<break>", "<mask>", "<infill>")
    assert v.num_special == 5 + NUM_SENTINELS
    assert v.text_range == (v.num_special, v.num_special + 100)
    assert v.image_range == (v.text_range[1], v.text_range[1] + 50)
    assert len(v) == v.image_range[1] == v.size
    ids = {v.pad_id, v.eos_id, v.break_id, v.mask_id, v.infill_id} | {v.sentinel_id(i) for i in range(16)}
    assert ids == set(range(v.num_special))
    assert [v.special_name(v.special_id(t)) for t in SPECIAL_TOKENS] == list(SPECIAL_TOKENS)


def test_paper_sizes():
    v = Vocabulary(text_size=56_320, image_codes=8192)
    lo, hi = v.image_range
    assert hi - lo == 8192 and len(v) == v.num_special + 56_320 + 8192


def test_classification():
    v = Vocabulary(text_size=10, image_codes=5)
    kinds = [(v.is_special(i), v.is_text(i), v.is_image(i)) for i in range(len(v))]
    assert all(sum(k) == 1 for k in kinds)
    assert not any([v.is_special(len(v)), v.is_text(len(v)), v.is_image(len(v))])


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 1000), st.integers(1, 1000), st.data())
def test_conversions_round_trip(text_size, codes, data):
    v = Vocabulary(text_size=text_size, image_codes=codes)
    t = data.draw(st.lists(st.integers(0, text_size - 1), max_size=20))
    c = data.draw(st.lists(st.integers(0, codes - 1), max_size=20))
    assert v.global_to_text(v.text_to_global(t)) == t
    assert v.global_to_image(v.image_to_global(c)) == c
    assert all(v.is_text(i) for i in v.text_to_global(t))
    assert all(v.is_image(i) for i in v.image_to_global(c))
    tc = torch.tensor(c, dtype=torch.int64)
    assert torch.equal(v.global_to_image(v.image_to_global(tc)), tc)
    assert v.image_to_global(tuple(c)) == tuple(x + v.image_range[0] for x in c)


def test_conversion_errors_name_argument():
    v = Vocabulary(text_size=10, image_codes=5)
    with pytest.raises(ValueError, match="codes out of range"):
        v.image_to_global([0, 5])
    with pytest.raises(ValueError, match="codes out of range"):
        v.image_to_global(torch.tensor([-1]))
    with pytest.raises(ValueError, match="ids out of range"):
        v.global_to_image(v.text_range[0])
    with pytest.raises(ValueError, match="ids out of range"):
        v.global_to_text([v.image_range[0]])
    with pytest.raises(TypeError, match="codes"):
        v.image_to_global(torch.tensor([0.5]))
    with pytest.raises(TypeError, match="ids"):
        v.text_to_global("3")
    with pytest.raises(ValueError, match="text_size"):
        Vocabulary(text_size=0, image_codes=5)
    with pytest.raises(TypeError, match="image_codes"):
        Vocabulary(text_size=3, image_codes=2.0)
    with pytest.raises(ValueError, match="sentinel"):
        v.sentinel_id(16)
    with pytest.raises(KeyError, match="<nope>"):
        v.special_id("<nope>")


def test_save_load(tmp_path):
    v = Vocabulary(text_size=123, image_codes=45)
    v.save(tmp_path / "vocab.json")
    w = Vocabulary.load(tmp_path / "vocab.json")
    assert w == v and w.image_range == v.image_range
    (tmp_path / "bad.json").write_text('{"text_size": 1, "image_codes": 1, "special_tokens": ["<pad>"]}')
    with pytest.raises(ValueError, match="special tokens"):
        Vocabulary.load(tmp_path / "bad.json")


# ---- documents -----------------------------------------------------------------------------------------

def _grid(seed: int) -> torch.Tensor:
    return torch.randint(0, 64, (4, 4), generator=torch.Generator().manual_seed(seed))


def _same(a, b) -> bool:
    if isinstance(a, str) or isinstance(b, str):
        return a == b
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)


def test_caption_image_layout(codec, text_tok, vocab):
    grid = _grid(0)
    ids = codec.encode_caption_image("a red circle", grid)
    n_text = len(text_tok.encode("a red circle"))
    assert ids[n_text] == vocab.break_id
    assert ids[:n_text] == vocab.text_to_global(text_tok.encode("a red circle"))
    assert ids[n_text + 1:] == vocab.image_to_global(grid.reshape(-1).tolist())
    assert all(vocab.is_image(t) for t in ids[n_text + 1:]) and len(ids) == n_text + 1 + 16


def test_text_to_image_prompt(codec, vocab):
    grid = _grid(7)
    prompt = codec.text_to_image_prompt("a red circle")
    assert prompt[0] == vocab.eos_id and prompt[-1] == vocab.break_id
    # the prompt followed by the sampled image tokens is the caption-image document
    completed = prompt + vocab.image_to_global(grid.reshape(-1).tolist())
    assert completed[1:] == codec.encode_caption_image("a red circle", grid)
    caption, back = codec.decode_documents(completed)[0]
    assert caption == "a red circle" and torch.equal(back, grid)


def test_interleaved_round_trip(codec, vocab):
    doc = ["Edit first image following the instruction", _grid(1), "make it blue \u00e9\n", _grid(2), _grid(3),
           "  spaces  "]
    ids = codec.encode(doc)
    assert ids.count(vocab.break_id) == len(doc) - 1
    back = codec.decode(ids)
    assert len(back) == len(doc) and all(_same(a, b) for a, b in zip(doc, back))
    assert all(_same(a, b) for a, b in zip(doc, codec.decode(torch.tensor(ids))))


def test_documents_joined_by_eos(codec, vocab):
    docs = [["a small blue square", _grid(4)], [_grid(5)], ["just text <eos> with a fake special"]]
    ids = codec.encode_documents(docs)
    assert ids.count(vocab.eos_id) == 2
    back = codec.decode_documents(ids)
    assert len(back) == 3
    for d, b in zip(docs, back):
        assert len(d) == len(b) and all(_same(x, y) for x, y in zip(d, b))
    # a leading <eos> (the paper's prompt form) is accepted
    assert len(codec.decode_documents([vocab.eos_id] + ids + [vocab.eos_id])) == 3


@settings(max_examples=40, deadline=None)
@given(st.lists(st.one_of(st.text(min_size=1), st.integers(0, 10_000)), min_size=1, max_size=6))
def test_random_documents_round_trip(codec, doc_spec):
    doc = [s if isinstance(s, str) else _grid(s) for s in doc_spec]
    back = codec.decode(codec.encode(doc))
    assert len(back) == len(doc) and all(_same(a, b) for a, b in zip(doc, back))


def test_square_grid_inferred_without_shape(text_tok, vocab):
    codec = DocumentCodec(text_tok, vocab)
    grid = torch.randint(0, 64, (3, 3))
    assert torch.equal(codec.decode(codec.encode(["x", grid]))[1], grid)


def test_document_errors(codec, vocab, text_tok):
    with pytest.raises(ValueError, match="empty string"):
        codec.encode(["", _grid(0)])
    with pytest.raises(ValueError, match="non-empty list"):
        codec.encode([])
    with pytest.raises(ValueError, match=r"segments\[1\].*grid shape"):
        codec.encode(["x", torch.zeros(2, 2, dtype=torch.int64)])
    with pytest.raises(ValueError, match=r"segments\[0\]"):
        codec.encode([torch.zeros(4, 4)])
    with pytest.raises(ValueError, match="codes out of range"):
        codec.encode([torch.full((4, 4), 64)])
    with pytest.raises(TypeError, match=r"segments\[0\]"):
        codec.encode([3])
    text_ids = vocab.text_to_global(text_tok.encode("hello"))
    img_ids = vocab.image_to_global([0] * 16)
    with pytest.raises(ValueError, match="mixing text and image"):
        codec.decode(text_ids + img_ids)
    with pytest.raises(ValueError, match="image run of 15"):
        codec.decode(text_ids + [vocab.break_id] + img_ids[:15])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        codec.decode([len(vocab)])
    with pytest.raises(ValueError, match="<mask>"):
        codec.decode(text_ids + [vocab.mask_id])
    with pytest.raises(ValueError, match="empty segment"):
        codec.decode(text_ids + [vocab.break_id])
    with pytest.raises(ValueError, match="text_size"):
        DocumentCodec(text_tok, Vocabulary(text_size=text_tok.vocab_size + 1, image_codes=4))
    with pytest.raises(ValueError, match="image_shape"):
        DocumentCodec(text_tok, vocab, image_shape=(4, 0))
