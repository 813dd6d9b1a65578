"""Byte-level BPE: exact round trips for any text, training, save/load, bad input."""
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cm3leon.tokenizer import TextTokenizer

CORPUS = [
    "a large red circle in the top left and a small blue square at the bottom",
    "a small green triangle in the center",
    "a large yellow square on the right, a small purple circle on the left and a large cyan triangle",
    "Edit first image following the instruction",
    "Question: what colour is the circle? Answer: red.",
] * 20


@pytest.fixture(scope="module")
def tok() -> TextTokenizer:
    return TextTokenizer.train(CORPUS, vocab_size=400)


def test_training_learns_merges(tok):
    assert 256 < tok.vocab_size <= 400
    # frequent words compress: far fewer tokens than bytes
    text = CORPUS[0]
    assert len(tok.encode(text)) < len(text.encode()) / 2


@pytest.mark.parametrize("text", [
    "", " ", "  leading and trailing  ", "tabs\tand\nnewlines\r\n", "unicode: caf\u00e9 \u00fc\u00df \u4e2d\u6587 \U0001f98e",
    "<eos> <break> <mask:3> look like specials but are text", "\x00\x01 control bytes", "a" * 1000,
])
def test_round_trip_exact(tok, text):
    assert tok.decode(tok.encode(text)) == text


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_round_trip_any_text(tok, text):
    ids = tok.encode(text)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text


def test_encode_batch_matches_encode(tok):
    texts = CORPUS[:5] + ["", "\u00e9\u00e9"]
    assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]


def test_save_load_same_ids(tok, tmp_path):
    path = tmp_path / "bpe.json"
    tok.save(path)
    loaded = TextTokenizer.load(path)
    assert loaded.vocab_size == tok.vocab_size
    for text in CORPUS[:5] + ["caf\u00e9 \U0001f98e"]:
        assert loaded.encode(text) == tok.encode(text)


def test_vocab_size_caps_vocabulary():
    small = TextTokenizer.train(CORPUS, vocab_size=260)
    assert small.vocab_size == 260


def test_bad_input(tok):
    with pytest.raises(ValueError, match="vocab_size"):
        TextTokenizer.train(CORPUS, vocab_size=100)
    with pytest.raises(TypeError, match="corpus"):
        TextTokenizer.train("a single string", vocab_size=300)
    with pytest.raises(TypeError, match=r"corpus\[1\]"):
        TextTokenizer.train(["ok", 3], vocab_size=300)
    with pytest.raises(TypeError, match="text"):
        tok.encode(b"bytes")
    with pytest.raises(ValueError, match="ids"):
        tok.decode([tok.vocab_size])
    with pytest.raises(ValueError, match="ids"):
        tok.decode([-1])
    with pytest.raises(ValueError, match="text must be valid Unicode"):  # a lone surrogate has no UTF-8 form
        tok.encode("ab\ud800")
    with pytest.raises(ValueError, match="texts must be valid Unicode"):
        tok.encode_batch(["ok", "\udfff"])
    with pytest.raises(TypeError, match="texts"):  # not a batch of one-character texts
        tok.encode_batch("abc")
    with pytest.raises(ValueError, match="min_frequency"):  # `tokenizers` raised a bare OverflowError
        TextTokenizer.train(CORPUS, 300, -1)
    with pytest.raises(ValueError, match="min_frequency"):
        TextTokenizer.train(CORPUS, 300, min_frequency=1.5)


def test_shapes_corpus_round_trips():
    from cm3leon.tokenizer.train_text import shapes_corpus

    corpus = shapes_corpus(60)
    assert len(corpus) >= 60 and all(isinstance(t, str) and t for t in corpus)
    tok = TextTokenizer.train(corpus, vocab_size=600)
    assert all(tok.decode(tok.encode(t)) == t for t in corpus)
