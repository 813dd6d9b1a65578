"""The KV-cache op's FlashAttention 2.8 features (rotary, paged blocks, cache_batch_idx, cache_leftpad, local
windows, softcap, ALiBi, num_splits, any head dim) through the raw torch.ops entry point, against a float64
reference built from plain torch, with every cache position the op must not read poisoned with NaN."""
from __future__ import annotations

import random

import pytest
import torch

import cm3leon_kernels as ck
from cm3leon_kernels._native import ops

from helpers import assert_fa_rule, poisoned_outputs
from kvcache_reference import logical_rows, reference

EPS = {torch.float32: 1e-5, torch.bfloat16: 1e-3, torch.float16: 1e-4}
ULP = {torch.float32: 2.0 ** -23, torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}
BITS = {2: torch.int16, 4: torch.int32}


def make_case(rng: random.Random, *, dtype=torch.float32, d=64, hq=4, hkv=2, b=3, sq=1, new=1, capacity=None,
              page=None, batch_idx=False, leftpad=False, rotary=None, rotary_dim=None, causal=True,
              window=(-1, -1), softcap=0.0, alibi=None, num_splits=0):
    """Random inputs; every cache element the op must not read (and every slot it will write) is NaN."""
    capacity = capacity or rng.randint(max(new, 1), 300)
    seqlens = torch.tensor([rng.randint(0, capacity - new) for _ in range(b)], dtype=torch.int32)
    lp = torch.tensor([rng.randint(0, int(s)) for s in seqlens], dtype=torch.int32) if leftpad else None
    block_table = idx = None
    if page is not None:
        per_row = -(-capacity // page)
        num_blocks = b * per_row + rng.randint(0, 3)
        block_table = torch.randperm(num_blocks)[:b * per_row].view(b, per_row).to(torch.int32)
        shape = (num_blocks, page, hkv, d)
        capacity = per_row * page
    else:
        rows = b + (rng.randint(1, 3) if batch_idx else 0)
        if batch_idx:
            idx = torch.randperm(rows)[:b].to(torch.int32)
        shape = (rows, capacity, hkv, d)
    k_cache, v_cache = torch.randn(shape).to(dtype), torch.randn(shape).to(dtype)
    # Poison: positions outside [leftpad, seqlen) of every used row, and whatever no row uses.
    valid = torch.zeros(shape[:2], dtype=torch.bool)
    for i in range(b):
        lo, hi = (int(lp[i]) if lp is not None else 0), int(seqlens[i])
        for pos in range(lo, hi):
            if block_table is not None:
                valid[block_table[i, pos // page], pos % page] = True
            else:
                valid[idx[i] if idx is not None else i, pos] = True
    k_cache[~valid], v_cache[~valid] = float("nan"), float("nan")
    case = {"q": torch.randn(b, sq, hq, d).to(dtype), "k_cache": k_cache, "v_cache": v_cache,
            "k": torch.randn(b, new, hkv, d).to(dtype) if new or rotary else None,
            "v": torch.randn(b, new, hkv, d).to(dtype) if new or rotary else None,
            "seqlens": seqlens, "leftpad": lp, "cache_batch_idx": idx, "block_table": block_table,
            "scale": rng.uniform(0.05, 0.3), "causal": causal, "window": window, "softcap": softcap,
            "alibi": None, "cos": None, "sin": None, "interleaved": rotary == "interleaved", "num_splits": num_splits}
    if alibi is not None:
        case["alibi"] = torch.rand((hq,) if alibi == "heads" else (b, hq)) * 0.3
    if rotary is not None:
        rd = rotary_dim or (d // 2 * 2)
        angle = torch.rand(capacity + sq, rd // 2) * 6.2832
        case["cos"], case["sin"] = angle.cos().to(dtype), angle.sin().to(dtype)
    return case


def run_op(case, device="cpu"):
    """The raw op on `device` (inputs copied there; the caches copied back into the case)."""
    c = {key: t.to(device) if isinstance(t, torch.Tensor) else t for key, t in case.items()}
    out, lse = ops.flash_attn_kvcache(
        c["q"], c["k_cache"], c["v_cache"], c["k"], c["v"], c["seqlens"], 0, c["scale"],
        c["causal"], window_left=c["window"][0], window_right=c["window"][1], softcap=c["softcap"],
        alibi_slopes=c["alibi"], rotary_cos=c["cos"], rotary_sin=c["sin"],
        rotary_interleaved=c["interleaved"], cache_batch_idx=c["cache_batch_idx"],
        cache_leftpad=c["leftpad"], block_table=c["block_table"], num_splits=c["num_splits"])
    case["k_cache"].copy_(c["k_cache"])
    case["v_cache"].copy_(c["v_cache"])
    return out.cpu(), lse.cpu()


def check(case, name, device="cpu"):
    dtype = case["q"].dtype
    before_k, before_v = case["k_cache"].clone(), case["v_cache"].clone()
    out64, lse64, k64, v64 = reference(case, torch.float64)
    outb, lseb, _, _ = reference(case, dtype)
    with poisoned_outputs():
        out, lse = run_op(case, device)
    assert_fa_rule(out, out64, outb, name=f"{name} out", eps=EPS[dtype])
    finite = torch.isfinite(lse64)
    assert torch.equal(torch.isfinite(lse), finite), f"{name}: lse is -inf exactly where no key is visible"
    assert (lse[~finite] == float("-inf")).all() and (out.double()[(~finite).transpose(1, 2)] == 0).all()
    assert_fa_rule(lse[finite], lse64[finite], lseb.float()[finite], name=f"{name} lse", eps=1e-4)
    # The cache: appended slots hold k (rotated, rounded once) and v exactly; every other element is unchanged.
    n = 0 if case["k"] is None else case["k"].shape[1]
    touched = torch.zeros(case["k_cache"].shape[:2], dtype=torch.bool)
    got_k, got_v = logical_rows(case["k_cache"], case), logical_rows(case["v_cache"], case)
    for i, s0 in enumerate(case["seqlens"].tolist()):
        if n == 0:
            continue
        want_k, want_v = k64[i, s0:s0 + n], v64[i, s0:s0 + n]
        assert torch.equal(got_v[i, s0:s0 + n], want_v.to(dtype)), f"{name}: v appended wrong"
        tol = 4 * ULP[dtype] * want_k.abs() + 1e-6
        assert ((got_k[i, s0:s0 + n].double() - want_k).abs() <= tol).all(), f"{name}: k appended wrong"
        for pos in range(s0, s0 + n):
            if case["block_table"] is not None:
                page = case["k_cache"].shape[1]
                touched[case["block_table"][i, pos // page], pos % page] = True
            else:
                idx = case["cache_batch_idx"]
                touched[idx[i] if idx is not None else i, pos] = True
    bits = BITS[case["k_cache"].element_size()]
    for got, before in ((case["k_cache"], before_k), (case["v_cache"], before_v)):
        assert torch.equal(got[~touched].view(bits), before[~touched].view(bits)), f"{name}: cache changed"


# ---- one feature at a time ---------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("interleaved", [True, False])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("sq,new", [(1, 1), (3, 3), (2, 0)])
def test_rotary_rotates_appended_k_and_q(dtype, interleaved, causal, sq, new):
    rng = random.Random(hash((str(dtype), interleaved, causal, sq, new)) % 1000)
    case = make_case(rng, dtype=dtype, d=59, hq=6, hkv=2, sq=sq, new=new, causal=causal,
                     rotary="interleaved" if interleaved else "half", rotary_dim=16 if sq == 3 else None)
    check(case, f"rotary {dtype} interleaved={interleaved} causal={causal} sq={sq} new={new}")


def test_rotary_q_positions_follow_the_window_when_not_causal():
    """Local attention counts as causal for q's rotary positions (cache_seqlens + t, not cache_seqlens)."""
    case = make_case(random.Random(1), sq=3, new=3, hq=2, hkv=2, causal=False, window=(5, 1), rotary="half")
    check(case, "rotary local")


@pytest.mark.parametrize("page", [1, 16, 256])
@pytest.mark.parametrize("sq,new,hq,hkv", [(1, 1, 4, 1), (1, 0, 4, 4), (4, 4, 4, 2), (13, 5, 6, 2)])
def test_paged_cache_reads_pages_through_the_block_table(page, sq, new, hq, hkv):
    rng = random.Random(page * 100 + sq * 10 + new)
    case = make_case(rng, dtype=torch.bfloat16, d=64, hq=hq, hkv=hkv, sq=sq, new=new, page=page,
                     capacity=rng.randint(max(new, 1), 600), leftpad=page == 16)
    check(case, f"paged page={page} sq={sq} new={new} {hq}/{hkv} heads")


@pytest.mark.parametrize("sq,new", [(1, 1), (1, 0), (12, 4)])
def test_cache_batch_idx_picks_cache_rows(sq, new):
    case = make_case(random.Random(sq + new), dtype=torch.float16, sq=sq, new=new, batch_idx=True)
    check(case, f"cache_batch_idx sq={sq} new={new}")


@pytest.mark.parametrize("sq,new,causal", [(1, 1, True), (2, 2, False), (12, 3, True)])
def test_cache_leftpad_hides_the_keys_before_it(sq, new, causal):
    case = make_case(random.Random(7 + sq), sq=sq, new=new, causal=causal, leftpad=True)
    check(case, f"leftpad sq={sq} new={new} causal={causal}")


@pytest.mark.parametrize("sq", [1, 4, 12])
@pytest.mark.parametrize("window,softcap,alibi", [
    ((16, -1), 0.0, None), ((3, 2), 0.0, None), ((-1, 0), 0.0, None), ((0, 0), 0.0, None),
    ((-1, -1), 5.0, None), ((-1, -1), 0.0, "heads"), ((20, 4), 2.0, "batch")])
def test_window_softcap_alibi(sq, window, softcap, alibi):
    rng = random.Random(sq)
    for causal in (False, True):
        case = make_case(rng, dtype=torch.bfloat16, d=64, hq=4, hkv=2, sq=sq, new=min(sq, 2), causal=causal,
                         window=window, softcap=softcap, alibi=alibi, leftpad=True)
        check(case, f"window={window} softcap={softcap} alibi={alibi} sq={sq} causal={causal}")


@pytest.mark.parametrize("d", [1, 3, 8, 59, 111, 256])
def test_any_head_dim_reads_unpadded_rows(d):
    rng = random.Random(d)
    case = make_case(rng, dtype=torch.bfloat16, d=d, hq=4, hkv=1, sq=2, new=2, page=16, rotary="half"
                     if d >= 2 else None)
    check(case, f"head_dim={d}")


@pytest.mark.parametrize("num_splits", [0, 1, 2, 5, 64])
def test_num_splits_changes_only_rounding(num_splits):
    case = make_case(random.Random(3), sq=1, new=1, capacity=1500, num_splits=num_splits, hq=2, hkv=2)
    check(case, f"num_splits={num_splits}")
    case_auto = dict(case, num_splits=0)
    out, lse = run_op(dict(case_auto, k=None, v=None, seqlens=case["seqlens"] + 1))
    out_n, lse_n = run_op(dict(case, k=None, v=None, seqlens=case["seqlens"] + 1))
    assert (out - out_n).abs().max() <= 1e-5 and (lse - lse_n).abs().max() <= 1e-5


@pytest.mark.parametrize("page", [None, 16])
def test_prefill_appends_and_rotates_many_rows(page):
    """A prompt's worth of new tokens (the append and q's rotation then run in parallel; a paged cache is
    gathered for the tiled forward)."""
    case = make_case(random.Random(9), dtype=torch.bfloat16, d=32, hq=4, hkv=2, b=2, sq=90, new=90,
                     capacity=200, page=page, rotary="half", leftpad=True, window=(40, -1))
    check(case, f"prefill page={page}")


def test_random_feature_mix():
    rng = random.Random(2026)
    for trial in range(30):
        d = rng.choice([16, 59, 64, 80, 128])
        hkv = rng.choice([1, 2, 3])
        sq = rng.choice([1, 1, 2, 3, 9])
        page = rng.choice([None, None, 1, 16, 256])
        kw = dict(dtype=rng.choice([torch.float32, torch.bfloat16, torch.float16]), d=d, hkv=hkv,
                  hq=hkv * rng.choice([1, 2, 3]), b=rng.randint(1, 4), sq=sq, new=rng.choice([0, 1, sq]),
                  page=page, batch_idx=page is None and rng.random() < 0.5, leftpad=rng.random() < 0.4,
                  causal=rng.random() < 0.6, softcap=rng.choice([0.0, 0.0, 8.0]),
                  alibi=rng.choice([None, None, "heads", "batch"]), num_splits=rng.choice([0, 0, 1, 3]),
                  window=rng.choice([(-1, -1), (-1, -1), (rng.randint(0, 50), rng.randint(-1, 5))]))
        if rng.random() < 0.5:
            kw.update(rotary=rng.choice(["interleaved", "half"]), rotary_dim=rng.choice([None, 16]))
        check(make_case(rng, **kw), f"trial {trial} {kw}")


needs_cuda = pytest.mark.skipif(not (torch.cuda.is_available() and ck.cuda_built()),
                                reason="needs a CUDA GPU and a CUDA build of cm3leon_kernels")


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cuda_decode_features(dtype):
    """The CUDA decode kernel with every feature: rotary, pages, batch indices, leftpad, splits, windows,
    softcap, ALiBi."""
    rng = random.Random(11)
    for trial in range(16):
        kw = dict(dtype=dtype, d=rng.choice([64, 128]), hq=4, hkv=rng.choice([1, 2, 4]), sq=rng.choice([1, 2]),
                  new=rng.choice([0, 1, 2]), causal=rng.random() < 0.7, num_splits=rng.choice([0, 1, 3]),
                  rotary=rng.choice([None, "interleaved", "half"]), leftpad=rng.random() < 0.5,
                  window=rng.choice([(-1, -1), (rng.randint(0, 40), rng.randint(-1, 3))]),
                  softcap=rng.choice([0.0, 6.0]), alibi=rng.choice([None, "heads", "batch"]))
        if rng.random() < 0.5:
            kw["page"] = rng.choice([1, 16, 256])
        else:
            kw["batch_idx"] = rng.random() < 0.5
        check(make_case(rng, **kw), f"cuda trial {trial} {kw}", device="cuda")


@needs_cuda
@pytest.mark.parametrize("page", [None, 16, 256])
def test_cuda_long_queries_gather_the_rows(page):
    """More than 8 query rows per kv head take the tiled forward over gathered cache rows."""
    case = make_case(random.Random(page or 0), dtype=torch.bfloat16, sq=40, new=40, capacity=300, page=page,
                     batch_idx=page is None, rotary="interleaved", causal=True, window=(64, -1))
    check(case, f"cuda long queries page={page}", device="cuda")


@needs_cuda
def test_cuda_refuses_what_it_lacks():
    case = make_case(random.Random(0), sq=12, new=1, leftpad=True)
    before = case["k_cache"].clone()
    with pytest.raises(NotImplementedError, match="cache_leftpad"):
        run_op(case, "cuda")
    assert torch.equal(case["k_cache"].view(torch.int32), before.view(torch.int32))  # refused before writing
    case = make_case(random.Random(0), d=59, sq=1, new=1)
    with pytest.raises(NotImplementedError, match="multiple of 8"):
        run_op(case, "cuda")


# ---- bad input through the raw op --------------------------------------------------------------------------

def _base():
    case = make_case(random.Random(0), b=2, sq=1, new=1, capacity=32, page=16)
    return case


@pytest.mark.parametrize("mutate,exc,match", [
    (lambda c: c.update(block_table=c["block_table"].long()), TypeError, "block_table must be int32"),
    (lambda c: c.update(block_table=c["block_table"][:1]), ValueError, "block_table must have shape"),
    (lambda c: c["block_table"].__setitem__((0, 0), 10 ** 6), ValueError, r"block_table\[0, 0\]"),
    (lambda c: c["block_table"].__setitem__((1, 0), -1), ValueError, r"block_table\[1, 0\]"),
    (lambda c: c.update(seqlens=torch.tensor([20, 20], dtype=torch.int32),
                        block_table=torch.tensor([[0, 1], [2, 1]], dtype=torch.int32)),
     ValueError, "both append into block 1"),
    # FlashAttention raises RuntimeError naming block_table here (and its test checks the type).
    (lambda c: c.update(seqlens=torch.tensor([32, 0], dtype=torch.int32)), RuntimeError,
     "block_table: row 0 has 2 blocks of 16 positions"),
    (lambda c: c.update(seqlens=torch.tensor([-1, 0], dtype=torch.int32)), ValueError, r"cache_seqlens\[0\]"),
    (lambda c: c.update(leftpad=torch.tensor([40, 0], dtype=torch.int32)), ValueError, r"cache_leftpad\[0\]"),
    (lambda c: c.update(leftpad=torch.tensor([0.0, 0.0])), TypeError, "cache_leftpad must be int32"),
    (lambda c: c.update(cache_batch_idx=torch.tensor([0, 1], dtype=torch.int32)), ValueError,
     "cache_batch_idx must be None with a block_table"),
    (lambda c: c.update(cos=torch.ones(40, 8)), ValueError, "rotary_cos and rotary_sin must be given together"),
    (lambda c: c.update(cos=torch.ones(40, 8, dtype=torch.bfloat16), sin=torch.ones(40, 8, dtype=torch.bfloat16)),
     TypeError, "rotary_cos and rotary_sin must have q's dtype"),
    (lambda c: c.update(cos=torch.ones(40, 40), sin=torch.ones(40, 40)), ValueError, "rotary_dim <= head_dim"),
    (lambda c: c.update(cos=torch.ones(3, 8), sin=torch.ones(3, 8), seqlens=torch.tensor([9, 9], dtype=torch.int32)),
     ValueError, "rotary_cos/rotary_sin have 3 positions but row 0 needs 10"),
    (lambda c: c.update(cos=torch.ones(40, 8), sin=torch.ones(40, 8), k=None, v=None), ValueError,
     "need the new k and v"),
    (lambda c: c.update(alibi=torch.ones(3)), ValueError, "alibi_slopes must be"),
    (lambda c: c.update(alibi=torch.ones(4, dtype=torch.float64)), TypeError, "alibi_slopes must be float32"),
    (lambda c: c.update(window=(-2, -1)), ValueError, "window_left"),
    (lambda c: c.update(softcap=float("nan")), ValueError, "softcap"),
    (lambda c: c.update(num_splits=-1), ValueError, "num_splits"),
])
def test_bad_paged_inputs_raise_naming_the_argument(mutate, exc, match):
    case = _base()
    mutate(case)
    with pytest.raises(exc, match=match):
        run_op(case)


@pytest.mark.parametrize("mutate,exc,match", [
    (lambda c: c["cache_batch_idx"].__setitem__(0, 99), ValueError, r"cache_batch_idx\[0\] = 99"),
    (lambda c: c["cache_batch_idx"].__setitem__(0, -1), ValueError, r"cache_batch_idx\[0\] = -1"),
    (lambda c: c["cache_batch_idx"].__setitem__(1, int(c["cache_batch_idx"][0])), ValueError, "twice"),
    (lambda c: c.update(cache_batch_idx=c["cache_batch_idx"][:1]), ValueError, "cache_batch_idx must have shape"),
    (lambda c: c.update(cache_batch_idx=None), ValueError, "unless cache_batch_idx or block_table"),
    (lambda c: c.update(seqlens=torch.tensor([32, 0], dtype=torch.int32)), ValueError, "overflows the cache"),
])
def test_bad_batch_idx_raises(mutate, exc, match):
    case = make_case(random.Random(0), b=2, sq=1, new=1, capacity=32, batch_idx=True)
    mutate(case)
    with pytest.raises(exc, match=match):
        run_op(case)


def test_duplicate_batch_idx_is_fine_without_appending():
    case = make_case(random.Random(5), b=2, sq=1, new=0, capacity=32, batch_idx=True)
    case["cache_batch_idx"][1] = case["cache_batch_idx"][0]
    case["seqlens"][1] = case["seqlens"][0]
    check(case, "shared cache row, read only")


def test_failed_checks_leave_the_cache_untouched():
    case = _base()
    case["block_table"][1, 0] = 10 ** 6
    before = case["k_cache"].clone()
    with pytest.raises(ValueError):
        run_op(case)
    assert torch.equal(case["k_cache"].view(torch.int32), before.view(torch.int32))
