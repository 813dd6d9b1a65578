"""Image tokenizer: shapes, batching, training signal, dead-code restarts, GAN step, checkpoints, bad input.

Uses the "tiny" preset (16x16 -> 4x4 tokens) so the whole file runs in seconds; reaching the demo PSNR is
measured by ``python -m cm3leon.tokenizer.train_image`` (docs/tokenizer.md), not here.
"""
import pytest
import torch

from cm3leon.tokenizer import ImageTokenizer, ImageTokenizerConfig, psnr, train_image_tokenizer
from cm3leon.tokenizer.codebook import Codebook


def _images(n: int, size: int = 16, seed: int = 0) -> torch.Tensor:
    """Blocky synthetic images: a coloured rectangle on a white background (uint8)."""
    g = torch.Generator().manual_seed(seed)
    out = torch.full((n, 3, size, size), 255, dtype=torch.uint8)
    for i in range(n):
        x0, y0 = torch.randint(0, size // 2, (2,), generator=g).tolist()
        w, h = torch.randint(2, size // 2, (2,), generator=g).tolist()
        out[i, :, y0:y0 + h, x0:x0 + w] = torch.randint(0, 200, (3, 1, 1), generator=g).to(torch.uint8)
    return out


@pytest.fixture(autouse=True)
def _one_thread():
    """The tiny model's convolutions are too small to gain from threads, and OpenMP barriers cost a lot
    when the cores are shared: run this file single-threaded."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def tiny() -> ImageTokenizer:
    return ImageTokenizer(ImageTokenizerConfig.preset("tiny")).eval()


def test_presets():
    paper = ImageTokenizerConfig.preset("paper")
    assert (paper.image_size, paper.grid_size, paper.codebook_size) == (256, 32, 8192)
    demo = ImageTokenizerConfig.preset("demo")
    assert demo.image_size == 32 and demo.grid_size in (8, 16) and demo.codebook_size == 512
    assert ImageTokenizerConfig.from_dict(demo.to_dict()) == demo
    with pytest.raises(ValueError, match="unknown preset"):
        ImageTokenizerConfig.preset("huge")
    with pytest.raises(ValueError, match="divisible"):
        ImageTokenizerConfig(image_size=30)
    with pytest.raises(ValueError, match="res_blocks"):
        ImageTokenizerConfig(res_blocks=(1, 1))


def test_paper_preset_network_shapes():
    """256x256 -> 32x32 latents of code_dim and back, checked on the meta device (no compute)."""
    with torch.device("meta"):
        model = ImageTokenizer(ImageTokenizerConfig.preset("paper"))
        latents = model.encoder(torch.zeros(2, 3, 256, 256))
        assert latents.shape == (2, 256, 32, 32)
        assert model.decoder(latents).shape == (2, 3, 256, 256)
    assert model.codebook.weight.shape == (8192, 256)


def test_encode_decode_shapes_and_batching(tiny):
    images = _images(5)
    tokens = tiny.encode(images)
    assert tokens.dtype == torch.int64 and tokens.shape == (5, 4, 4)
    assert int(tokens.min()) >= 0 and int(tokens.max()) < 64
    # batching does not change results; float input in [0, 1] is the same image as uint8
    assert torch.equal(tiny.encode(images, batch_size=2), tokens)
    assert torch.equal(tiny.encode(images.float() / 255), tokens)
    decoded = tiny.decode(tokens)
    assert decoded.shape == (5, 3, 16, 16) and decoded.dtype == torch.float32
    assert float(decoded.min()) >= 0 and float(decoded.max()) <= 1
    assert torch.allclose(tiny.decode(tokens, batch_size=3), decoded, atol=1e-5)
    as_u8 = tiny.decode(tokens, as_uint8=True)
    assert as_u8.dtype == torch.uint8 and torch.equal(as_u8, (decoded * 255).round().to(torch.uint8))
    assert tiny.encode(images[:0]).shape == (0, 4, 4)


def test_encode_matches_training_forward(tiny):
    images = _images(3)
    out = tiny(tiny.preprocess(images))
    assert torch.equal(out.indices, tiny.encode(images))
    assert torch.allclose(tiny.decode_codes(out.indices), out.reconstruction, atol=1e-5)


def test_training_reduces_loss():
    images = _images(32)
    config = ImageTokenizerConfig.preset("tiny")
    result = train_image_tokenizer(config, images, steps=30, batch_size=16, lr=3e-3, warmup=5, progress=False,
                                   log_every=1)
    first = sum(h["recon_loss"] for h in result.history[:3]) / 3
    last = sum(h["recon_loss"] for h in result.history[-3:]) / 3
    assert last < 0.6 * first, (first, last)
    assert not result.tokenizer.training and result.seconds > 0
    before = psnr(images, ImageTokenizer(config).eval().reconstruct(images)).mean()
    after = psnr(images, result.tokenizer.reconstruct(images)).mean()
    assert after > before + 3


def test_dead_code_restart_revives_codes():
    torch.manual_seed(0)
    cb = Codebook(num_codes=16, dim=4)
    samples = torch.randn(256, 4) * 5 + 20  # far from every initial code: all land on one or two codes
    cb.train()
    cb(samples)
    used_before = int((cb.usage > 0).sum())
    assert used_before <= 2
    opt = torch.optim.Adam(cb.parameters(), lr=1e-3)
    cb(samples).loss.backward()
    opt.step()
    dead = cb.dead_codes().tolist()
    n = cb.restart_dead(samples, optimizer=opt, generator=torch.Generator().manual_seed(0))
    assert n == len(dead) >= 14 and int(cb.usage.sum()) == 0
    # restarted codes sit on the data, with their Adam moments cleared
    dist = torch.cdist(cb.weight.detach()[dead], samples).min(dim=1).values
    assert float(dist.max()) < 1.0
    for state in opt.state[cb.weight].values():
        if isinstance(state, torch.Tensor) and state.shape == cb.weight.shape:
            assert float(state[dead].abs().max()) == 0
    cb(samples)
    assert int((cb.usage > 0).sum()) >= 12


def test_training_restarts_codes():
    config = ImageTokenizerConfig.preset("tiny", restart_every=3)
    result = train_image_tokenizer(config, _images(16), steps=6, batch_size=8, progress=False, log_every=1)
    # step 0 initialises every code from data; later restarts revive codes unused since
    assert result.history[0]["restarted"] == 64
    assert result.history[-1]["restarted"] > 64


def test_gan_step_runs_and_trains_discriminator():
    config = ImageTokenizerConfig.preset("tiny", gan_weight=0.5, gan_start_step=1)
    result = train_image_tokenizer(config, _images(16), steps=3, batch_size=8, progress=False, log_every=1)
    assert "d_loss" not in result.history[0]
    assert all(torch.isfinite(torch.tensor(h["d_loss"])) for h in result.history[1:])
    assert result.history[1]["loss"] != result.history[1]["recon_loss"] + result.history[1]["vq_loss"]


def test_training_on_world_like_source():
    class World:
        def images(self, n: int, start: int = 0) -> torch.Tensor:
            return _images(n, seed=start)

    result = train_image_tokenizer("tiny", World(), steps=2, batch_size=4, progress=False)
    assert len(result.history) == 2


def test_save_load_identical_tokens(tmp_path):
    model = train_image_tokenizer("tiny", _images(16), steps=3, batch_size=8, progress=False).tokenizer
    path = tmp_path / "tok.safetensors"
    model.save(path)
    loaded = ImageTokenizer.load(path)
    assert loaded.config == model.config
    images = _images(6, seed=1)
    tokens = model.encode(images)
    assert torch.equal(loaded.encode(images), tokens)
    assert torch.equal(loaded.decode(tokens), model.decode(tokens))
    from safetensors.torch import save_file

    save_file({"something": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not a cm3leon image tokenizer"):
        ImageTokenizer.load(tmp_path / "other.safetensors")
    torch.save({"something": 1}, tmp_path / "pickled.pt")  # the old pickle-based format is not read
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        ImageTokenizer.load(tmp_path / "pickled.pt")


def test_bad_input(tiny):
    with pytest.raises(ValueError, match=r"images must have shape \[B, 3, 16, 16\]"):
        tiny.encode(torch.zeros(2, 3, 8, 8, dtype=torch.uint8))
    with pytest.raises(ValueError, match="images must have shape"):
        tiny.encode(torch.zeros(3, 16, 16, dtype=torch.uint8))
    with pytest.raises(ValueError, match="images must have shape"):
        tiny.encode(torch.zeros(1, 1, 16, 16, dtype=torch.uint8))
    with pytest.raises(TypeError, match="images must be uint8"):
        tiny.encode(torch.zeros(1, 3, 16, 16, dtype=torch.int32))
    with pytest.raises(TypeError, match="images must be a torch.Tensor"):
        tiny.encode([[0]])
    with pytest.raises(ValueError, match=r"floating-point images must be in \[0, 1\]"):  # 0..255 floats
        tiny.encode(torch.full((1, 3, 16, 16), 200.0))
    with pytest.raises(ValueError, match=r"floating-point images must be in \[0, 1\]"):
        tiny.encode(torch.full((1, 3, 16, 16), float("nan")))
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        tiny.encode(torch.zeros(1, 3, 16, 16, dtype=torch.uint8), batch_size=0)
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        tiny.decode(torch.zeros(1, 4, 4, dtype=torch.int64), batch_size=1.5)
    with pytest.raises(ValueError, match=r"tokens out of range \[0, 64\)"):
        tiny.decode(torch.full((1, 4, 4), 64))
    with pytest.raises(ValueError, match="tokens out of range"):
        tiny.decode(torch.full((1, 4, 4), -1))
    with pytest.raises(TypeError, match="tokens must be an integer tensor"):
        tiny.decode(torch.zeros(1, 4, 4))
    with pytest.raises(ValueError, match=r"tokens must have shape \[B, 4, 4\]"):
        tiny.decode(torch.zeros(4, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match="steps"):
        train_image_tokenizer("tiny", _images(4), steps=0, progress=False)
    with pytest.raises(TypeError, match="images_or_dataset"):
        train_image_tokenizer("tiny", [1, 2], steps=1, progress=False)


def test_psnr_values():
    a = torch.zeros(2, 3, 4, 4)
    assert torch.allclose(psnr(a, a + 0.1), torch.full((2,), 20.0))
    assert torch.isinf(psnr(a, a)).all()
    u8 = torch.full((1, 3, 4, 4), 255, dtype=torch.uint8)
    assert torch.allclose(psnr(u8, torch.ones(1, 3, 4, 4) * 0.9), torch.tensor([20.0]))
    with pytest.raises(ValueError, match="shapes differ"):
        psnr(a, a[:1])


def test_shapes_task_documents_round_trip():
    """Documents of the data package's SFT tasks: images -> grids (one batched encode) -> ids -> back."""
    from cm3leon.data import ShapesWorld
    from cm3leon.data.tasks import sft_examples
    from cm3leon.tokenizer import DocumentCodec, TextTokenizer, Vocabulary, tokenize_images

    model = ImageTokenizer(ImageTokenizerConfig.preset("tiny", image_size=32)).eval()
    docs = [ex.segments() for ex in sft_examples(ShapesWorld(image_size=32, seed=3), 7)]
    text_tok = TextTokenizer.train([s for d in docs for s in d if isinstance(s, str)], vocab_size=300)
    vocab = Vocabulary(text_tok.vocab_size, model.config.codebook_size)
    codec = DocumentCodec(text_tok, vocab, image_shape=(8, 8))
    tokenized = tokenize_images(docs, model)
    assert [len(d) for d in tokenized] == [len(d) for d in docs]
    first_image = next(s for s in docs[0] if isinstance(s, torch.Tensor))
    first_grid = next(s for s in tokenized[0] if isinstance(s, torch.Tensor))
    assert torch.equal(first_grid, model.encode(first_image[None])[0])
    back = codec.decode_documents(codec.encode_documents(tokenized))
    for doc, got in zip(tokenized, back):
        assert len(doc) == len(got)
        for a, b in zip(doc, got):
            assert a == b if isinstance(a, str) else torch.equal(a, b)


def test_cli_writes_checkpoint_log_and_eval(tmp_path):
    from cm3leon.tokenizer.train_image import main

    metrics = main(["--preset", "tiny", "--set", "image_size=32", "--steps", "2", "--batch-size", "4",
                    "--eval-images", "3", "--out", str(tmp_path), "--no-progress"])
    assert {"psnr_mean_db", "scorer_read_rate", "train_seconds", "train_cpu_seconds"} <= set(metrics)
    assert 0.0 <= metrics["scorer_read_rate"] <= 1.0
    model = ImageTokenizer.load(tmp_path / "image_tokenizer.safetensors")
    assert model.config.image_size == 32 and (tmp_path / "train_log.json").exists()
    assert (tmp_path / "eval.json").exists()
