"""Our safetensors checkpoints and the Hugging Face Chameleon import (parity with transformers)."""
from __future__ import annotations

import json

import pytest
import torch
from model_fixtures import LAYOUTS, small_model

import cm3leon
from cm3leon.checkpoint import load, load_chameleon, save


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_save_load_round_trip(tmp_path, layout):
    model = small_model(layout)
    save(model, tmp_path / "m.safetensors")
    loaded = load(tmp_path / "m.safetensors")
    assert loaded.config == model.config
    tokens = torch.randint(0, 97, (2, 10))
    with torch.no_grad():
        assert torch.equal(loaded(tokens), model(tokens))


def test_load_rejects_mismatched_shapes_naming_the_tensor(tmp_path):
    from safetensors.torch import save_file

    model = small_model("cm3leon")
    tensors = {k: v.contiguous() for k, v in model.state_dict().items()}
    tensors["blocks.1.ffn.up.weight"] = torch.zeros(3, 3)
    save_file(tensors, str(tmp_path / "bad.safetensors"),
              metadata={"format": "cm3leon", "config": model.config.to_json()})
    with pytest.raises(ValueError, match=r"blocks\.1\.ffn\.up\.weight.*shape \(3, 3\)"):
        load(tmp_path / "bad.safetensors", verify=False)  # written without checksums
    save_file({"x": torch.zeros(1)}, str(tmp_path / "foreign.safetensors"))
    with pytest.raises(ValueError, match="not a cm3leon checkpoint"):
        load(tmp_path / "foreign.safetensors")



@pytest.mark.parametrize("dtype,error", [("float32", TypeError), (torch.int64, ValueError),
                                         (torch.float64, ValueError)])
def test_load_checks_dtype_before_reading(tmp_path, dtype, error):
    # a string used to reach Module.to and fail with a RuntimeError about device strings
    save(small_model("cm3leon"), tmp_path / "m.safetensors")
    with pytest.raises(error, match="dtype must be"):
        load(tmp_path / "m.safetensors", dtype=dtype)
    assert load(tmp_path / "m.safetensors", dtype=torch.bfloat16).embed.weight.dtype == torch.bfloat16


transformers = pytest.importorskip("transformers")


def _tiny_hf_chameleon(path):
    """A random Chameleon built offline with transformers, norms perturbed so QK-norm affine matters."""
    torch.manual_seed(0)
    image_names = {f"IMGIMG{''.join(chr(65 + int(c)) for c in str(i))}Z": 280 + i for i in range(16)}
    config = transformers.ChameleonConfig(
        vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, vocabulary_map={"<image>": 3, **image_names},
        vq_config={"embed_dim": 8, "num_embeddings": 16, "base_channels": 32, "channel_multiplier": [1],
                   "resolution": 16, "latent_channels": 32, "num_res_blocks": 1})
    hf = transformers.ChameleonForConditionalGeneration(config).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    hf.save_pretrained(path)
    # transformers blanks image-token logits in text mode; CM3Leon generates images, so compare the rest.
    text_ids = torch.ones(300, dtype=torch.bool)
    text_ids[hf.model.vocabulary_mapping.image_tokens] = False
    return hf, text_ids


def _rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours - ref).abs().max() / ref.abs().max()).item()


def test_load_chameleon_matches_transformers_full_and_cached(tmp_path):
    hf, text_ids = _tiny_hf_chameleon(tmp_path)
    model = cm3leon.load_chameleon(tmp_path).eval()
    assert model.config.qk_norm and model.config.positions == "rope" and model.config.kv_heads == 2
    tokens = torch.randint(0, 300, (2, 23))
    with torch.no_grad():
        ref = hf(input_ids=tokens).logits[..., text_ids]
        assert _rel_err(model(tokens)[..., text_ids], ref) < 1e-4
        cache = model.allocate_cache(2, 32)
        steps = [model.step(tokens[:, :15], cache)]
        steps += [model.step(tokens[:, t:t + 1], cache) for t in range(15, 23)]
        assert _rel_err(torch.cat(steps, dim=1)[..., text_ids], ref) < 1e-4


def test_load_chameleon_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_chameleon(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="model_type"):
        load_chameleon(tmp_path)
