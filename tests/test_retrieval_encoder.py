"""The dual encoder: attention on cm3leon_kernels, packing without leaks, checkpoints, contrastive training."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import cm3leon_kernels as ck
from cm3leon.data import ShapesCaptions
from cm3leon.integrity import CheckpointError
from cm3leon.model import KERNELS, AttentionBackend
from cm3leon.retrieval import DualEncoder, DualEncoderConfig, contrastive_loss, train_dual_encoder

from retrieval_fixtures import WORLD, tiny_config, tiny_encoder, tokenizer


def _sdpa_func(q, k, v, causal=False, mask=None, **_):
    """The same non-causal attention in plain PyTorch (layout [B, S, H, D])."""
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
                                          is_causal=causal).transpose(1, 2)


def _sdpa_varlen(q, k, v, cu_q, cu_k, max_q, max_k, causal=False, **_):
    """Packed [T, H, D] as one batch row with a block-diagonal mask (captions see only themselves)."""
    doc = torch.repeat_interleave(torch.arange(len(cu_q) - 1), cu_q.diff().long())
    return _sdpa_func(q[None], k[None], v[None], mask=doc[:, None] == doc[None, :])[0]


SDPA = AttentionBackend(_sdpa_func, _sdpa_varlen, None)


def _images(n: int, start: int = 0) -> torch.Tensor:
    return WORLD.images(n, start)


def _ids(n: int, start: int = 0) -> list[list[int]]:
    return [tokenizer().encode(text) for _, text in (ShapesCaptions(WORLD, n, start)[i] for i in range(n))]


def test_attention_runs_through_cm3leon_kernels_and_matches_sdpa():
    calls = {"func": 0, "varlen": 0}

    def func(*args, **kwargs):
        calls["func"] += 1
        return ck.flash_attn_func(*args, **kwargs)

    def varlen(*args, **kwargs):
        calls["varlen"] += 1
        return ck.flash_attn_varlen_func(*args, **kwargs)

    kernels = tiny_encoder(backend=AttentionBackend(func, varlen, None))
    sdpa = DualEncoder(tiny_config(), backend=SDPA).eval()
    sdpa.load_state_dict(kernels.state_dict())
    images, ids = _images(4), _ids(4)
    with torch.no_grad():
        got_i, got_t = kernels.encode_images(images), kernels.encode_texts(ids)
        want_i, want_t = sdpa.encode_images(images), sdpa.encode_texts(ids)
    assert calls == {"func": 1, "varlen": 1}  # one layer per tower, every attention call on the kernels
    default = tiny_encoder()
    assert all(block.attn.backend is KERNELS for tower in (default.image_tower, default.text_tower)
               for block in tower.blocks)
    torch.testing.assert_close(got_i, want_i, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(got_t, want_t, atol=1e-5, rtol=1e-4)


def test_packed_captions_do_not_see_each_other():
    enc = tiny_encoder()
    ids = _ids(5)
    with torch.no_grad():
        batch = enc.encode_texts(ids)
        alone = torch.cat([enc.encode_texts([c]) for c in ids])
    torch.testing.assert_close(batch, alone, atol=1e-5, rtol=1e-5)
    assert torch.allclose(batch.norm(dim=-1), torch.ones(5))


def test_images_are_normalised_batch_independent_and_resized():
    enc = tiny_encoder()
    images = _images(3)
    with torch.no_grad():
        batch = enc.encode_images(images)
        one = enc.encode_images(images[1:2])
        big = enc.encode_images(F.interpolate(images.float(), scale_factor=2).round().to(torch.uint8))
    torch.testing.assert_close(batch[1:2], one, atol=1e-5, rtol=1e-5)
    assert torch.allclose(batch.norm(dim=-1), torch.ones(3))
    assert big.shape == (3, 16)


def test_patch_dropout_keeps_the_stated_fraction_and_is_seeded():
    enc = tiny_encoder()
    seen = []
    enc.image_tower.register_forward_pre_hook(lambda m, args: seen.append(args[1]))
    images = _images(2)
    with torch.no_grad():
        a = enc.encode_images(images, drop=0.2, generator=torch.Generator().manual_seed(1))
        b = enc.encode_images(images, drop=0.2, generator=torch.Generator().manual_seed(1))
        c = enc.encode_images(images)
    keep = seen[0]
    assert keep.shape == (2, 16 - round(0.2 * 16))  # 16 patches, 3 dropped
    assert all(len(set(row.tolist())) == keep.shape[1] for row in keep)
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, c)
    with pytest.raises(ValueError, match="generator"):
        enc.encode_images(images, drop=0.2)


def test_checkpoint_round_trip_and_damaged_file(tmp_path):
    enc = tiny_encoder()
    path = tmp_path / "enc.safetensors"
    enc.save(path)
    back = DualEncoder.load(path)
    assert back.config == enc.config
    with torch.no_grad():
        torch.testing.assert_close(back.encode_texts(_ids(2)), enc.encode_texts(_ids(2)))
    data = path.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"cut\.safetensors: not a readable safetensors file"):
        DualEncoder.load(tmp_path / "cut.safetensors")
    flipped = bytearray(data)
    flipped[-8] ^= 0xFF
    (tmp_path / "flip.safetensors").write_bytes(bytes(flipped))
    with pytest.raises(CheckpointError, match=r"flip\.safetensors: tensor .* fails its checksum"):
        DualEncoder.load(tmp_path / "flip.safetensors")
    other = DualEncoder(tiny_config(embed_dim=8))
    other.save(tmp_path / "other.safetensors")
    assert DualEncoder.load(tmp_path / "other.safetensors").config.embed_dim == 8


def test_infonce_decreases_on_a_tiny_run():
    pairs = ShapesCaptions(WORLD, 64)
    result = train_dual_encoder(tiny_config(), pairs, tokenizer(), steps=25, batch_size=32, lr=3e-3, warmup=5,
                                progress=False, log_every=1)
    first = sum(h["loss"] for h in result.history[:5]) / 5
    last = sum(h["loss"] for h in result.history[-5:]) / 5
    assert last < first - 0.3, (first, last)
    assert not result.encoder.training


def test_temperature_scale_is_capped_at_exactly_100():
    # exp(log 100) in float32 is 100.0000076: the documented cap must still hold.
    enc = tiny_encoder()
    with torch.no_grad():
        enc.logit_scale.fill_(10.0)
    assert enc.temperature_scale().item() <= 100.0
    with torch.no_grad():
        enc.logit_scale.fill_(1.0)
    scale = enc.temperature_scale()
    scale.backward()
    torch.testing.assert_close(enc.logit_scale.grad, scale.detach())  # below the cap: d exp(x) / dx


def test_contrastive_loss_is_symmetric_infonce():
    i = F.normalize(torch.randn(6, 8, dtype=torch.float64), dim=-1)
    t = F.normalize(torch.randn(6, 8, dtype=torch.float64), dim=-1)
    scale = torch.tensor(10.0, dtype=torch.float64)
    logits = scale * i @ t.T
    want = (-logits.log_softmax(1).diag().mean() - logits.log_softmax(0).diag().mean()) / 2
    torch.testing.assert_close(contrastive_loss(i, t, scale), want)


@pytest.mark.parametrize("call, match", [
    (lambda e: e.encode_images(torch.rand(2, 3, 16, 16)), "images must be uint8"),
    (lambda e: e.encode_images(torch.zeros(2, 16, 16, dtype=torch.uint8)), "images must be uint8"),
    (lambda e: e.encode_images([1, 2]), "images must be a torch.Tensor"),
    (lambda e: e.encode_images(torch.zeros(1, 3, 16, 16, dtype=torch.uint8), drop=1.0), "drop must be"),
    (lambda e: e.encode_texts([[1, 2], []]), r"text_ids\[1\] is empty"),
    (lambda e: e.encode_texts([[1, 10**6]]), r"text_ids\[0\] has ids outside"),
    (lambda e: e.encode_texts("abc"), "text_ids must be a list"),
])
def test_bad_input_names_the_argument(call, match):
    with pytest.raises((TypeError, ValueError), match=match):
        call(tiny_encoder())


def test_config_presets_and_validation():
    assert DualEncoderConfig.preset("demo").image_size == 32
    clip = DualEncoderConfig.preset("clip-b32")
    assert (clip.image_size, clip.patch_size, clip.image_width, clip.embed_dim) == (224, 32, 768, 512)
    assert DualEncoderConfig.from_json(clip.to_json()) == clip
    with pytest.raises(ValueError, match="image_width / image_heads"):
        DualEncoderConfig(image_width=30, image_heads=3)
    with pytest.raises(ValueError, match="multiple of patch_size"):
        DualEncoderConfig(image_size=30)
    with pytest.raises(ValueError, match="unknown preset"):
        DualEncoderConfig.preset("huge")
