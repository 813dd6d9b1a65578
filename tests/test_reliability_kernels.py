"""Raw ``torch.ops.cm3leon.*`` calls are as safe as the Python API: bad shapes, meta tensors mixed with real
ones, non-finite scales; kernel threads follow torch's setting; cosine search survives huge code norms.
Repros that used to crash run in a subprocess (helpers.run_isolated), so a crash fails the test."""
from __future__ import annotations

import pytest
import torch
from helpers import run_isolated

import cm3leon_kernels as ck
from cm3leon_kernels import reference

ops = torch.ops.cm3leon


def _assert_clean_error(code: str, *messages: str) -> None:
    result = run_isolated(code)
    assert result.returncode == 0, f"crashed (rc {result.returncode}):\n{result.stderr[-2000:]}"
    for message in messages:
        assert message in result.stdout, result.stdout + result.stderr[-2000:]


# ---- 1. the dense backward checks k/v's batch ----------------------------------------------------------

def test_backward_rejects_kv_batch_other_than_q():
    _assert_clean_error("""
        import torch, cm3leon_kernels
        ops = torch.ops.cm3leon
        for kv_batch in (1, 65):  # fewer: heap overflow before; more: uninitialised dk/dv rows
            q = torch.randn(64, 300, 2, 16)
            k = torch.randn(kv_batch, 300, 2, 16)
            try:
                ops.flash_attn_backward(torch.randn_like(q), q, k, k, torch.randn_like(q),
                                        torch.randn(64, 2, 300), 1.0, False)
                print("no error")
            except ValueError as e:
                print("ValueError:", e)
    """, "ValueError: k's batch (1) must equal q's (64)", "ValueError: k's batch (65) must equal q's (64)")


# ---- 2. meta tensors cannot bypass the device checks -------------------------------------------------

def _raw_calls(meta: str):
    """Every op called raw with the argument named ``meta`` on the meta device (the others on the CPU)."""
    def t(name, *shape, dtype=torch.float32, fill=None):
        device = "meta" if name == meta else "cpu"
        if fill is not None:
            return torch.full(shape, fill, dtype=dtype, device=device)
        return torch.randn(shape, device=device).to(dtype) if dtype.is_floating_point else \
            torch.zeros(shape, dtype=dtype, device=device)

    def cu(name):
        return torch.tensor([0, 4], dtype=torch.int32, device="meta" if name == meta else "cpu")

    return {
        "vq_nearest": lambda: ops.vq_nearest(t("z", 4, 16), t("codebook", 3, 16), "l2"),
        "vq_embed": lambda: ops.vq_embed(t("indices", 4, dtype=torch.int64), t("codebook", 3, 16)),
        "flash_attn_forward": lambda: ops.flash_attn_forward(t("q", 1, 4, 2, 16), t("k", 1, 4, 2, 16),
                                                             t("v", 1, 4, 2, 16), 0.25, False),
        "flash_attn_backward": lambda: ops.flash_attn_backward(
            t("dout", 1, 4, 2, 16), t("q", 1, 4, 2, 16), t("k", 1, 4, 2, 16), t("v", 1, 4, 2, 16),
            t("out", 1, 4, 2, 16), t("lse", 1, 2, 4), 0.25, False),
        "flash_attn_varlen_forward": lambda: ops.flash_attn_varlen_forward(
            t("q", 4, 2, 16), t("k", 4, 2, 16), t("v", 4, 2, 16), cu("cu_seqlens_q"), cu("cu_seqlens_k"),
            4, 4, 0.25, False),
        "flash_attn_varlen_backward": lambda: ops.flash_attn_varlen_backward(
            t("dout", 4, 2, 16), t("q", 4, 2, 16), t("k", 4, 2, 16), t("v", 4, 2, 16), t("out", 4, 2, 16),
            t("lse", 2, 4), cu("cu_seqlens_q"), cu("cu_seqlens_k"), 4, 4, 0.25, False),
        "flash_attn_kvcache": lambda: ops.flash_attn_kvcache(
            t("q", 1, 1, 2, 16), t("k_cache", 1, 8, 2, 16), t("v_cache", 1, 8, 2, 16), t("k", 1, 1, 2, 16),
            t("v", 1, 1, 2, 16), t("cache_seqlens", 1, dtype=torch.int32), 0, 0.25, True),
        "cfg_sample": lambda: ops.cfg_sample(
            t("logits", 2, 2, 50), [2.0], 1.0, 0, 1.0, 0.0, 0, 50,
            t("allowed_mask", 50, dtype=torch.bool, fill=True), 1, t("seeds", 2, dtype=torch.int64), 0,
            t("step_tensor", dtype=torch.int64)),
        "contrastive_sample": lambda: ops.contrastive_sample(
            t("expert_logits", 2, 50), t("amateur_logits", 2, 50), 0.1, 1, 1.0, 1.0, 0, 50,
            t("allowed_mask", 50, dtype=torch.bool, fill=True), 1, t("seeds", 2, dtype=torch.int64), 0,
            t("step_tensor", dtype=torch.int64)),
    }


_META_CASES = [(op, arg) for op, args in {
    "vq_nearest": ("z", "codebook"), "vq_embed": ("indices", "codebook"),
    "flash_attn_forward": ("q", "k", "v"), "flash_attn_backward": ("dout", "k", "lse"),
    "flash_attn_varlen_forward": ("v", "cu_seqlens_q"), "flash_attn_varlen_backward": ("out", "cu_seqlens_k"),
    "flash_attn_kvcache": ("k_cache", "k", "cache_seqlens"),
    "cfg_sample": ("logits", "allowed_mask", "seeds", "step_tensor"),
    "contrastive_sample": ("amateur_logits", "seeds", "step_tensor"),
}.items() for arg in args]


@pytest.mark.parametrize(("op", "meta"), _META_CASES)
def test_raw_ops_reject_meta_mixed_with_cpu(op, meta):
    with pytest.raises(ValueError, match=rf"cm3leon::{op}: tensors must be on one device.*{meta} on meta"):
        _raw_calls(meta)[op]()


def test_raw_ops_on_meta_only_still_give_shapes():
    qkv = (torch.empty(2, 5, 4, 16, device="meta") for _ in range(3))
    out, lse = ops.flash_attn_forward(*qkv, 0.25, True)
    assert out.device.type == "meta" and lse.shape == (2, 4, 5)
    z, codebook = torch.empty(7, 8, device="meta"), torch.empty(3, 8, device="meta")
    indices, distance = ops.vq_nearest(z, codebook, "l2")
    assert indices.shape == (7,) and indices.device.type == "meta"


def test_step_tensor_device_is_checked():
    logits = torch.randn(3, 50)
    with pytest.raises(ValueError, match="step tensor must be on the CPU or the logits' device"):
        ck.contrastive_sample(logits, logits, seed=1, step=torch.tensor(0, device="meta"))
    with pytest.raises(ValueError, match="step tensor must be on the CPU"):
        ck.cfg_sample(logits[:, None], guidance_scale=None, seed=1, step=torch.tensor(0, device="meta"))
    # The CPU step tensor still works and matches the int form.
    assert torch.equal(ck.cfg_sample(logits[:, None], guidance_scale=None, seed=1, step=torch.tensor(3)),
                       ck.cfg_sample(logits[:, None], guidance_scale=None, seed=1, step=3))


# ---- 3. non-finite scales ------------------------------------------------------------------------------

@pytest.mark.parametrize("scale", [float("nan"), float("inf"), -float("inf"), 1e300])
def test_raw_attention_rejects_non_finite_softmax_scale(scale):
    q = torch.randn(1, 4, 2, 16)
    with pytest.raises(ValueError, match="softmax_scale must be a finite number"):
        ops.flash_attn_forward(q, q, q, scale, False)
    with pytest.raises(ValueError, match="softmax_scale must be a finite number"):
        ops.flash_attn_backward(q, q, q, q, q, torch.zeros(1, 2, 4), scale, False)
    cu = torch.tensor([0, 4], dtype=torch.int32)
    with pytest.raises(ValueError, match="softmax_scale must be a finite number"):
        ops.flash_attn_varlen_forward(q[0], q[0], q[0], cu, cu, 4, 4, scale, False)
    cache = torch.zeros(1, 8, 2, 16)
    with pytest.raises(ValueError, match="softmax_scale must be a finite number"):
        ops.flash_attn_kvcache(q[:, :1], cache, cache.clone(), q[:, :1], q[:, :1],
                               torch.zeros(1, dtype=torch.int32), 0, scale, True)
    assert not cache.any(), "the cache was written before the scale was checked"


def test_raw_cfg_rejects_non_finite_guidance_scale():
    with pytest.raises(ValueError, match="guidance_scale must be finite"):
        ops.cfg_sample(torch.randn(2, 2, 10), [float("nan")], 1.0, 0, 1.0, 0.0, 0, 10, None, 0, None, 0, None)


@pytest.mark.parametrize("scale", ["x", "0.5", True, [0.5]])
def test_softmax_scale_of_the_wrong_type_names_the_argument(scale):
    q = torch.randn(1, 4, 2, 16)
    with pytest.raises(TypeError, match="softmax_scale must be a number"):
        ck.flash_attn_func(q, q, q, softmax_scale=scale)
    with pytest.raises(TypeError, match="softmax_scale must be a number"):
        ck.flash_attn_with_kvcache(q, q.clone(), q.clone(), softmax_scale=scale)


# ---- 7. threads follow torch.set_num_threads, also in new Python threads -------------------------------

def test_kernels_follow_torch_thread_setting_in_new_threads():
    # OMP_NUM_THREADS=4 makes OpenMP's own default 4 in every new thread; torch says 1. A kernel that used
    # OpenMP's value would start worker threads (the process's thread count grows); ours must not.
    result = run_isolated("""
        import os, threading, torch, cm3leon_kernels as ck
        torch.set_num_threads(1)
        def count():
            return len(os.listdir("/proc/self/task"))
        z, codebook = torch.randn(4096, 64), torch.randn(512, 64)
        q = torch.randn(2, 512, 4, 64)
        logits = torch.randn(2, 1, 300_000)
        def work(results):
            before = count()
            ck.vq_nearest(z, codebook)
            ck.flash_attn_func(q, q, q, causal=True)
            ck.cfg_sample(logits, guidance_scale=None, seed=0, step=0)
            results.append((before, count()))
        results = []
        t = threading.Thread(target=work, args=(results,))
        t.start(); t.join()
        print("threads", *results[0])
    """, env={"OMP_NUM_THREADS": "4"})
    assert result.returncode == 0, result.stderr[-2000:]
    before, after = map(int, result.stdout.split()[1:3])
    assert after == before, f"the kernels started {after - before} OpenMP workers with torch at 1 thread"


# ---- 8. cosine search with huge (finite) code norms ------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cosine_nearest_with_norms_that_overflow_float32_when_squared(dtype):
    # Every code's squared norm over- or underflows float32; the first row is the reported case.
    z = torch.tensor([[1.0, 0.5], [-3e38, -1e38], [-1.0, -1.2], [1e-40, 2e-40]]).to(dtype)
    codebook = torch.tensor([[1e30, 0.0], [0.0, 1e-25], [-3e38, -3e38], [-2e-40, 0.0]]).to(dtype)
    indices, distance = ck.vq_nearest(z, codebook, metric="cosine")
    ref_indices, ref_distance = reference.vq_nearest(z.double(), codebook.double(), metric="cosine")
    assert indices.tolist() == ref_indices.tolist() == [0, 3, 2, 1]
    torch.testing.assert_close(distance, ref_distance.float(), atol=1e-6, rtol=0)


def test_cosine_nearest_huge_norms_against_reference_on_random_scales():
    gen = torch.Generator().manual_seed(3)
    codebook = torch.randn(40, 16, generator=gen) * torch.logspace(-30, 37, 40)[:, None]
    z = torch.randn(64, 16, generator=gen) * torch.logspace(-30, 37, 64)[:, None]
    indices, _ = ck.vq_nearest(z, codebook, metric="cosine")
    ref_indices, _ = reference.vq_nearest(z.double(), codebook.double(), metric="cosine")
    assert torch.equal(indices, ref_indices)


def test_vector_quantize_beta_as_a_huge_int():
    z, codebook = torch.randn(5, 4), torch.randn(3, 4)
    assert torch.isfinite(ck.vector_quantize(z, codebook, beta=2 ** 70).loss)  # used to raise OverflowError
    with pytest.raises(ValueError, match="beta must be a finite non-negative number"):
        ck.vector_quantize(z, codebook, beta=10 ** 400)
