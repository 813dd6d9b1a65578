"""attn_implementation="cm3leon" in transformers: the same logits, gradients and generate() outputs as "sdpa"
on tiny random Llama, Mistral (sliding window) and Chameleon models, padded batches included."""

from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="transformers is not installed (the 'test' extra)")
pytest.importorskip("transformers.masking_utils", reason="this transformers predates AttentionMaskInterface")

import cm3leon_kernels as ck  # noqa: E402
from cm3leon_kernels.integrations.transformers import NAME, attention_forward, register  # noqa: E402

register()

VOCAB = 96
SMALL = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)


def _llama():
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**SMALL))


def _mistral():  # windows of 5 keys over sequences of up to 14: the window changes logits after position 4
    return transformers.MistralForCausalLM(transformers.MistralConfig(**SMALL, sliding_window=5))


def _chameleon():
    config = transformers.ChameleonConfig(
        **SMALL,
        vocabulary_map={"<image>": 3},
        vq_config={
            "embed_dim": 8,
            "num_embeddings": 16,
            "base_channels": 32,
            "channel_multiplier": [1],
            "resolution": 16,
            "latent_channels": 32,
            "num_res_blocks": 1,
        },
    )
    return transformers.ChameleonForConditionalGeneration(config)


MODELS = {"llama": _llama, "mistral": _mistral, "chameleon": _chameleon}


def _pair(build):
    """The same random weights under "sdpa" and "cm3leon"."""
    torch.manual_seed(0)
    ref = build().eval()
    for name, p in ref.named_parameters():  # perturbed norms so QK-norm affine weights matter (Chameleon)
        if "norm" in name:
            p.data.add_(torch.randn_like(p) * 0.1)
    ours = copy.deepcopy(ref)
    ref.set_attn_implementation("sdpa")
    ours.set_attn_implementation(NAME)
    return ref, ours


def _padded_batch(side: str):
    g = torch.Generator().manual_seed(1)
    lengths, width = [14, 9, 3], 14
    ids = torch.randint(4, VOCAB, (len(lengths), width), generator=g)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, n in enumerate(lengths):
        (mask[row, width - n :] if side == "left" else mask[row, :n]).fill_(1)
    return ids.masked_fill(mask == 0, 0), mask


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("arch", MODELS)
def test_logits_and_gradients_match_sdpa_on_a_padded_batch(arch, side):
    ref, ours = _pair(MODELS[arch])
    ids, mask = _padded_batch(side)
    outs = []
    for model in (ref, ours):
        model.zero_grad()
        logits = model(input_ids=ids, attention_mask=mask).logits
        (logits * mask[..., None]).square().sum().backward()  # padded rows' outputs are arbitrary in both
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        outs.append((logits.detach(), grads))
    (l_ref, g_ref), (l_ours, g_ours) = outs
    valid = mask.bool()
    torch.testing.assert_close(l_ours[valid], l_ref[valid], atol=2e-5, rtol=2e-5)
    assert g_ours.keys() == g_ref.keys() and g_ref
    for name in g_ref:
        torch.testing.assert_close(g_ours[name], g_ref[name], atol=1e-4, rtol=1e-4, msg=name)


@pytest.mark.parametrize("arch", MODELS)
def test_generate_matches_sdpa_with_left_padding(arch):
    ref, ours = _pair(MODELS[arch])
    ids, mask = _padded_batch("left")
    kw = dict(attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=None)
    want = ref.generate(ids, **kw)
    got = ours.generate(ids, **kw)
    assert torch.equal(got, want)


def test_packed_rows_from_position_ids_stay_separate_documents():
    """Padding-free packing (positions restart inside one row) attends per document, as sdpa on each."""
    ref, ours = _pair(_llama)
    g = torch.Generator().manual_seed(2)
    docs = [torch.randint(4, VOCAB, (n,), generator=g) for n in (5, 7, 2)]
    packed = torch.cat(docs)[None]
    positions = torch.cat([torch.arange(len(d)) for d in docs])[None]
    with torch.no_grad():
        got = ours(input_ids=packed, position_ids=positions).logits[0]
        want = torch.cat([ref(input_ids=d[None]).logits[0] for d in docs])
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)


def test_features_it_cannot_honour_raise():
    _, ours = _pair(_llama)
    attn = ours.model.layers[0].self_attn
    q = torch.randn(1, 4, 3, 16)
    k = v = torch.randn(1, 2, 3, 16)
    with pytest.raises(TypeError, match="position_bias"):
        attention_forward(attn, q, k, v, None, position_bias=torch.zeros(1))
    with pytest.raises(NotImplementedError, match="output_attentions"):
        attention_forward(attn, q, k, v, None, output_attentions=True)
    with pytest.raises(NotImplementedError, match="s_aux"):
        attention_forward(attn, q, k, v, None, s_aux=torch.zeros(4))
    with pytest.raises(ValueError, match="2-D"):
        attention_forward(attn, q, k, v, torch.zeros(1, 1, 3, 3))


def test_trainer_loss_kwargs_reach_attention_and_are_accepted():
    # Trainer passes num_items_in_batch (gradient accumulation) to the forward of models taking **kwargs,
    # and models hand every such keyword on to the attention function.
    ref, ours = _pair(_llama)
    ids = torch.randint(4, VOCAB, (2, 6), generator=torch.Generator().manual_seed(4))
    kw = dict(input_ids=ids, labels=ids, num_items_in_batch=torch.tensor(7), output_router_logits=False)
    with torch.no_grad():
        torch.testing.assert_close(ours(**kw).loss, ref(**kw).loss, atol=1e-5, rtol=1e-5)


def test_attention_dropout_while_training_is_flash_attn_dropout():
    _, ours = _pair(_llama)
    attn = ours.model.layers[0].self_attn
    q, k, v = torch.randn(1, 4, 9, 16), torch.randn(1, 2, 9, 16), torch.randn(1, 2, 9, 16)
    torch.manual_seed(6)
    got, _ = attention_forward(attn, q, k, v, None, dropout=0.3)
    torch.manual_seed(6)
    want = ck.flash_attn_func(*(t.transpose(1, 2) for t in (q, k, v)), 0.3, causal=True)
    assert torch.equal(got, want)
    ids = torch.randint(4, VOCAB, (1, 7))
    with torch.no_grad():
        plain = ours(input_ids=ids).logits
        ours.train()
        for layer in ours.model.layers:
            layer.self_attn.attention_dropout = 0.3
        runs = []
        for _ in range(2):
            torch.manual_seed(7)
            runs.append(ours(input_ids=ids).logits)
    assert torch.equal(runs[0], runs[1]), "torch.manual_seed reproduces the dropout"
    assert not torch.allclose(runs[0], plain), "training applies the attention dropout"


def test_cu_seq_lens_arguments_are_honoured():
    """transformers' padding-free kwargs (cu_seq_lens_q/k, max_length_q/k) give per-document attention."""
    _, ours = _pair(_llama)
    attn = ours.model.layers[0].self_attn
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, h, 10, 16, generator=g) for h in (4, 2, 2))
    cu = torch.tensor([0, 6, 10], dtype=torch.int32)
    out, _ = attention_forward(attn, q, k, v, None, cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=6,
                               max_length_k=6)
    for s, e in ((0, 6), (6, 10)):
        want, _ = attention_forward(attn, q[:, :, s:e], k[:, :, s:e], v[:, :, s:e], None)
        torch.testing.assert_close(out[:, s:e], want, atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="together"):
        attention_forward(attn, q, k, v, None, cu_seq_lens_q=cu)
