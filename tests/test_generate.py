"""Generation core: prefill + cached decode with cfg_sample / contrastive_sample."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from model_fixtures import small_model

from cm3leon.generate import SamplingOptions, generate

GREEDY = SamplingOptions(temperature=0.0)


def _greedy_reference(model, prompt, n, uncond=None, scale=1.0):
    """Token-by-token argmax with full (uncached) forwards, mixing streams as CFG does."""
    seq, useq, out = list(prompt), list(uncond or []), []
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([seq]))[0, -1]
            if uncond is not None:
                u = model(torch.tensor([useq]))[0, -1]
                logits = u + scale * (logits - u)
            token = int(logits.argmax())
            out.append(token)
            seq.append(token)
            useq.append(token)
    return out


@pytest.mark.parametrize("layout", ["cm3leon", "chameleon"])
def test_greedy_generation_matches_uncached_argmax_with_ragged_prompts(layout):
    model = small_model(layout)
    prompts = [[5, 9, 1, 33], [7], [2, 2, 2, 2, 2, 2, 80]]
    got = generate(model, prompts, max_new_tokens=6, options=GREEDY)
    assert got == [_greedy_reference(model, p, 6) for p in prompts]


def test_cfg_streams_decode_as_rows_of_one_batch():
    model = small_model("chameleon")
    prompts, uncond = [[5, 9, 1, 33], [7, 8]], [[3], [3, 3, 3]]
    options = SamplingOptions(temperature=0.0, guidance_scale=2.5)
    got = generate(model, prompts, unconditional_prompts=uncond, max_new_tokens=5, options=options)
    assert got == [_greedy_reference(model, p, 5, u, 2.5) for p, u in zip(prompts, uncond)]


def test_per_request_seeds_make_requests_independent_of_their_batch():
    model = small_model("cm3leon")
    options = SamplingOptions(temperature=1.0, top_p=0.95)
    both = generate(model, [[1, 2, 3], [4, 5]], max_new_tokens=8, options=options, seeds=[11, 22])
    alone = generate(model, [[4, 5]], max_new_tokens=8, options=options, seeds=[22])
    assert both[1] == alone[0]
    again = generate(model, [[1, 2, 3], [4, 5]], max_new_tokens=8, options=options, seeds=[11, 22])
    assert again == both
    other = generate(model, [[1, 2, 3], [4, 5]], max_new_tokens=8, options=options, seeds=[12, 23])
    assert other != both


def test_integer_scalar_seed():
    """A numpy integer seed means the same as the int (it used to fail with "not iterable"); floats raise."""
    model = small_model("cm3leon")
    options = SamplingOptions(temperature=1.0)
    assert generate(model, [[1, 2], [3]], max_new_tokens=4, options=options, seeds=np.int64(7)) == \
        generate(model, [[1, 2], [3]], max_new_tokens=4, options=options, seeds=7)
    with pytest.raises(TypeError, match="seeds must be an int"):
        generate(model, [[1, 2]], max_new_tokens=4, options=options, seeds=7.0)


@pytest.mark.parametrize("seeds,error", [([0.5], TypeError), ([True], TypeError), ("7", TypeError),
                                         ([1 << 63], ValueError)])
def test_per_request_seeds_must_be_int64_ints(seeds, error):
    # converted with torch.as_tensor, a float seed was truncated and a bool taken as 0/1 without a word
    with pytest.raises(error, match="seeds"):
        generate(small_model("cm3leon"), [[1, 2]], max_new_tokens=2, seeds=seeds)


def test_stop_tokens_and_allowed_range():
    model = small_model("cm3leon")
    first = generate(model, [[1, 2, 3]], max_new_tokens=8, options=GREEDY)[0]
    for token in first:  # stopping at a token returns what came before its first occurrence
        got = generate(model, [[1, 2, 3]], max_new_tokens=8, options=GREEDY, stop_tokens=[token])[0]
        assert got == first[:first.index(token)]
    unseen = next(t for t in range(97) if t not in first)
    assert generate(model, [[1, 2, 3]], max_new_tokens=8, options=GREEDY, stop_tokens=[unseen])[0] == first
    restricted = SamplingOptions(temperature=1.0, allowed_range=(40, 50))
    tokens = generate(model, [[1], [2]], max_new_tokens=10, options=restricted, seeds=3)
    assert all(40 <= t < 50 for row in tokens for t in row) and all(len(row) == 10 for row in tokens)


def test_three_stream_instruct_cfg_and_contrastive_decoding_run():
    model = small_model("chameleon")
    three = SamplingOptions(temperature=0.0, guidance_scale=(1.5, 7.5))
    out = generate(model, [[4, 5, 6]], unconditional_prompts=[[3]], image_conditional_prompts=[[3, 6]],
                   max_new_tokens=4, options=three)
    assert len(out[0]) == 4
    cd = SamplingOptions(contrastive=True, cd_alpha=0.1, cd_k=3, temperature=1.0)
    a = generate(model, [[4, 5, 6]], unconditional_prompts=[[3]], max_new_tokens=6, options=cd, seeds=5)
    assert a == generate(model, [[4, 5, 6]], unconditional_prompts=[[3]], max_new_tokens=6, options=cd, seeds=5)


@pytest.mark.parametrize("kwargs,match", [
    (dict(prompts=[[1]], max_new_tokens=0), "max_new_tokens"),
    (dict(prompts=[[]], max_new_tokens=2), "at least one token"),
    (dict(prompts=[[1]], max_new_tokens=64), "exceeds the model's max_seq_len"),
    (dict(prompts=[[1], [2]], unconditional_prompts=[[3]], max_new_tokens=2), "one prompt per request"),
    (dict(prompts=[[1]], max_new_tokens=2, seeds=[1, 2]), "one seed per request"),
    (dict(prompts=[[1]], max_new_tokens=2, options=SamplingOptions(contrastive=True)), "unconditional"),
    (dict(prompts=[[1, 200]], max_new_tokens=2), "tokens must be in"),
])
def test_bad_requests_raise_clear_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        generate(small_model("cm3leon"), **kwargs)


def _host_reads(monkeypatch, run) -> int:
    """How many times ``run`` reads a tensor value back to the host (bool/int/float/item/tolist)."""
    count = [0]
    for name in ("__bool__", "__int__", "__float__", "__index__", "item", "tolist"):
        original = getattr(torch.Tensor, name)

        def counting(self, *args, _original=original, **kwargs):
            count[0] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counting)
    run()
    monkeypatch.undo()
    return count[0]


def test_decode_loop_reads_nothing_back_per_token(monkeypatch):
    """Host reads do not grow with the number of decoded tokens, except one stop check every n steps."""
    model = small_model("cm3leon")
    options = SamplingOptions(temperature=1.0)
    reads = {n: _host_reads(monkeypatch, lambda n=n: generate(model, [[1, 2, 3], [4, 5]], max_new_tokens=n,
                                                               unconditional_prompts=[[3], [3]], options=options,
                                                               stop_tokens=[96], stop_check_every=8))
             for n in (8, 40)}
    assert reads[40] - reads[8] <= 4  # 40 // 8 - 8 // 8 stop checks


def test_mixed_per_request_options_match_separate_calls():
    """Half the requests with CFG + top-p and half with CD-K in one batch give each request's own output."""
    model = small_model("cm3leon")
    topp = SamplingOptions(temperature=1.0, top_p=0.9, guidance_scale=2.0)
    cdk = SamplingOptions(temperature=1.0, contrastive=True, cd_k=3)
    prompts, uncond = [[1, 2, 3], [4, 5, 6], [7, 8, 9]], [[3], [3], [3]]
    mixed = generate(model, prompts, unconditional_prompts=uncond, max_new_tokens=6, options=[topp, cdk, topp],
                     seeds=[1, 2, 3])
    for i, o in enumerate([topp, cdk, topp]):
        assert mixed[i] == generate(model, [prompts[i]], unconditional_prompts=[uncond[i]], max_new_tokens=6,
                                    options=o, seeds=[i + 1])[0]
    with pytest.raises(ValueError, match="one SamplingOptions or one per request"):
        generate(model, prompts, max_new_tokens=2, options=[topp])


def test_allowed_mask_restricts_every_request():
    model = small_model("cm3leon")
    mask = torch.zeros(97, dtype=torch.bool)
    mask[[5, 17, 60]] = True
    out = generate(model, [[1], [2]], max_new_tokens=12, options=SamplingOptions(temperature=1.0), seeds=4,
                   allowed_mask=mask)
    assert {t for row in out for t in row} <= {5, 17, 60}
    with pytest.raises(ValueError, match="allowed_mask"):
        generate(model, [[1]], max_new_tokens=2, allowed_mask=mask[:50])


def test_compiled_decode_step_matches_eager():
    from cm3leon.generate import compile_decode_step

    model = small_model("chameleon")
    options = SamplingOptions(temperature=1.0, top_p=0.9, guidance_scale=2.0)
    kwargs = dict(unconditional_prompts=[[3], [3, 4]], max_new_tokens=6, options=options, seeds=[5, 6])
    eager = generate(model, [[1, 2, 3], [4, 5]], **kwargs)
    step = compile_decode_step(model, backend="aot_eager")
    assert generate(model, [[1, 2, 3], [4, 5]], decode_step=step, **kwargs) == eager


def test_shared_allowed_range_computes_only_those_logits_and_samples_the_same():
    """With one allowed_range for every request, the output layer computes that slice only; greedy picks
    are the full logits' argmax inside the range, and sampled tokens match a masked full-vocabulary call."""
    model = small_model("cm3leon")
    prompt, lo, hi = [5, 9, 1], 40, 70
    seq, want = list(prompt), []
    with torch.no_grad():
        for _ in range(5):
            token = lo + int(model(torch.tensor([seq]))[0, -1, lo:hi].argmax())
            want.append(token)
            seq.append(token)
    got = generate(model, [prompt], max_new_tokens=5, options=SamplingOptions(temperature=0.0, allowed_range=(lo, hi)))
    assert got == [want]
    mask = torch.zeros(97, dtype=torch.bool)
    mask[lo:hi] = True
    options = SamplingOptions(temperature=1.0, top_p=0.9, allowed_range=(lo, hi))
    sliced = generate(model, [prompt, [7, 7]], max_new_tokens=8, options=options, seeds=3)
    assert sliced == generate(model, [prompt, [7, 7]], max_new_tokens=8, options=options, seeds=3, allowed_mask=mask)
    with pytest.raises(ValueError, match="allowed_range"):
        generate(model, [prompt], max_new_tokens=2, options=SamplingOptions(allowed_range=(40, 98)))


def test_identical_prompts_are_prefilled_once_with_the_same_results(monkeypatch):
    model = small_model("chameleon")
    prompts, uncond = [[5, 9, 1, 33], [5, 9, 1, 33], [7, 8]], [[3]] * 3
    options = SamplingOptions(temperature=0.0, guidance_scale=2.5)
    batches = []
    real = model.step_hidden
    monkeypatch.setattr(model, "step_hidden", lambda tokens, cache, **kw: batches.append(tokens.shape) or
                        real(tokens, cache, **kw))
    got = generate(model, prompts, unconditional_prompts=uncond, max_new_tokens=5, options=options)
    assert batches[0] == (3, 4)  # distinct rows: [3], [5, 9, 1, 33], [7, 8]
    assert got == [_greedy_reference(model, p, 5, u, 2.5) for p, u in zip(prompts, uncond)]


@pytest.mark.parametrize("kwargs,error,match", [
    # converted with torch.tensor(dtype=long), float ids were truncated and bools taken as 0/1 without a word
    (dict(prompts=[[1.7, 2.2]]), TypeError, r"prompts\[0\]\[0\] must be an int"),
    (dict(prompts=[[1, True]]), TypeError, r"prompts\[0\]\[1\] must be an int"),
    (dict(prompts=[[1]], unconditional_prompts=[[0.5]]), TypeError, r"unconditional_prompts\[0\]\[0\]"),
    (dict(prompts=["ab"]), TypeError, r"prompts\[0\] must be a sequence"),
    (dict(prompts=[[1]], stop_tokens=[2.5]), TypeError, r"stop_tokens\[0\] must be an int"),
    (dict(prompts=[[1]], stop_tokens=5), TypeError, "stop_tokens must be a sequence"),
    (dict(prompts=[[1]], stop_tokens=[97]), ValueError, r"stop_tokens must be ids in \[0, 97\)"),
    (dict(prompts=[[1]], stop_tokens=[-1]), ValueError, "stop_tokens"),
    (dict(prompts=[[1], [2]], seeds=np.array([1.5, 2.0])), TypeError, r"seeds\[0\] must be an int"),
])
def test_prompt_stop_and_seed_values_are_checked(kwargs, error, match):
    with pytest.raises(error, match=match):
        generate(small_model("cm3leon"), max_new_tokens=2, **kwargs)


def test_array_inputs_and_list_options_mean_the_same_as_python_values():
    model = small_model("cm3leon")
    options = SamplingOptions(temperature=1.0, allowed_range=(40, 50))
    want = generate(model, [[1, 2], [3]], max_new_tokens=3, options=options, seeds=[4, 9], stop_tokens=[45])
    # arrays of seeds used to fail inside operator.index; a list allowed_range as "unhashable type: 'list'"
    assert generate(model, [torch.tensor([1, 2]), np.array([3])], max_new_tokens=np.int64(3),
                    options=SamplingOptions(temperature=1.0, allowed_range=[40, 50]), seeds=np.array([4, 9]),
                    stop_tokens=torch.tensor([45])) == want
    assert generate(model, [[1, 2], [3]], max_new_tokens=3, options=options, seeds=torch.tensor([4, 9]),
                    stop_tokens=[45]) == want
