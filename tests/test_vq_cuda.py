"""The CUDA VQ kernels against float64 references: test_vq.py's cases on the GPU, plus the exactness the CUDA
design promises (the chosen index is the float64 argmin of the inputs' exact values, for every dtype, also
for near-ties the tensor cores cannot resolve) and the tiling edges of the GEMM (128-row/128-code tiles,
128-byte depth chunks, 16-byte vectors, code splits). Skipped without a GPU and a CUDA build."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import cm3leon_kernels as ck
from cm3leon_kernels import reference as ref

from helpers import FLOAT_DTYPES, poisoned_outputs
from vq_checks import check_nearest, check_torch_compile_fullgraph, check_vector_quantize_matches_reference

pytestmark = pytest.mark.skipif(not (torch.cuda.is_available() and ck.cuda_built()),
                                reason="needs a CUDA GPU and a CUDA build of cm3leon_kernels")

CUDA = "cuda"
DTYPES = FLOAT_DTYPES
# test_vq.py's shapes plus the GPU tiling edges: 128-row / 128-code tiles, depth chunks of 32 (fp32) and 64
# (16-bit) values, D not a multiple of the 16-byte vector (padded copies), few rows (code splits).
SHAPES = [(1, 1, 1), (1, 7, 3), (5, 1, 8), (6, 16, 16), (7, 17, 9), (95, 33, 31), (97, 300, 64),
          (200, 15, 257), (13, 1000, 100), (500, 64, 513), (1000, 513, 32),
          (127, 128, 32), (128, 129, 64), (129, 127, 65), (257, 256, 96), (3, 2000, 4), (300, 1000, 12)]


def _expanded_l2(z: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """``||z||^2 + ||c||^2 - 2 z.c`` in the inputs' dtype: the N x K matrix without the N x K x D one."""
    return (z * z).sum(1, keepdim=True) + (codebook * codebook).sum(1)[None, :] - 2 * z @ codebook.T


def _check_nearest(z: torch.Tensor, codebook: torch.Tensor, metric: str, *, exact: torch.Tensor | None = None,
                   baseline: torch.Tensor | None = None) -> None:
    # The CPU contract (test_vq.py): optimal up to PyTorch's own fp32 rounding ...
    idx, distance, exact = check_nearest(z, codebook, metric, exact=exact, baseline=baseline)
    # ... and the CUDA one: the float64 argmin itself (lowest index on ties) wherever float64 can tell the
    # two best codes apart, whatever the input dtype; the distance is the winner's, correctly rounded.
    best = exact.min(dim=1).values
    second = exact.topk(2, dim=1, largest=False).values[:, 1] if exact.shape[1] > 1 else best + 1e9
    separable = (second - best) > 1e-9 * (best.abs() + 1)
    assert torch.equal(idx[separable], exact.argmin(dim=1)[separable])
    chosen = exact.gather(1, idx[:, None])[:, 0]
    assert ((distance - chosen).abs() <= 2.0 ** -23 * chosen.abs() + 1e-12).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("n,k,d", SHAPES)
def test_nearest_matches_float64_reference(n, k, d, metric, dtype):
    g = torch.Generator().manual_seed(n * 1_000_003 + k * 1009 + d)
    z = torch.randn(n, d, generator=g).to(dtype).to(CUDA)
    codebook = torch.randn(k, d, generator=g).to(dtype).to(CUDA)
    _check_nearest(z, codebook, metric)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 300), k=st.integers(1, 300), d=st.integers(1, 140), scale=st.floats(1e-3, 1e3),
       dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**31 - 1))
def test_nearest_random_shapes(n, k, d, scale, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    z = (torch.randn(n, d, generator=g) * scale).to(dtype).to(CUDA)
    codebook = (torch.randn(k, d, generator=g) * scale).to(dtype).to(CUDA)
    _check_nearest(z, codebook, "l2")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_indices_equal_the_float64_argmin_at_tokenizer_scale(dtype):
    """fp32 inputs go through TF32 tensor cores, 16-bit ones through their own: the exact re-check must still
    give the true argmin of every row (4096 latents, 8192 codes of 256 dims)."""
    g = torch.Generator().manual_seed(0)
    z = torch.randn(4096, 256, generator=g).to(dtype).to(CUDA)
    codebook = torch.randn(8192, 256, generator=g).to(dtype).to(CUDA)
    # float64's expanded form is exact to ~1e-13 here; the same form in the inputs' dtype is the baseline.
    exact = _expanded_l2(z.double(), codebook.double())
    _check_nearest(z, codebook, "l2", exact=exact, baseline=_expanded_l2(z, codebook))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_near_ties_below_tensor_core_precision_are_settled_exactly(dtype, metric):
    # For each row two codes at almost the same distance (relative gap ~1e-5, far below TF32's 2^-10 and
    # near fp16's precision), among random decoys: only an exact re-check picks the right one.
    g = torch.Generator().manual_seed(1)
    n, k, d = 64, 700, 48
    z = torch.randn(n, d, generator=g, dtype=torch.float64)
    codebook = torch.randn(k, d, generator=g, dtype=torch.float64) * 3
    for i in range(n):
        a, b = 2 * i + 5, 2 * i + 300  # the nearer one alternates between the lower and the higher index
        direction = torch.randn(d, generator=g, dtype=torch.float64)
        codebook[a] = z[i] + 0.05 * direction
        codebook[b] = z[i] + 0.05 * (1 + (1e-5 if i % 2 else -1e-5)) * direction.roll(1)
    z, codebook = z.to(dtype).to(CUDA), codebook.to(dtype).to(CUDA)
    _check_nearest(z, codebook, metric)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", [1, 300])
def test_ties_go_to_the_lowest_index(dtype, n):
    codebook = torch.randn(40, 24).to(dtype)
    codebook[[3, 17, 38]] = codebook[9].clone()  # four identical codes: 3 is the lowest
    z = torch.stack([codebook[9], codebook[38], codebook[0]]).to(dtype).repeat(n, 1)
    indices, distance = ck.vq_nearest(z.to(CUDA), codebook.to(CUDA))
    assert indices.tolist() == [3, 3, 0] * n
    assert distance.abs().max().item() == 0.0
    same = torch.zeros(10, 8, dtype=dtype, device=CUDA)
    assert ck.vq_nearest(torch.ones(4, 8, dtype=dtype, device=CUDA), same)[0].tolist() == [0, 0, 0, 0]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_many_duplicates_of_the_nearest_code_take_the_exact_scan(dtype):
    # 20 copies of the nearest code, spread over code tiles and splits: more than the GEMM keeps per row, so
    # the row's candidates cannot prove optimality and the exact full scan must still find the first copy.
    g = torch.Generator().manual_seed(2)
    codebook = torch.randn(3000, 40, generator=g)
    copies = torch.arange(20) * 149 + 11
    codebook[copies] = codebook[11].clone()
    z = codebook[11].repeat(50, 1) + 1e-3 * torch.randn(50, 40, generator=g)
    z, codebook = z.to(dtype).to(CUDA), codebook.to(dtype).to(CUDA)
    indices, _ = ck.vq_nearest(z, codebook)
    assert indices.tolist() == [11] * 50
    _check_nearest(z, codebook, "l2")


def test_small_batch_splits_the_codebook_and_keeps_lowest_index_ties():
    codebook = torch.randn(5000, 40)
    codebook[4000] = codebook[123]
    z = codebook[123:124] + 1e-3
    indices, _ = ck.vq_nearest(z.to(CUDA), codebook.to(CUDA))
    assert indices.tolist() == [123]


def test_misaligned_views_take_the_padded_copy():
    # A storage offset of one element breaks 16-byte alignment; the kernel must copy, not misread.
    base = torch.randn(1 + 130 * 64, device=CUDA)
    z = base[1:].view(130, 64)
    cbase = torch.randn(1 + 77 * 64, device=CUDA)
    codebook = cbase[1:].view(77, 64)
    _check_nearest(z, codebook, "l2")


def test_agrees_with_the_cpu_kernel():
    g = torch.Generator().manual_seed(4)
    z = torch.randn(700, 96, generator=g)
    codebook = torch.randn(900, 96, generator=g)
    cpu_idx, cpu_dist = ck.vq_nearest(z, codebook)
    gpu_idx, gpu_dist = ck.vq_nearest(z.to(CUDA), codebook.to(CUDA))
    exact = ref.vq_distances(z.double(), codebook.double(), "l2")
    top2 = exact.topk(2, dim=1, largest=False).values
    clear = (top2[:, 1] - top2[:, 0]) > 1e-3  # the CPU kernel is exact only up to fp32 rounding
    assert torch.equal(cpu_idx[clear], gpu_idx.cpu()[clear])
    assert torch.allclose(cpu_dist, gpu_dist.cpu(), rtol=1e-5, atol=1e-5)


def test_leading_dims_and_empty_input():
    codebook = torch.randn(50, 12, device=CUDA)
    z = torch.randn(2, 3, 5, 12, device=CUDA)
    indices, distance = ck.vq_nearest(z, codebook)
    assert indices.shape == (2, 3, 5) and distance.shape == (2, 3, 5)
    flat, _ = ck.vq_nearest(z.reshape(-1, 12), codebook)
    assert torch.equal(indices.reshape(-1), flat)
    empty_idx, empty_dist = ck.vq_nearest(torch.randn(0, 12, device=CUDA), codebook)
    assert empty_idx.shape == (0,) and empty_dist.shape == (0,) and empty_idx.device.type == "cuda"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cosine_handles_zero_vectors_and_unnormalised_codes(dtype):
    codebook = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 0.1]], dtype=dtype, device=CUDA)
    z = torch.tensor([[1.0, 0.1], [0.0, 0.0], [0.1, 5.0]], dtype=dtype, device=CUDA)
    indices, distance = ck.vq_nearest(z, codebook, metric="cosine")
    assert indices.tolist() == [1, 0, 2]
    assert distance[1].item() == 1.0


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cosine_zero_rows_take_the_first_finite_code_as_on_the_cpu(dtype):
    """A zero row is at cosine distance 1 from every finite code and NaN from the others: the lowest finite
    code wins (as on the CPU); with no finite code the row has no finite distance and raises."""
    g = torch.Generator().manual_seed(5)
    codebook = torch.randn(6, 8, generator=g).to(dtype)
    codebook[0] = float("nan")
    codebook[1, 3] = float("inf")
    codebook[2, 0] = float("-inf")
    z = torch.randn(4, 8, generator=g).to(dtype)
    z[0], z[2] = 0.0, -0.0
    with poisoned_outputs():
        indices, distance = ck.vq_nearest(z.to(CUDA), codebook.to(CUDA), metric="cosine")
    cpu_indices, cpu_distance = ck.vq_nearest(z, codebook, metric="cosine")
    assert indices[[0, 2]].tolist() == [3, 3] and distance[[0, 2]].tolist() == [1.0, 1.0]
    assert torch.equal(indices.cpu(), cpu_indices)
    torch.testing.assert_close(distance.cpu(), cpu_distance, atol=1e-6, rtol=0)
    codebook[3:] = float("nan")
    for device in ("cpu", CUDA):
        with pytest.raises(ValueError, match="NaN"):
            ck.vq_nearest(z[:1].to(device), codebook.to(device), metric="cosine")


def test_non_finite_codes_are_never_chosen_but_non_finite_rows_raise():
    g = torch.Generator().manual_seed(3)
    codebook = torch.randn(300, 16, generator=g)
    codebook[7] = float("nan")
    codebook[8] = float("inf")
    z = torch.randn(40, 16, generator=g)
    indices, _ = ck.vq_nearest(z.to(CUDA), codebook.to(CUDA))
    cpu_indices, _ = ck.vq_nearest(z, codebook)
    assert not ((indices == 7) | (indices == 8)).any()
    assert torch.equal(indices.cpu(), cpu_indices)
    z[5, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        ck.vq_nearest(z.to(CUDA), codebook.to(CUDA))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("d", [19, 64])  # element-wise and 16-byte vectorised gathers
def test_embed_gathers_rows(dtype, d):
    codebook = torch.randn(37, d).to(dtype).to(CUDA)
    indices = torch.randint(0, 37, (4, 9), device=CUDA)
    with poisoned_outputs():
        out = ck.vq_embed(indices, codebook)
    assert out.dtype == dtype and out.shape == (4, 9, d) and out.device.type == "cuda"
    assert torch.equal(out, ref.vq_embed(indices, codebook))


def test_vector_quantize_forward_and_gradients_match_reference():
    # The backward is composed of torch ops (straight-through, MSE) and vq_embed's index_add adjoint: it runs
    # on the GPU once the two forward kernels do.
    check_vector_quantize_matches_reference(CUDA)


def test_vector_quantize_bf16_autocast_style_inputs():
    z = torch.randn(64, 32, dtype=torch.bfloat16, device=CUDA, requires_grad=True)
    codebook = torch.randn(128, 32, dtype=torch.bfloat16, device=CUDA, requires_grad=True)
    out = ck.vector_quantize(z, codebook)
    out.loss.backward()
    assert out.quantized.dtype == torch.bfloat16 and out.loss.dtype == torch.float32
    assert z.grad is not None and codebook.grad is not None and torch.isfinite(codebook.grad.float()).all()


def test_opcheck():
    z = torch.randn(33, 20, device=CUDA)
    codebook = torch.randn(70, 20, device=CUDA, requires_grad=True)
    torch.library.opcheck(torch.ops.cm3leon.vq_nearest.default, (z, codebook.detach(), "l2"))
    torch.library.opcheck(torch.ops.cm3leon.vq_nearest.default, (z, codebook.detach(), "cosine"))
    torch.library.opcheck(torch.ops.cm3leon.vq_nearest.default, (z.half(), codebook.detach().half(), "l2"))
    torch.library.opcheck(torch.ops.cm3leon.vq_embed.default,
                          (torch.randint(0, 70, (33,), device=CUDA), codebook))


def test_torch_compile_fullgraph():
    check_torch_compile_fullgraph(CUDA)


@pytest.mark.parametrize("call,error,match", [
    (lambda: ck.vq_nearest(torch.randn(4, 8, device=CUDA), torch.randn(5, 7, device=CUDA)), ValueError,
     "last dim"),
    (lambda: ck.vq_nearest(torch.randn(4, 8, device=CUDA), torch.randn(5, 8)), ValueError, "one device"),
    (lambda: ck.vq_nearest(torch.randn(4, 8, device=CUDA), torch.randn(5, 8, device=CUDA).half()), TypeError,
     "share a dtype"),
    (lambda: ck.vq_nearest(torch.randn(8, 4, device=CUDA).T, torch.randn(5, 8, device=CUDA)), ValueError,
     "z must be contiguous"),
    (lambda: ck.vq_nearest(torch.randn(4, 8, device=CUDA), torch.randn(5, 8, device=CUDA), metric="ip"),
     ValueError, "metric"),
    (lambda: ck.vq_nearest(torch.full((2, 8), float("inf"), device=CUDA), torch.randn(5, 8, device=CUDA)),
     ValueError, "NaN/inf"),
    (lambda: ck.vq_embed(torch.tensor([0, 5], device=CUDA), torch.randn(5, 8, device=CUDA)), IndexError,
     "out of range"),
    (lambda: ck.vq_embed(torch.tensor([-1], device=CUDA), torch.randn(5, 8, device=CUDA)), IndexError,
     "out of range"),
])
def test_bad_input_raises_clear_errors(call, error, match):
    with pytest.raises(error, match=match):
        call()
