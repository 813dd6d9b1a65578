"""Every CPU instruction-set level this machine runs, against the same float64 oracles and FA rule.

Each level's kernel bodies are separate code (AVX2 and AVX-512 micro-kernels have different tiles), so each
is run on its own: the ``isa`` fixture re-selects the level in-process (as ``CM3LEON_CPU_ISA`` would at load
time) and asserts that every op reports the level it should take, so no test can pass by running another
path. A level this CPU lacks is skipped with a reason naming the missing features; the subprocess tests
check the environment variable itself.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import cm3leon_kernels as ck
from cm3leon_kernels import _C
from cm3leon_kernels import reference as ref

from attention_checks import KV_CASES, check_against_reference, check_kvcache_case, cu_seqlens, random_tensor
from helpers import FLOAT_DTYPES
from vq_checks import check_nearest

LEVELS = ["baseline", "avx2", "avx512", "avx512_bf16", "amx_bf16"]
# The features each level needs (beyond the level below it), as cpu_features()["cpu"] names them.
NEEDS = {"baseline": [], "avx2": ["avx2", "fma", "f16c"],
         "avx512": ["avx512f", "avx512dq", "avx512bw", "avx512vl"], "avx512_bf16": ["avx512_bf16"],
         "amx_bf16": ["amx_bf16"]}
# The highest level each kernel family has a body for (csrc/*/..._cpu.h).
FAMILY_TOP = {"flash_attn_forward": "amx_bf16", "flash_attn_backward": "amx_bf16",
              "flash_attn_kvcache": "amx_bf16", "flash_attn_varlen_forward": "amx_bf16",
              "flash_attn_varlen_backward": "amx_bf16",
              "vq_nearest": "amx_bf16", "vq_embed": "amx_bf16",
              "cfg_sample": "avx2", "contrastive_sample": "avx2",
              "linear_cross_entropy_forward": "amx_bf16", "linear_cross_entropy_backward": "amx_bf16"}


def _expected_path(level: str, op: str) -> str:
    return LEVELS[min(LEVELS.index(level), LEVELS.index(FAMILY_TOP[op]))]


def _needs_own_body(level: str, op: str) -> None:
    """Skips a level at which ``op`` runs the body of a lower level (that level's case covers it)."""
    if _expected_path(level, op) != level:
        pytest.skip(f"{op} runs its {_expected_path(level, op)} body at {level}: covered by that level's case")


@pytest.fixture(params=LEVELS)
def isa(request):
    """Runs the test with the CPU kernels at one level; restores the load-time choice afterwards."""
    level = request.param
    features = ck.cpu_features()
    if level not in features["compiled"]:
        pytest.skip(f"this build did not compile the {level} kernels")
    if level not in features["supported"]:
        missing = [f for lv in LEVELS[:LEVELS.index(level) + 1] for f in NEEDS[lv] if not features["cpu"][f]]
        pytest.skip(f"this CPU lacks {', '.join(missing)} (needed by the {level} kernels)")
    _C._force_cpu_isa(level)
    try:
        features = ck.cpu_features()
        assert features["isa"] == level
        for op, path in features["ops"].items():
            assert path == _expected_path(level, op), f"{op} runs {path} under {level}"
        yield level
    finally:
        _C._force_cpu_isa(os.environ.get("CM3LEON_CPU_ISA", ""))


# Block edges of every tiling: several query/key blocks, GQA across the backward's key blocks, head dims
# that pad differently under 16- and 32-column tiles (40, 80), the decode path, head dim 256.
ATTENTION_CASES = [  # batch, seqlen_q, seqlen_k, heads_q, heads_kv, head_dim, causal
    (1, 130, 130, 2, 2, 32, True),
    (1, 311, 301, 4, 2, 40, True),
    (1, 53, 99, 8, 2, 80, False),
    (2, 5, 70, 4, 2, 64, True),
    (1, 70, 21, 3, 1, 96, True),
    (1, 3, 300, 4, 1, 64, True),
    (1, 40, 40, 2, 1, 256, True),
]
DTYPES = FLOAT_DTYPES


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[1])
@pytest.mark.parametrize("case", ATTENTION_CASES, ids=lambda c: "-".join(map(str, c)))
def test_attention_forward_backward(isa, case, dtype):
    _needs_own_body(isa, "flash_attn_forward")
    b, sq, sk, hq, hkv, d, causal = case
    q = random_tensor(b, sq, hq, d, dtype=dtype)
    k, v = random_tensor(b, sk, hkv, d, dtype=dtype), random_tensor(b, sk, hkv, d, dtype=dtype)
    check_against_reference(lambda q, k, v: ck.flash_attn_func(q, k, v, causal=causal, return_lse=True),
                             lambda q, k, v: ref.attention(q, k, v, causal=causal), (q, k, v), dtype,
                             f"{isa} {case}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: str(d).split(".")[1])
def test_attention_dropout(isa, dtype):
    """Each level's dropout path (mask generation, dropped P V, the backward's masked dP) against the float64
    reference given the mask of flash_attn_dropout_mask."""
    _needs_own_body(isa, "flash_attn_forward")
    q = random_tensor(2, 150, 4, 40, dtype=dtype)
    k, v = random_tensor(2, 170, 2, 40, dtype=dtype), random_tensor(2, 170, 2, 40, dtype=dtype)
    seed = torch.tensor(77, dtype=torch.int64)
    mask = torch.ops.cm3leon.flash_attn_dropout_mask(seed, 2, 4, 150, 170, 0.3)
    forward = torch.ops.cm3leon.flash_attn_forward
    check_against_reference(lambda q, k, v: forward(q, k, v, 0.15, True, dropout_p=0.3, dropout_seed=seed),
                            lambda q, k, v: ref.attention(q, k, v, 0.15, True, dropout_p=0.3, dropout_mask=mask),
                            (q, k, v), dtype, f"{isa} dropout")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: str(d).split(".")[1])
def test_attention_varlen(isa, dtype):
    _needs_own_body(isa, "flash_attn_varlen_forward")
    lengths = [37, 1, 150]
    cu = cu_seqlens(lengths)
    q, k, v = (random_tensor(sum(lengths), h, 64, dtype=dtype) for h in (4, 2, 2))
    run = lambda q, k, v: ck.flash_attn_varlen_func(q, k, v, cu, cu, max(lengths), max(lengths),  # noqa: E731
                                                    causal=True, return_lse=True)
    run_ref = lambda q, k, v: ref.attention_varlen(q, k, v, cu, cu, causal=True)  # noqa: E731
    check_against_reference(run, run_ref, (q, k, v), dtype, f"{isa} varlen")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: str(d).split(".")[1])
def test_attention_kvcache(isa, dtype):
    _needs_own_body(isa, "flash_attn_kvcache")
    for case in KV_CASES:
        check_kvcache_case(case, dtype, "cpu")


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[1])
@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("n,k,d", [(7, 17, 9), (97, 300, 64), (200, 33, 257), (13, 1000, 100)])
def test_vq_nearest(isa, n, k, d, metric, dtype):
    check_nearest(torch.randn(n, d).to(dtype), torch.randn(k, d).to(dtype), metric)


def test_vq_embed(isa):
    codebook = torch.randn(50, 24).to(torch.bfloat16)
    indices = torch.randint(0, 50, (300,))
    assert torch.equal(ck.vq_embed(indices, codebook), codebook[indices])


def test_sampling_draws_the_same_tokens_on_every_level(isa):
    """The samplers' vector and scalar paths run the same fp32 operations: identical tokens and logprobs."""
    _needs_own_body(isa, "cfg_sample")
    logits = torch.randn(6, 2, 3000) * 3
    tokens, logprobs = ck.cfg_sample(logits, guidance_scale=2.5, temperature=0.8, top_k=200, top_p=0.9,
                                     seed=7, step=3, return_logprobs=True)
    _C._force_cpu_isa("baseline")
    tokens0, logprobs0 = ck.cfg_sample(logits, guidance_scale=2.5, temperature=0.8, top_k=200, top_p=0.9,
                                       seed=7, step=3, return_logprobs=True)
    assert torch.equal(tokens, tokens0)
    assert torch.equal(logprobs, logprobs0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: str(d).split(".")[1])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_linear_cross_entropy(isa, reduction, dtype):
    """Chunks, vocabulary blocks and dimensions that pad differently under 16- and 32-column tiles."""
    from test_loss import OPTIONS, _check

    _needs_own_body(isa, "linear_cross_entropy_forward")
    _check(200, 40, 301, dtype, reduction, OPTIONS["all"], eps=1e-5 if dtype == torch.float32 else 1e-3)


def _run_with_isa(value: str, code: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, CM3LEON_CPU_ISA=value)
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)


def test_environment_variable_selects_the_level():
    level = ck.cpu_features()["supported"][-1]
    code = "import cm3leon_kernels as ck; f = ck.cpu_features(); print(f['isa'], f['ops']['vq_nearest'])"
    done = _run_with_isa(level, code)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [level, _expected_path(level, "vq_nearest")]


def test_unknown_level_fails_at_import():
    done = _run_with_isa("avx1024", "import cm3leon_kernels")
    assert done.returncode != 0
    assert "ValueError" in done.stderr and "CM3LEON_CPU_ISA" in done.stderr and "avx1024" in done.stderr


def test_default_is_the_highest_supported_level():
    features = ck.cpu_features()
    if "CM3LEON_CPU_ISA" in os.environ:
        pytest.skip("CM3LEON_CPU_ISA is set")
    assert features["isa"] == features["supported"][-1]
    assert features["compiled"][0] == "baseline"
    assert features["emulated"] is False  # only CM3LEON_EMULATE_ISA=1 test builds emulate levels
    for level in features["supported"]:
        assert all(features["cpu"][f] for f in NEEDS[level])


def test_vector_registers_only_in_level_code():
    """No function outside a level's own code uses ymm/zmm registers: library code instantiated at several
    levels (std::vector, ...) must come from the baseline objects, or an AVX2 host could run AVX-512 code."""
    import shutil

    objdump = shutil.which("objdump")
    if objdump is None:
        pytest.skip("objdump is not installed")
    listing = subprocess.run([objdump, "-d", "-C", "--no-show-raw-insn", _C.__file__], capture_output=True,
                             text=True, check=True).stdout
    levels = ("(cm3leon::Isa)1>", "(cm3leon::Isa)2>", "(cm3leon::Isa)3>", "(cm3leon::Isa)4>")
    allowed = {"ymm": ("isa_avx2", "isa_avx512", "isa_amx", *levels),
               "zmm": ("isa_avx512", "isa_amx", *levels[1:]), "tmm": ("isa_amx", *levels[3:])}
    function, offenders = "", set()
    for line in listing.splitlines():
        if line.endswith(">:"):
            function = line
        for register, owners in allowed.items():
            if f"%{register}" in line and not any(owner in function for owner in owners):
                offenders.add(function)
    assert not offenders, f"vector registers outside level code: {sorted(offenders)[:5]}"
