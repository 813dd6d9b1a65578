"""Fused VQ codebook lookup against float64 references (contract: docs/vq.md)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import cm3leon_kernels as ck
from cm3leon_kernels import reference as ref

from helpers import FLOAT_DTYPES, poisoned_outputs
from vq_checks import check_nearest, check_torch_compile_fullgraph, check_vector_quantize_matches_reference

DTYPES = FLOAT_DTYPES
# N around the 6-row micro-panel and 96-row block, K around the 16-code panel, D around the vector width and
# the 256-deep chunk: every edge of the tiling.
SHAPES = [(1, 1, 1), (1, 7, 3), (5, 1, 8), (6, 16, 16), (7, 17, 9), (95, 33, 31), (97, 300, 64),
          (200, 15, 257), (13, 1000, 100), (500, 64, 513), (1000, 513, 32)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("n,k,d", SHAPES)
def test_nearest_matches_float64_reference(n, k, d, metric, dtype):
    z = torch.randn(n, d).to(dtype)
    codebook = torch.randn(k, d).to(dtype)
    check_nearest(z, codebook, metric)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 130), k=st.integers(1, 70), d=st.integers(1, 70), scale=st.floats(1e-3, 1e3),
       seed=st.integers(0, 2**31 - 1))
def test_nearest_random_shapes(n, k, d, scale, seed):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, d, generator=g) * scale
    codebook = torch.randn(k, d, generator=g) * scale
    check_nearest(z, codebook, "l2")


def test_small_batch_splits_the_codebook_and_keeps_lowest_index_ties():
    # A single row with a huge codebook takes the code-split path; duplicates across splits test the merge.
    codebook = torch.randn(5000, 40)
    codebook[4000] = codebook[123]
    z = codebook[123:124] + 1e-3
    indices, _ = ck.vq_nearest(z, codebook)
    assert indices.tolist() == [123]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_ties_go_to_the_lowest_index(dtype):
    codebook = torch.randn(40, 24).to(dtype)
    codebook[[3, 17, 38]] = codebook[9].clone()  # four identical codes: 3 is the lowest
    z = torch.stack([codebook[9], codebook[38], codebook[0]]).to(dtype)
    indices, distance = ck.vq_nearest(z, codebook)
    assert indices.tolist() == [3, 3, 0]
    assert distance.abs().max().item() == 0.0
    same = torch.zeros(10, 8, dtype=dtype)
    assert ck.vq_nearest(torch.ones(4, 8, dtype=dtype), same)[0].tolist() == [0, 0, 0, 0]


def test_leading_dims_and_empty_input():
    codebook = torch.randn(50, 12)
    z = torch.randn(2, 3, 5, 12)
    indices, distance = ck.vq_nearest(z, codebook)
    assert indices.shape == (2, 3, 5) and distance.shape == (2, 3, 5)
    flat, _ = ck.vq_nearest(z.reshape(-1, 12), codebook)
    assert torch.equal(indices.reshape(-1), flat)
    empty_idx, empty_dist = ck.vq_nearest(torch.randn(0, 12), codebook)
    assert empty_idx.shape == (0,) and empty_dist.shape == (0,)


def test_cosine_handles_zero_vectors_and_unnormalised_codes():
    codebook = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 0.1]])
    z = torch.tensor([[1.0, 0.1], [0.0, 0.0], [0.1, 5.0]])
    indices, distance = ck.vq_nearest(z, codebook, metric="cosine")
    assert indices.tolist() == [1, 0, 2]
    assert distance[1].item() == 1.0  # zero vector: cosine similarity 0 with everything


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_embed_gathers_rows(dtype):
    codebook = torch.randn(37, 19).to(dtype)
    indices = torch.randint(0, 37, (4, 9))
    with poisoned_outputs():
        out = ck.vq_embed(indices, codebook)
    assert out.dtype == dtype and out.shape == (4, 9, 19)
    assert torch.equal(out, ref.vq_embed(indices, codebook))


def test_vector_quantize_forward_and_gradients_match_reference():
    check_vector_quantize_matches_reference("cpu")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_vector_quantize_output_is_exactly_the_codes(dtype):
    """quantized equals the chosen codes bit for bit (z + sg(codes - z) rounds: up to 0.03 off in bf16) and still
    passes its gradient straight to z."""
    z = (torch.randn(500, 8) * 3).to(dtype).requires_grad_()
    codebook = torch.randn(64, 8).to(dtype)
    out = ck.vector_quantize(z, codebook)
    assert torch.equal(out.quantized.detach(), codebook[out.indices])
    weights = torch.randn_like(z)
    (out.quantized * weights).sum().backward()
    assert torch.equal(z.grad, weights)


def test_vector_quantize_bf16_autocast_style_inputs():
    z = torch.randn(64, 32, dtype=torch.bfloat16, requires_grad=True)
    codebook = torch.randn(128, 32, dtype=torch.bfloat16, requires_grad=True)
    out = ck.vector_quantize(z, codebook)
    out.loss.backward()
    assert out.quantized.dtype == torch.bfloat16 and out.loss.dtype == torch.float32
    assert z.grad is not None and codebook.grad is not None and torch.isfinite(codebook.grad.float()).all()


def test_opcheck():
    z = torch.randn(33, 20)
    codebook = torch.randn(70, 20, requires_grad=True)
    torch.library.opcheck(torch.ops.cm3leon.vq_nearest.default, (z, codebook.detach(), "l2"))
    torch.library.opcheck(torch.ops.cm3leon.vq_nearest.default, (z, codebook.detach(), "cosine"))
    torch.library.opcheck(torch.ops.cm3leon.vq_embed.default, (torch.randint(0, 70, (33,)), codebook))


def test_torch_compile_fullgraph():
    check_torch_compile_fullgraph()


def test_torch_compile_fullgraph_symbolic_beta():
    # dynamic=True makes the default beta a symbolic float; its check must trace without a graph break.
    z, codebook = torch.randn(10, 16), torch.randn(64, 16)
    compiled = torch.compile(lambda z, codebook: ck.vector_quantize(z, codebook).loss, fullgraph=True,
                             dynamic=True, backend="aot_eager")
    torch.testing.assert_close(compiled(z, codebook), ck.vector_quantize(z, codebook).loss)


@pytest.mark.parametrize("call,error,match", [
    (lambda: ck.vq_nearest(torch.randn(4, 8), torch.randn(5, 7)), ValueError, "last dim"),
    (lambda: ck.vq_nearest(torch.randn(4, 8), torch.randn(0, 8)), ValueError, "codebook is empty"),
    (lambda: ck.vq_nearest(torch.randn(4, 0), torch.randn(3, 0)), ValueError, "codebook vectors are empty"),
    (lambda: ck.vq_nearest(torch.randint(0, 5, (4, 8)), torch.randn(5, 8)), TypeError, "z must have dtype"),
    (lambda: ck.vq_nearest(torch.randn(4, 8), torch.randn(5, 8).double()), TypeError, "codebook must have"),
    (lambda: ck.vq_nearest(torch.randn(4, 8), torch.randn(5, 8).half()), TypeError, "share a dtype"),
    (lambda: ck.vq_nearest(torch.randn(8, 4).T, torch.randn(5, 8)), ValueError, "z must be contiguous"),
    (lambda: ck.vq_nearest(torch.randn(4, 8), torch.randn(8, 5).T), ValueError, "codebook must be contig"),
    (lambda: ck.vq_nearest(torch.randn(4, 8), torch.randn(5, 8), metric="ip"), ValueError, "metric"),
    (lambda: ck.vq_nearest(torch.randn(4, 8), torch.randn(2, 5, 8)), ValueError, "codebook must be 2-D"),
    (lambda: ck.vq_nearest(torch.randn(4, 8), torch.randn(5, 8, device="meta")), ValueError, "one device"),
    (lambda: ck.vq_nearest(torch.full((2, 8), float("nan")), torch.randn(5, 8)), ValueError, "NaN"),
    (lambda: ck.vq_embed(torch.tensor([0, 5]), torch.randn(5, 8)), IndexError, "out of range"),
    (lambda: ck.vq_embed(torch.tensor([-1]), torch.randn(5, 8)), IndexError, "out of range"),
    (lambda: ck.vq_embed(torch.tensor([0.0]), torch.randn(5, 8)), TypeError, "indices must have dtype"),
    (lambda: ck.vector_quantize(torch.randn(4, 8), torch.randn(5, 8), beta=-1.0), ValueError, "beta"),
    (lambda: ck.vector_quantize(torch.randn(4, 8), torch.randn(5, 8), beta=float("nan")), ValueError, "beta"),
    (lambda: ck.vector_quantize(torch.randn(4, 8), torch.randn(5, 8), beta=math.inf), ValueError, "beta"),
    (lambda: ck.vector_quantize(torch.randn(4, 8), torch.randn(5, 8), beta=True), TypeError, "beta"),
    (lambda: ck.vector_quantize(torch.randn(4, 8), torch.randn(5, 8), beta="0.25"), TypeError, "beta"),
    (lambda: ck.vq_nearest([1.0, 2.0], torch.randn(5, 8)), TypeError, "z must be a torch.Tensor"),
])
def test_bad_input_raises_clear_errors(call, error, match):
    with pytest.raises(error, match=match):
        call()


@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_non_finite_z_raises_and_non_finite_codes_are_skipped(metric, dtype):
    """An inf in z has no finite distance to any code (it used to win with distance inf / NaN); a code holding
    NaN/inf is never chosen."""
    z = torch.randn(3, 8)
    z[1, 2] = math.inf
    with pytest.raises(ValueError, match="1 row\\(s\\) of z have no finite distance"):
        ck.vq_nearest(z.to(dtype), torch.randn(5, 8).to(dtype), metric=metric)
    codebook = torch.randn(5, 8)
    codebook[1, 0], codebook[3, 4] = math.nan, -math.inf
    z = codebook[[1, 3, 0]] + 0.01
    z[:2] = torch.randn(2, 8)
    indices, distance = ck.vq_nearest(z.to(dtype), codebook.to(dtype), metric=metric)
    assert not torch.isin(indices, torch.tensor([1, 3])).any() and torch.isfinite(distance).all()
    assert indices[2] == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_l2_nearest_survives_fp32_overflow_and_underflow_of_the_expanded_form(dtype):
    """Data far from the origin (||c||^2 or 2 z.c overflow fp32) or tiny (the products underflow) still gets the
    float64 argmin; a finite distance used to be reported as "no finite distance" or lose to a farther code."""
    def check(z, codebook):
        z, codebook = z.to(dtype), codebook.to(dtype)
        exact = ref.vq_distances(z.double(), codebook.double())
        indices, distance = ck.vq_nearest(z, codebook)
        assert torch.equal(indices, exact.argmin(dim=1))
        torch.testing.assert_close(distance, exact.min(dim=1).values.float(), rtol=1e-6, atol=3e-45)

    check(torch.tensor([[1e30, 0.0]]), torch.tensor([[1e30, 1.0], [0.0, 0.0]]))
    big = torch.tensor([[1.5e19, 1.5e19]])
    check(big, torch.cat([torch.tensor([[1e19, 1e19]]), big]))
    g = torch.Generator().manual_seed(0)
    for scale in (1e-22, 1e-30):
        check(torch.randn(200, 16, generator=g) * scale, torch.randn(64, 16, generator=g) * scale)


def test_vector_quantize_accepts_numpy_beta():
    z, codebook = torch.randn(6, 8), torch.randn(5, 8)
    assert torch.equal(ck.vector_quantize(z, codebook, beta=np.float32(0.5)).loss,
                       ck.vector_quantize(z, codebook, beta=0.5).loss)


def test_faiss_runs_cpu_indexes_without_a_gpu():
    """The [retrieval] extra (faiss-gpu) must serve CPU indexes on GPU-less machines; it agrees with us."""
    faiss = pytest.importorskip("faiss")
    z = torch.randn(300, 32)
    codebook = torch.randn(200, 32)
    index = faiss.IndexFlatL2(32)
    index.add(codebook.numpy())
    _, found = index.search(z.numpy(), 1)
    ours, _ = ck.vq_nearest(z, codebook)
    assert (torch.from_numpy(found[:, 0]) == ours).float().mean().item() > 0.99
