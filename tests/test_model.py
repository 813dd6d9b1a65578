"""The thin model: layouts, packed training forward, KV-cache decoding, presets, bad input."""
from __future__ import annotations

import pytest
import torch
from model_fixtures import LAYOUTS, small_model

from cm3leon.config import PRESETS, preset
from cm3leon.kv_cache import KVCache
from cm3leon.model import CM3Leon


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_packed_varlen_forward_equals_per_document_forward(layout):
    model = small_model(layout)
    lengths = [5, 0, 13, 1, 9]
    docs = [torch.randint(0, 97, (n,)) for n in lengths]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    with torch.no_grad():
        packed = model(torch.cat(docs), cu_seqlens=cu)
        separate = torch.cat([model(d[None])[0] for d in docs if len(d)])
    torch.testing.assert_close(packed, separate, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_cached_decoding_equals_full_forward_with_ragged_prompts(layout):
    model = small_model(layout)
    seqs = [torch.randint(0, 97, (n,)) for n in (11, 4, 7)]
    prompt_lens = [6, 2, 7]
    cache = model.allocate_cache(3, 16)
    with torch.no_grad():
        # ragged prefill one row at a time via per-row cache lengths, then lockstep decode
        for row, (seq, p) in enumerate(zip(seqs, prompt_lens)):
            sub = model.allocate_cache(1, 16)
            model.step(seq[None, :p], sub)
            cache.k[:, row], cache.v[:, row], cache.seqlens[row] = sub.k[:, 0], sub.v[:, 0], sub.seqlens[0]
        for t in range(4):
            tokens = torch.stack([s[min(p + t, len(s) - 1)] for s, p in zip(seqs, prompt_lens)])[:, None]
            stepped = model.step(tokens, cache)[:, 0]
            for row, (seq, p) in enumerate(zip(seqs, prompt_lens)):
                prefix = torch.cat([seq[:p], torch.stack([seq[min(p + i, len(seq) - 1)] for i in range(t + 1)])])
                full = model(prefix[None])[0, -1]
                torch.testing.assert_close(stepped[row], full, rtol=1e-5, atol=1e-5)
    assert cache.seqlens.tolist() == [p + 4 for p in prompt_lens]


@pytest.mark.parametrize("name,target", [("cm3leon-350m", 350e6), ("cm3leon-760m", 760e6),
                                         ("cm3leon-7b", 7e9), ("chameleon-7b", 7e9)])
def test_paper_presets_have_the_published_sizes(name, target):
    with torch.device("meta"):
        model = CM3Leon(PRESETS[name])
    assert abs(model.num_parameters() - target) / target < 0.05, model.num_parameters()


def test_initialisation_follows_the_paper():
    model = CM3Leon(preset("demo"))
    c = model.config
    w = model.blocks[0].attn.q_proj.weight
    assert w.abs().max() <= 3 * c.init_std + 1e-7 and abs(w.std().item() - c.init_std) < 0.15 * c.init_std
    assert model.blocks[0].attn.o_proj.weight.abs().max() == 0 and model.blocks[0].ffn.down.weight.abs().max() == 0
    assert model.pos_embed.weight.abs().max() <= 3 * c.pos_init_std + 1e-9
    assert model.lm_head is None and not list(model.final_norm.parameters())  # tied, parameter-free norms


def test_bf16_autocast_and_bf16_weights():
    model = small_model("chameleon")
    tokens = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        full = model(tokens)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            auto = model(tokens)
        bf16 = small_model("chameleon").to(torch.bfloat16)(tokens)
    assert auto.dtype == torch.bfloat16 and bf16.dtype == torch.bfloat16
    assert (auto.float() - full).abs().max() < 0.05 * full.abs().max()
    assert (bf16.float() - full).abs().max() < 0.05 * full.abs().max()


def test_torch_compile_fullgraph_training_step():
    model = small_model("chameleon").train()
    tokens = torch.randint(0, 97, (21,))
    cu = torch.tensor([0, 8, 21], dtype=torch.int32)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    loss = torch.nn.functional.cross_entropy(compiled(tokens, cu_seqlens=cu, max_seqlen=13)[:-1], tokens[1:])
    loss.backward()
    eager = torch.nn.functional.cross_entropy(model(tokens, cu_seqlens=cu, max_seqlen=13)[:-1], tokens[1:])
    torch.testing.assert_close(loss, eager)
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("call,error,match", [
    (lambda m: m(torch.tensor([[0, 97]])), ValueError, r"tokens must be in \[0, 97\)"),
    (lambda m: m(torch.tensor([[-1, 3]])), ValueError, "tokens must be in"),
    (lambda m: m(torch.zeros(1, 65, dtype=torch.long)), ValueError, "exceeds max_seq_len"),
    (lambda m: m(torch.zeros(1, 3)), TypeError, "tokens must be int64"),
    (lambda m: m(torch.zeros(5, dtype=torch.long), cu_seqlens=torch.tensor([0, 5])), ValueError, "int32"),
    # malformed lengths used to reach repeat_interleave (RuntimeError, or heap corruption when negative)
    (lambda m: m(torch.zeros(6, dtype=torch.long), cu_seqlens=torch.tensor([0, -2, 6], dtype=torch.int32)),
     ValueError, "non-decreasing"),
    (lambda m: m(torch.zeros(6, dtype=torch.long), cu_seqlens=torch.tensor([0, 4, 2, 6], dtype=torch.int32)),
     ValueError, r"cu_seqlens\[2\] = 2 < 4"),
    (lambda m: m(torch.zeros(6, dtype=torch.long), cu_seqlens=torch.tensor([0, 4, 9], dtype=torch.int32)),
     ValueError, r"cu_seqlens\[-1\] \(9\)"),
    (lambda m: m(torch.zeros(6, dtype=torch.long), cu_seqlens=torch.tensor([1, 6], dtype=torch.int32)),
     ValueError, r"cu_seqlens\[0\] must be 0"),
    (lambda m: m.step(torch.zeros(1, 9, dtype=torch.long), m.allocate_cache(1, 8)), ValueError, "overflow"),
    (lambda m: m.step(torch.zeros(2, 1, dtype=torch.long), m.allocate_cache(1, 8)), ValueError, "batch=1"),
    (lambda m: m.allocate_cache(1, 65), ValueError, "max_seq_len"),
    (lambda m: m.allocate_cache(1, 0), ValueError, "max_len >= 1"),  # 0 used to mean max_seq_len
    (lambda m: m.allocate_cache(-1, 8), ValueError, "batch >= 0"),
    # a cache laid out for another model failed inside a layer (IndexError for fewer layers)
    (lambda m: m.step(torch.zeros(1, 1, dtype=torch.long),
                      KVCache.allocate(1, 1, 8, m.config.kv_heads, m.config.head_dim, dtype=torch.float32,
                                       device="cpu")), ValueError, "cache k/v must be"),
])
def test_bad_input_raises_clear_errors(call, error, match):
    with pytest.raises(error, match=match):
        call(small_model("cm3leon"))


def test_step_accepts_the_empty_batch_allocate_cache_allows():
    model = small_model("cm3leon")
    cache = model.allocate_cache(0, 8)  # the fill-length check used to take max() of no rows
    assert model.step(torch.zeros(0, 3, dtype=torch.long), cache).shape == (0, 3, model.config.vocab_size)


def test_config_validation():
    with pytest.raises(ValueError, match="divisible by n_heads"):
        preset("tiny", d_model=65)
    with pytest.raises(ValueError, match="multiple of n_kv_heads"):
        preset("tiny", n_kv_heads=3)
    with pytest.raises(ValueError, match="unknown preset"):
        preset("gpt-5")
    with pytest.raises(TypeError, match="vocab_size must be an int"):
        preset("tiny", vocab_size=97.0)
    assert preset("tiny", n_layers=3).n_layers == 3


def test_torch_compile_fullgraph_decode_step_mutates_the_cache():
    model = small_model("chameleon")
    compiled_cache, eager_cache = model.allocate_cache(2, 32), model.allocate_cache(2, 32)
    step = torch.compile(model.step, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        for tokens in (torch.tensor([[1, 2, 3], [4, 5, 6]]), torch.tensor([[7], [8]]), torch.tensor([[9], [1]])):
            torch.testing.assert_close(step(tokens, compiled_cache), model.step(tokens, eager_cache))
    assert compiled_cache.seqlens.tolist() == [5, 5]
    assert torch.equal(compiled_cache.k, eager_cache.k) and torch.equal(compiled_cache.v, eager_cache.v)


@pytest.mark.parametrize("batch,max_len,match", [
    (2.0, 8, "batch must be an int"), (True, 8, "batch must be an int"),
    (1, 8.5, "max_len must be an int"), (1, True, "max_len must be an int"),
])
def test_cache_sizes_must_be_ints(batch, max_len, match):
    # floats failed inside torch.zeros without naming the argument; max_len=True gave a one-position cache
    with pytest.raises(TypeError, match=match):
        small_model("cm3leon").allocate_cache(batch, max_len)
