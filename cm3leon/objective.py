"""The CM3 causal-masked objective as CM3Leon uses it, and retrieval-augmented training sequences.

One document (global ids, no surrounding ``<eos>``) with spans ``span0, span1`` taken out becomes::

    A <mask:0> B <mask:1> C <infill> <mask:0> span0 <mask:1> span1

(no ``<infill>`` and nothing moved when no span is taken). A training sequence puts retrieved documents
before the query, every document preceded by ``<eos>``, and ends with ``<eos>``::

    <eos> T(r1) <eos> T(r2) <eos> T(query) <eos>

Spans stay inside one maximal run of non-special tokens, so they never cross ``<break>`` (a span holds text
or image tokens, never both) and never cover a special token. The number of spans is
``Clamp(Poisson(poisson_rate), 1, max_spans)``, reduced to what the document can hold; given the number,
every set of non-overlapping, non-adjacent, non-empty spans is equally likely. The loss ignores predictions
of sentinels. The layouts, inference prompts and truncation rules are documented in docs/objective.md.

The work runs on small numpy arrays with a handful of torch random draws per document: it has to keep up
with training, so there are no per-token Python loops.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from cm3leon.tokenizer.vocabulary import NUM_SENTINELS, SPECIAL_TOKENS, Vocabulary
from cm3leon_kernels._checks import as_int

__all__ = ["CM3Example", "cm3_restore", "cm3_transform", "training_sequence"]

IdsLike = Sequence[int] | torch.Tensor | np.ndarray

# Special ids are positions in SPECIAL_TOKENS, the same in every Vocabulary; plain constants keep the
# per-document work free of attribute lookups.
_SENTINEL0 = SPECIAL_TOKENS.index("<mask:0>")
_INFILL = SPECIAL_TOKENS.index("<infill>")
_RESERVED = np.array([t in ("<eos>", "<infill>") or t.startswith("<mask:") for t in SPECIAL_TOKENS])


@dataclass(frozen=True)
class CM3Example:
    """A transformed document or training sequence.

    Attributes:
        tokens: int64 ``[L]`` global ids.
        loss_weights: float32 ``[L]``; ``loss_weights[i]`` weighs predicting ``tokens[i]`` from
            ``tokens[:i]``: 0 where ``tokens[i]`` is a sentinel ``<mask:j>`` (and at position 0 of a training
            sequence, which nothing predicts), 1 elsewhere.
        n_spans: number of spans moved to the end (summed over the documents of a training sequence).
    """

    tokens: torch.Tensor
    loss_weights: torch.Tensor
    n_spans: int


# ---- argument checks -----------------------------------------------------------------------------------
def _check_vocabulary(vocabulary: object) -> Vocabulary:
    if not isinstance(vocabulary, Vocabulary):
        raise TypeError(f"vocabulary must be a cm3leon.tokenizer.Vocabulary, got {type(vocabulary).__name__}")
    return vocabulary


def _check_generator(generator: object) -> torch.Generator:
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    if generator.device.type != "cpu":
        raise ValueError(f"generator must be a CPU generator, got one on {generator.device}")
    return generator


def check_probability(name: str, value: object) -> float:
    """A probability in [0, 1] (int or float, not bool)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value}")
    return float(value)


def check_objective_args(poisson_rate: object, max_spans: object) -> tuple[float, int]:
    """Validates the span-count parameters shared by every entry point; returns them as (float, int)."""
    if isinstance(poisson_rate, bool) or not isinstance(poisson_rate, (int, float)):
        raise TypeError(f"poisson_rate must be a float, got {type(poisson_rate).__name__}")
    if not math.isfinite(poisson_rate) or poisson_rate < 0:
        raise ValueError(f"poisson_rate must be finite and >= 0, got {poisson_rate}")
    max_spans = as_int("max_spans", max_spans)
    if not 1 <= max_spans <= NUM_SENTINELS:
        raise ValueError(f"max_spans must be in [1, {NUM_SENTINELS}] (a sentinel per span), got {max_spans}")
    return float(poisson_rate), max_spans


def check_max_seq_len(max_seq_len: object) -> int:
    """Validates a training-sequence length limit (room for ``<eos> x <eos>``); returns it as an int."""
    max_seq_len = as_int("max_seq_len", max_seq_len)
    if max_seq_len < 3:
        raise ValueError(f"max_seq_len must be >= 3 (<eos> document <eos>), got {max_seq_len}")
    return max_seq_len


def _as_ids(ids: IdsLike, name: str) -> np.ndarray:
    """A 1-D integer id sequence -> int64 numpy array (a copy only when the input needs converting)."""
    if isinstance(ids, torch.Tensor):
        if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
            raise TypeError(f"{name} must hold integer ids, got a {ids.dtype} tensor")
        if ids.ndim != 1:
            raise ValueError(f"{name} must be 1-D, got shape {tuple(ids.shape)}")
        arr = ids.detach().cpu().numpy()
    elif isinstance(ids, (str, bytes)):
        raise TypeError(f"{name} must be a sequence of int ids, got {type(ids).__name__}")
    else:
        arr = np.asarray(ids)
        if arr.ndim != 1:
            raise ValueError(f"{name} must be a 1-D sequence of int ids, got shape {arr.shape}")
        if arr.size and arr.dtype.kind not in "iu":
            raise TypeError(f"{name} must hold int ids, got {arr.dtype} values")
    return arr.astype(np.int64, copy=False)


def _check_document(ids: IdsLike, vocab: Vocabulary, name: str) -> np.ndarray:
    """A plain document: non-empty, ids inside the vocabulary, none of the objective's own specials."""
    arr = _as_ids(ids, name)
    if arr.size == 0:
        raise ValueError(f"{name} is an empty document")
    lo, hi = int(arr.min()), int(arr.max())
    if lo < 0 or hi >= len(vocab):
        raise ValueError(f"{name} holds ids outside the vocabulary [0, {len(vocab)}): min {lo}, max {hi}")
    specials = arr[arr < vocab.num_special]
    reserved = _RESERVED[specials]
    if reserved.any():
        bad = vocab.special_name(int(specials[np.argmax(reserved)]))
        raise ValueError(f"{name} contains {bad}; a plain document may not hold <eos>, <infill> or <mask:i> "
                         "(they structure the transformed sequence)")
    return arr


def _is_sentinel(arr: np.ndarray) -> np.ndarray:
    return (arr >= _SENTINEL0) & (arr < _SENTINEL0 + NUM_SENTINELS)


# ---- sampling ------------------------------------------------------------------------------------------
def _poisson_count(u: float, rate: float, max_spans: int) -> int:
    """Clamp(Poisson(rate), 1, max_spans) by inverting the CDF at the uniform ``u``."""
    p = math.exp(-rate)
    cdf, k = p, 0
    while cdf <= u and k < max_spans:
        k += 1
        p *= rate / k
        cdf += p
    return min(max(k, 1), max_spans)


def _runs(arr: np.ndarray, num_special: int) -> tuple[list[int], list[int]]:
    """Starts and lengths of the maximal runs of non-special (text or image) tokens (a handful per
    document, so plain lists from here on)."""
    edges = np.flatnonzero(np.diff(np.concatenate(([0], (arr >= num_special).view(np.int8), [0]))))
    starts = edges[::2].tolist()
    return starts, [e - s for s, e in zip(starts, edges[1::2].tolist())]


def _capacity(lengths: list[int]) -> int:
    """Most spans the runs hold: non-adjacent spans use distinct cut points, m + 1 of them per run."""
    return sum((m + 1) // 2 for m in lengths)


def _log_binomial(n: int, k: int) -> float:
    return math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1) if 0 <= k <= n else -math.inf


def _log_add(terms: list[float]) -> float:
    top = max(terms)
    return top if top == -math.inf else top + math.log(sum(math.exp(t - top) for t in terms))


def _allocate(lengths: list[int], n: int, u: np.ndarray) -> list[int]:
    """How many of the ``n`` spans fall in each run, drawn so that every valid set of spans is equally likely.

    A run of m tokens has m + 1 cut points and holds k spans in ``C(m + 1, 2k)`` ways, so the allocation
    ``(k_r)`` has probability proportional to ``prod_r C(m_r + 1, 2 k_r)``: a forward pass sums the products
    (log space, since the binomials span hundreds of orders of magnitude) and a backward pass samples one
    run at a time with the uniforms ``u``. Plain Python: the tables are at most runs x 17 x 17.
    """
    if len(lengths) == 1:
        return [n]
    log_w = [[_log_binomial(m + 1, 2 * k) for k in range(n + 1)] for m in lengths]
    forward = [log_w[0]]
    for w in log_w[1:]:
        prev = forward[-1]
        forward.append([_log_add([prev[t - k] + w[k] for k in range(t + 1)]) for t in range(n + 1)])
    counts = [0] * len(lengths)
    left = n
    for r in range(len(lengths) - 1, 0, -1):
        logp = [forward[r - 1][left - k] + log_w[r][k] for k in range(left + 1)]
        top = max(logp)
        p = np.cumsum([math.exp(x - top) for x in logp])
        counts[r] = min(int(np.searchsorted(p, u[r] * p[-1], side="right")), left)
        left -= counts[r]
    counts[0] = left
    return counts


def _sample_spans(starts: list[int], lengths: list[int], n: int, u: np.ndarray) -> list[int]:
    """``[s0, e0, s1, e1, ...]``: n sorted, non-overlapping, non-adjacent ``[start, end)`` spans.

    ``u`` holds one uniform per run (allocation) followed by one per cut point of every run; a run's 2k cut
    points are the positions of its 2k smallest uniforms (a uniform 2k-subset), paired in order.
    """
    counts = _allocate(lengths, n, u[: len(lengths)])
    offset = len(lengths)
    points: list[int] = []
    for start, m, k in zip(starts, lengths, counts):
        if k:
            chosen = np.argpartition(u[offset:offset + m + 1], 2 * k - 1)[: 2 * k]
            points += [start + p for p in np.sort(chosen).tolist()]
        offset += m + 1
    return points


def _transform(arr: np.ndarray, vocab: Vocabulary, generator: torch.Generator, rate: float, max_spans: int,
               limit: int | None = None, transform_probability: float = 1.0) -> tuple[np.ndarray, int]:
    """The CM3 transform of a checked document; with ``limit``, the document's tail is cut first so that
    the result has at most ``limit`` tokens (``limit >= 1``). With probability ``1 - transform_probability``
    the document stays plain (only cut). Returns (tokens, n_spans)."""
    # the keep-plain draw exists only when it can matter, so the default draws stay those of the paper's form
    plain = transform_probability < 1.0 and float(
        torch.rand(1, generator=generator, dtype=torch.float64)) >= transform_probability
    starts, lengths = _runs(arr, vocab.num_special)
    # one draw per document: the span count, one per run (allocation), one per cut point of every run
    u = torch.rand(1 + 2 * len(lengths) + sum(lengths), generator=generator, dtype=torch.float64).numpy()
    n = 0 if plain else min(_poisson_count(float(u[0]), rate, max_spans), _capacity(lengths))
    if limit is not None and len(arr) + (2 * n + 1 if n else 0) > limit:
        return _transform_truncated(arr, vocab, u, n, limit)
    if n == 0:
        return arr, 0
    return _move_spans(arr, _sample_spans(starts, lengths, n, u[1:])), n


def _transform_truncated(arr: np.ndarray, vocab: Vocabulary, u: np.ndarray, n: int,
                         limit: int) -> tuple[np.ndarray, int]:
    """Keeps the head of the document that leaves room for the n spans' sentinels and ``<infill>`` (fewer
    spans when even one token plus their overhead does not fit), drops trailing ``<break>`` separators,
    and transforms the head with the same draws."""
    n = min(n, max((limit - 2) // 2, 0))
    keep = limit - (2 * n + 1 if n else 0)
    head = arr[:keep]
    trailing = np.flatnonzero(head != vocab.break_id)
    if len(trailing):
        head = head[: trailing[-1] + 1]
    starts, lengths = _runs(head, vocab.num_special)
    n = min(n, _capacity(lengths))
    if n == 0:
        return head, 0
    return _move_spans(head, _sample_spans(starts, lengths, n, u[1:])), n


def _move_spans(arr: np.ndarray, bounds: list[int]) -> np.ndarray:
    """``A <mask:0> B <mask:1> C <infill> <mask:0> span0 <mask:1> span1`` for the spans
    ``[bounds[0], bounds[1]), [bounds[2], bounds[3]), ...``, written slice by slice into one buffer."""
    n = len(bounds) // 2
    out = np.empty(len(arr) + 2 * n + 1, dtype=np.int64)
    o = src = 0                                                  # write position in the body, read position
    t = len(arr) - sum(bounds[1::2]) + sum(bounds[0::2]) + n     # where <infill> goes
    out[t] = _INFILL
    t += 1
    for i in range(n):
        s, e = bounds[2 * i], bounds[2 * i + 1]
        out[o:o + s - src] = arr[src:s]
        o += s - src
        out[o] = out[t] = _SENTINEL0 + i
        out[t + 1:t + 1 + e - s] = arr[s:e]
        o, t, src = o + 1, t + 1 + e - s, e
    out[o:o + len(arr) - src] = arr[src:]
    return out


def _weights(tokens: np.ndarray) -> np.ndarray:
    return (~_is_sentinel(tokens)).astype(np.float32)


def _example(tokens: np.ndarray, weights: np.ndarray, n_spans: int) -> CM3Example:
    return CM3Example(torch.from_numpy(np.ascontiguousarray(tokens, dtype=np.int64)),
                      torch.from_numpy(weights), n_spans)


# ---- public API ----------------------------------------------------------------------------------------
def cm3_transform(ids: IdsLike, vocabulary: Vocabulary, *, generator: torch.Generator,
                  poisson_rate: float = 1.0, max_spans: int = 16) -> CM3Example:
    """The CM3 transform of one document.

    Args:
        ids: the document's global ids (list, tuple, numpy array or 1-D integer tensor), without the
            ``<eos>`` around it; it may hold ``<break>`` (and other specials, which stay in place), but not
            ``<eos>``, ``<infill>`` or sentinels.
        vocabulary: the id space.
        generator: CPU ``torch.Generator``, the only source of randomness (same state -> same result).
        poisson_rate: rate of the Poisson draw of the span count (>= 0).
        max_spans: upper clamp of the span count, at most 16 (the number of sentinels).

    Returns:
        ``CM3Example(tokens, loss_weights, n_spans)`` with the layout
        ``A <mask:0> B <mask:1> C <infill> <mask:0> span0 <mask:1> span1``; loss weight 0 exactly at the
        sentinels. A document without text or image tokens comes back unchanged with ``n_spans == 0``.

    Raises:
        TypeError / ValueError naming the argument: non-integer or out-of-vocabulary ids, an empty document,
        reserved specials in ``ids``, a negative or non-finite ``poisson_rate``, ``max_spans`` outside
        [1, 16], a generator that is not a CPU ``torch.Generator``.
    """
    vocab = _check_vocabulary(vocabulary)
    rate, max_spans = check_objective_args(poisson_rate, max_spans)
    arr = _check_document(ids, vocab, "ids")
    tokens, n = _transform(arr, vocab, _check_generator(generator), rate, max_spans)
    if n == 0:
        tokens = tokens.copy()          # never share memory with the caller's ids
    return _example(tokens, _weights(tokens), n)


def cm3_restore(tokens: IdsLike, vocabulary: Vocabulary) -> list[int]:
    """The inverse of :func:`cm3_transform`: puts every span back in place of its sentinel.

    ``tokens`` is one transformed document (no ``<eos>``). Raises ValueError naming ``tokens`` for a
    malformed sequence: ids outside the vocabulary, ``<eos>`` inside, more than one ``<infill>``, sentinels
    without ``<infill>``, body sentinels not numbered ``0, 1, ...`` in order, spans after ``<infill>`` that
    do not match them one to one in the same order, or an empty span or one holding a special token.
    """
    vocab = _check_vocabulary(vocabulary)
    arr = _as_ids(tokens, "tokens")
    if arr.size == 0:
        raise ValueError("tokens is empty; a transformed document has at least one token")
    if (int(arr.min()) < 0 or int(arr.max()) >= len(vocab)):
        raise ValueError(f"tokens holds ids outside the vocabulary [0, {len(vocab)})")
    if (arr == vocab.eos_id).any():
        raise ValueError("tokens contains <eos>; cm3_restore takes one transformed document")
    infill = np.flatnonzero(arr == vocab.infill_id)
    sentinel = _is_sentinel(arr)
    if len(infill) == 0:
        if sentinel.any():
            raise ValueError("tokens has sentinels but no <infill> (a sentinel with no span)")
        return arr.tolist()
    if len(infill) > 1:
        raise ValueError(f"tokens has {len(infill)} <infill> tokens, expected at most one")
    p = int(infill[0])
    body, tail = arr[:p], arr[p + 1:]
    first = vocab.sentinel_id(0)
    body_slots = np.flatnonzero(sentinel[:p])
    n = len(body_slots)
    if n == 0:
        raise ValueError("tokens has <infill> but no sentinel before it")
    if not np.array_equal(body[body_slots] - first, np.arange(n)):
        raise ValueError(f"tokens: sentinels before <infill> are {(body[body_slots] - first).tolist()}, "
                         f"expected <mask:0>..<mask:{n - 1}> in order")
    tail_slots = np.flatnonzero(sentinel[p + 1:])
    in_order = len(tail_slots) == n and np.array_equal(tail[tail_slots] - first, np.arange(n))
    if not in_order or tail_slots[0] != 0:
        raise ValueError(f"tokens: after <infill> expected spans <mask:0>..<mask:{n - 1}> in order, each "
                         "right after the previous span")
    span_bounds = np.append(tail_slots, len(tail))
    if (np.diff(span_bounds) < 2).any():
        raise ValueError("tokens has an empty span after <infill> (a sentinel with no span)")
    if ((tail < vocab.num_special) & ~sentinel[p + 1:]).any():
        raise ValueError("tokens has a span holding a special token")
    pieces = [body[: body_slots[0]]]
    for i in range(n):
        pieces.append(tail[span_bounds[i] + 1: span_bounds[i + 1]])
        pieces.append(body[body_slots[i] + 1: body_slots[i + 1] if i + 1 < n else p])
    return np.concatenate(pieces).tolist()


def training_sequence(query_doc: IdsLike, retrieved_docs: Sequence[IdsLike], vocabulary: Vocabulary, *,
                      generator: torch.Generator, max_seq_len: int, poisson_rate: float = 1.0,
                      max_spans: int = 16, transform_probability: float = 1.0) -> CM3Example:
    """``<eos> T(r1) <eos> T(r2) ... <eos> T(query) <eos>``: each document CM3-transformed on its own.

    Every position weighs the same (retrieved documents included), except sentinels and position 0, which
    weigh 0. The result has at most ``max_seq_len`` tokens:

    - the query is transformed first, against the whole budget; if even alone it does not fit, its tail is
      cut (before the transform, leaving room for its spans; trailing ``<break>`` separators of the cut
      head are dropped) so the sequence still ends ``... <infill> spans <eos>``;
    - retrieved documents follow in the given order while they fit: the first one that does not fit is
      dropped together with all after it (retrievers list the most relevant first).

    ``transform_probability`` is the chance that a document is transformed at all (independently per
    document); the others stay plain, in the layout inference prompts use. The objective as published
    transforms every document (1.0, the default).

    ``n_spans`` counts the spans of all kept documents. Randomness is drawn from ``generator`` in a fixed
    order (query, then retrieved documents), so equal inputs and generator states give equal sequences.

    Raises:
        TypeError / ValueError naming the argument: as :func:`cm3_transform` for ``query_doc`` and
        ``retrieved_docs[i]``; ``retrieved_docs`` not a sequence; ``max_seq_len`` not an int or < 3 (room
        for ``<eos> x <eos>``).
    """
    vocab = _check_vocabulary(vocabulary)
    rate, max_spans = check_objective_args(poisson_rate, max_spans)
    p_transform = check_probability("transform_probability", transform_probability)
    generator = _check_generator(generator)
    max_seq_len = check_max_seq_len(max_seq_len)
    if isinstance(retrieved_docs, (str, bytes)) or not isinstance(retrieved_docs, Sequence):
        raise TypeError(f"retrieved_docs must be a list of documents, got {type(retrieved_docs).__name__}")
    query = _check_document(query_doc, vocab, "query_doc")
    retrieved = [_check_document(d, vocab, f"retrieved_docs[{i}]") for i, d in enumerate(retrieved_docs)]

    eos = np.array([vocab.eos_id])
    query_t, n_spans = _transform(query, vocab, generator, rate, max_spans, limit=max_seq_len - 2,
                                  transform_probability=p_transform)
    truncated = len(query_t) - (2 * n_spans + 1 if n_spans else 0) < len(query)
    budget = 0 if truncated else max_seq_len - 2 - len(query_t)
    pieces = [eos]
    for doc in retrieved:
        if len(doc) + 1 > budget:       # cannot fit even untransformed (or the query was cut): no draws
            break
        doc_t, n = _transform(doc, vocab, generator, rate, max_spans, transform_probability=p_transform)
        if len(doc_t) + 1 > budget:
            break
        pieces += [doc_t, eos]
        budget -= len(doc_t) + 1
        n_spans += n
    tokens = np.concatenate(pieces + [query_t, eos])
    weights = _weights(tokens)
    weights[0] = 0.0
    return _example(tokens, weights, n_spans)
