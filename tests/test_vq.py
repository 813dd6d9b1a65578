"""Fused VQ codebook lookup against float64 references (contract: docs/vq.md)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from helpers import fa_rule_bound, poisoned_outputs
from hypothesis import given, settings
from hypothesis import strategies as st

import cm3leon_kernels as ck
from cm3leon_kernels import reference as ref

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# N around the 6-row micro-panel and 96-row block, K around the 16-code panel, D around the vector width and
# the 256-deep chunk: every edge of the tiling.
SHAPES = [(1, 1, 1), (1, 7, 3), (5, 1, 8), (6, 16, 16), (7, 17, 9), (95, 33, 31), (97, 300, 64),
          (200, 15, 257), (13, 1000, 100), (500, 64, 513), (1000, 513, 32)]


def check_nearest(z: torch.Tensor, codebook: torch.Tensor, metric: str, *, exact: torch.Tensor | None = None,
                  baseline: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Runs vq_nearest on z's device (poisoned outputs) and checks the contract every device meets against the
    float64 distances of the exact (possibly 16-bit) input values, ``exact`` [N, K] (computed when not given),
    with the FlashAttention rule against ``baseline``, the same distances by plain PyTorch in fp32. Returns the
    flat indices, the flat distances (float64) and ``exact`` for device-specific checks."""
    with poisoned_outputs():
        indices, distance = ck.vq_nearest(z, codebook, metric=metric)
    assert indices.device == z.device and distance.device == z.device
    assert indices.dtype == torch.int64 and distance.dtype == torch.float32
    assert indices.shape == z.shape[:-1] == distance.shape
    flat_z = z.reshape(-1, z.shape[-1])
    if exact is None:
        exact = ref.vq_distances(flat_z.double(), codebook.double(), metric)
    if baseline is None:
        baseline = ref.vq_distances(flat_z.float(), codebook.float(), metric)
    bound = fa_rule_bound(exact, baseline, eps=1e-5)
    idx, dist = indices.reshape(-1), distance.reshape(-1).double()
    assert ((idx >= 0) & (idx < codebook.shape[0])).all()
    chosen = exact.gather(1, idx[:, None])[:, 0]
    best = exact.min(dim=1).values
    # The chosen code must be optimal up to the rounding plain PyTorch itself makes in fp32.
    assert (chosen - best).max().item() <= bound
    # Where the optimum is clear by more than that rounding, the index must be exactly torch's argmin.
    second = exact.topk(2, dim=1, largest=False).values[:, 1] if exact.shape[1] > 1 else best + 1e9
    clear = (second - best) > bound
    assert torch.equal(idx[clear], exact.argmin(dim=1)[clear])
    assert (dist - chosen).abs().max().item() <= bound
    return idx, dist, exact


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


def check_vector_quantize_matches_reference(device):
    """vector_quantize's outputs, loss and gradients against float64 autograd. Shared with the CUDA tests."""
    z = torch.randn(3, 7, 16, dtype=torch.float32, device=device, requires_grad=True)
    codebook = torch.randn(29, 16, device=device, requires_grad=True)
    out = ck.vector_quantize(z, codebook, beta=0.3)
    # float64 reference of the same loss, through plain autograd
    z64 = z.detach().double().requires_grad_()
    c64 = codebook.detach().double().requires_grad_()
    idx = ref.vq_nearest(z64.detach(), c64.detach())[0]
    e64 = c64[idx]
    loss64 = ((e64 - z64.detach()) ** 2).mean() + 0.3 * ((z64 - e64.detach()) ** 2).mean()
    q64 = z64 + (e64 - z64).detach()
    assert torch.equal(out.indices, idx)
    assert torch.allclose(out.quantized.double(), q64, atol=1e-6)
    assert abs(out.loss.item() - loss64.item()) <= 1e-5 * max(1.0, loss64.item())
    weights = torch.randn_like(z)
    (out.loss + (out.quantized * weights).sum()).backward()
    (loss64 + (q64 * weights.double()).sum()).backward()
    assert torch.allclose(z.grad.double(), z64.grad, atol=1e-5)
    assert torch.allclose(codebook.grad.double(), c64.grad, atol=1e-5)


def test_vector_quantize_forward_and_gradients_match_reference():
    check_vector_quantize_matches_reference("cpu")


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


def check_torch_compile_fullgraph(device="cpu"):
    """vector_quantize traces without graph breaks and matches eager, gradients included (also used by the
    CUDA tests)."""
    codebook = torch.randn(64, 16, device=device, requires_grad=True)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def step(z):
        out = ck.vector_quantize(z, codebook)
        return out.quantized.sum() + out.loss

    z = torch.randn(10, 16, device=device, requires_grad=True)
    loss = step(z)
    loss.backward()
    eager = ck.vector_quantize(z.detach(), codebook.detach())
    assert torch.allclose(loss.detach(), eager.quantized.sum() + eager.loss, rtol=1e-5)
    assert codebook.grad is not None


def test_torch_compile_fullgraph():
    check_torch_compile_fullgraph()


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
