"""Loading files cannot hang, execute code, cast silently or succeed on damaged data: every problem is a
``cm3leon.CheckpointError`` naming the file."""
from __future__ import annotations

import json
import random

import pytest
import torch
from helpers import run_isolated
from model_fixtures import small_model
from safetensors.torch import save_file

import cm3leon
from cm3leon import CheckpointError
from cm3leon.integrity import save_tensor_file
from cm3leon.tokenizer import ImageTokenizer, ImageTokenizerConfig, TextTokenizer, Vocabulary


def _write_model(path, model=None, *, config: dict | None = None, tensors: dict | None = None) -> None:
    """A checksummed checkpoint (valid checksums, so only the crafted content is wrong)."""
    model = model or small_model("cm3leon")
    config_json = model.config.to_json() if config is None else json.dumps(config)
    state = model.state_dict() if tensors is None else tensors
    save_tensor_file(path, state, kind="cm3leon", metadata={"config": config_json})


# ---- 4. crafted configs are rejected before anything is built ---------------------------------------

def test_huge_n_layers_is_rejected_without_building(tmp_path):
    model = small_model("cm3leon")
    crafted = json.loads(model.config.to_json()) | {"n_layers": 10 ** 12}
    _write_model(tmp_path / "m.safetensors", model, config=crafted)
    result = run_isolated(f"""
        import cm3leon
        try:
            cm3leon.load({str(tmp_path / "m.safetensors")!r})
        except cm3leon.CheckpointError as e:
            print("CheckpointError:", e)
    """, timeout=60)  # this used to build the model and never return
    assert result.returncode == 0, result.stderr[-2000:]
    assert "CheckpointError:" in result.stdout and "n_layers=1000000000000" in result.stdout


@pytest.mark.parametrize(("field", "value", "message"), [
    ("norm_eps", float("nan"), "norm_eps must be a finite number"),
    ("norm_eps", float("inf"), "norm_eps must be a finite number"),
    ("rope_theta", -1.0, "rope_theta must be a finite number > 0"),
    ("init_std", float("nan"), "init_std must be a finite number"),
    ("qk_norm", "yes", "qk_norm must be a bool"),
    ("ffn_dim", -4, "ffn_dim must be positive"),
    ("vocab_size", "97", "vocab_size must be an int"),
    ("surprise", 1, "unknown CM3LeonConfig fields"),
])
def test_invalid_config_values_raise_checkpoint_error(tmp_path, field, value, message):
    model = small_model("cm3leon")
    config = json.loads(model.config.to_json()) | {field: value}
    _write_model(tmp_path / "m.safetensors", model, config=config)
    with pytest.raises(CheckpointError, match=message) as info:
        cm3leon.load(tmp_path / "m.safetensors")
    assert str(tmp_path / "m.safetensors") in str(info.value)


def test_config_that_does_not_match_the_tensors_names_them(tmp_path):
    model = small_model("cm3leon")
    config = json.loads(model.config.to_json()) | {"n_layers": 3}
    _write_model(tmp_path / "m.safetensors", model, config=config)
    with pytest.raises(CheckpointError, match=r"missing \['blocks\.2\."):
        cm3leon.load(tmp_path / "m.safetensors")


# ---- 5. no silent casts ----------------------------------------------------------------------------------

@pytest.mark.parametrize("bad_dtype", [torch.int64, torch.int32, torch.bool, torch.uint8, torch.float64])
def test_tensors_of_a_non_weight_dtype_are_rejected(tmp_path, bad_dtype):
    model = small_model("cm3leon")
    state = dict(model.state_dict())
    state["blocks.0.ffn.up.weight"] = torch.zeros_like(state["blocks.0.ffn.up.weight"], dtype=bad_dtype)
    _write_model(tmp_path / "m.safetensors", model, tensors=state)
    with pytest.raises(CheckpointError, match=r"'blocks\.0\.ffn\.up\.weight' has dtype"):
        cm3leon.load(tmp_path / "m.safetensors")


def test_mixed_float_dtypes_are_rejected(tmp_path):
    model = small_model("cm3leon")
    state = dict(model.state_dict())
    state["embed.weight"] = state["embed.weight"].half()
    _write_model(tmp_path / "m.safetensors", model, tensors=state)
    with pytest.raises(CheckpointError, match="one dtype per file"):
        cm3leon.load(tmp_path / "m.safetensors")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_checkpoints_keep_their_dtype_unless_asked(tmp_path, dtype):
    model = small_model("cm3leon").to(dtype)
    cm3leon.save(model, tmp_path / "m.safetensors")
    loaded = cm3leon.load(tmp_path / "m.safetensors")
    assert {p.dtype for p in loaded.parameters()} == {dtype}
    for name, t in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], t), name
    cast = cm3leon.load(tmp_path / "m.safetensors", dtype=torch.float32)
    assert {p.dtype for p in cast.parameters()} == {torch.float32}


# ---- 6. damaged files: one error type, checksums --------------------------------------------------------

def _flip(path, position: int, bit: int = 0) -> None:
    data = bytearray(path.read_bytes())
    data[position] ^= 1 << bit
    path.write_bytes(bytes(data))


def test_a_flipped_bit_in_tensor_data_fails_its_checksum(tmp_path):
    path = tmp_path / "m.safetensors"
    cm3leon.save(small_model("cm3leon"), path)
    _flip(path, path.stat().st_size - 5, 3)  # inside the last tensor's data
    with pytest.raises(CheckpointError, match="fails its checksum"):
        cm3leon.load(path)
    cm3leon.load(path, verify=False)  # the opt-out loads it (structure is intact)


def test_files_without_checksums_need_verify_false(tmp_path):
    model = small_model("cm3leon")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "m.safetensors"),
              metadata={"format": "cm3leon", "config": model.config.to_json()})
    with pytest.raises(CheckpointError, match="has no checksums"):
        cm3leon.load(tmp_path / "m.safetensors")
    assert cm3leon.load(tmp_path / "m.safetensors", verify=False).config == model.config


def test_every_damaged_model_file_raises_checkpoint_error(tmp_path):
    """Truncations and single bit flips anywhere in the file (header, metadata, data): each load raises
    CheckpointError, in a subprocess so a crash in a parser would count as a failure."""
    path = tmp_path / "m.safetensors"
    cm3leon.save(small_model("cm3leon"), path)
    size = path.stat().st_size
    rng = random.Random(0)
    header = int.from_bytes(path.read_bytes()[:8], "little") + 8
    cases = [("cut", n) for n in (0, 4, 8, 100, header - 1, header, size // 2, size - 1)]
    cases += [("flip", rng.randrange(header)) for _ in range(40)]  # header: offsets, shapes, metadata
    cases += [("flip", rng.randrange(header, size)) for _ in range(20)]  # tensor data
    result = run_isolated(f"""
        import random, cm3leon
        from pathlib import Path
        original = Path({str(path)!r}).read_bytes()
        damaged = Path({str(path)!r}).with_suffix(".damaged")
        rng = random.Random(1)
        for kind, at in {cases!r}:
            data = bytearray(original[:at] if kind == "cut" else original)
            if kind == "flip":
                data[at] ^= 1 << rng.randrange(8)
            damaged.write_bytes(bytes(data))
            try:
                cm3leon.load(damaged)
                print("LOADED", kind, at)
            except cm3leon.CheckpointError as e:
                assert str(damaged) in str(e)
                print("ok")
            except Exception as e:
                print("OTHER", kind, at, type(e).__name__, e)
    """)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.split("\n")
    assert lines.count("ok") == len(cases), [line for line in lines if line and line != "ok"]


def _tiny_image_tokenizer() -> ImageTokenizer:
    return ImageTokenizer(ImageTokenizerConfig.preset("tiny")).eval()


def test_image_tokenizer_round_trip_and_damage(tmp_path):
    model = _tiny_image_tokenizer()
    path = tmp_path / "tok.safetensors"
    model.save(path)
    loaded = ImageTokenizer.load(path)
    for name, t in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], t), name
    assert not loaded.codebook.usage.any()
    _flip(path, path.stat().st_size - 3)
    with pytest.raises(CheckpointError, match="fails its checksum"):
        ImageTokenizer.load(path)
    path.write_bytes(path.read_bytes()[:50])
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        ImageTokenizer.load(path)


def test_image_tokenizer_rejects_crafted_configs_and_dtypes(tmp_path):
    model = _tiny_image_tokenizer()
    config = model.config.to_dict()

    def write(cfg: dict, state=None) -> None:
        save_tensor_file(tmp_path / "t.safetensors", model.state_dict() if state is None else state,
                         kind="cm3leon-image-tokenizer", metadata={"config": json.dumps(cfg)})

    write(config | {"res_blocks": [10 ** 9] * 3})
    with pytest.raises(CheckpointError, match="residual blocks but the file holds only"):
        ImageTokenizer.load(tmp_path / "t.safetensors")
    write(config | {"beta": float("nan")})
    with pytest.raises(CheckpointError, match="beta must be a finite number"):
        ImageTokenizer.load(tmp_path / "t.safetensors")
    write(config | {"code_dim": 16})
    with pytest.raises(CheckpointError, match=r"tensor '[a-z.0-9]+' has shape .*, the config expects"):
        ImageTokenizer.load(tmp_path / "t.safetensors")
    state = dict(model.state_dict())
    state["codebook.weight"] = state["codebook.weight"].to(torch.int64)
    write(config, state)
    with pytest.raises(CheckpointError, match="codebook.weight' has dtype torch.int64"):
        ImageTokenizer.load(tmp_path / "t.safetensors")
    write([1, 2])
    with pytest.raises(CheckpointError, match="invalid image tokenizer config"):
        ImageTokenizer.load(tmp_path / "t.safetensors")


@pytest.mark.parametrize("content", [b"", b"{", b"[1, 2]", b'{"text_size": 3}', b"\xff\xfe",
                                     b'{"text_size": "x", "image_codes": 4}', b"[" * 100_000])
def test_vocabulary_damage_raises_checkpoint_error(tmp_path, content):
    path = tmp_path / "vocab.json"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=str(path)):
        Vocabulary.load(path)


def test_vocabulary_missing_field_and_bad_sizes(tmp_path):
    good = Vocabulary(text_size=10, image_codes=4).to_dict()
    no_codes = {k: v for k, v in good.items() if k != "image_codes"}
    path = tmp_path / "vocab.json"
    for data, message in ((good | {"text_size": 0}, "text_size must be >= 1"),
                          (no_codes, "missing field 'image_codes'")):
        path.write_text(json.dumps(data))
        with pytest.raises(CheckpointError, match=message):
            Vocabulary.load(path)


def test_vocabulary_checksum(tmp_path):
    path = tmp_path / "vocab.json"
    Vocabulary(text_size=1234, image_codes=56).save(path)
    path.write_text(path.read_text().replace("1234", "1239"))  # a damaged digit is still valid JSON
    with pytest.raises(CheckpointError, match="fails its checksum"):
        Vocabulary.load(path)
    assert Vocabulary.load(path, verify=False).text_size == 1239
    path.write_text(json.dumps(Vocabulary(text_size=3, image_codes=4).to_dict()))
    with pytest.raises(CheckpointError, match="has no checksum"):
        Vocabulary.load(path)


def test_text_tokenizer_damage_raises_checkpoint_error(tmp_path):
    tok = TextTokenizer.train(["a small corpus for a small tokenizer"] * 20, 300)
    path = tmp_path / "text.json"
    tok.save(path)
    original = path.read_text()
    for damaged in (original[: len(original) // 2], "", "{}", "not json"):
        path.write_text(damaged)
        with pytest.raises(CheckpointError, match=str(path)):
            TextTokenizer.load(path)
    wordpiece = json.loads(original)
    wordpiece["pre_tokenizer"] = {"type": "Whitespace"}
    path.write_text(json.dumps(wordpiece))
    with pytest.raises(CheckpointError, match="not a byte-level BPE"):
        TextTokenizer.load(path)


def test_missing_files_raise_file_not_found(tmp_path):
    for load in (cm3leon.load, ImageTokenizer.load, Vocabulary.load, TextTokenizer.load):
        with pytest.raises(FileNotFoundError):
            load(tmp_path / "nope")


def test_load_chameleon_damage_raises_checkpoint_error(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json"):
        cm3leon.load_chameleon(tmp_path)
    config = {"model_type": "chameleon", "vocab_size": 64, "hidden_size": 32, "num_hidden_layers": 10 ** 12,
              "num_attention_heads": 2, "intermediate_size": 64}
    (tmp_path / "config.json").write_text(json.dumps(config))
    save_file({"model.embed_tokens.weight": torch.zeros(64, 32)}, str(tmp_path / "model.safetensors"))
    result = run_isolated(f"""
        import cm3leon
        try:
            cm3leon.load_chameleon({str(tmp_path)!r})
        except cm3leon.CheckpointError as e:
            print("CheckpointError:", e)
    """, timeout=60)
    assert "CheckpointError:" in result.stdout and "n_layers=1000000000000" in result.stdout, result.stderr
    (tmp_path / "model.safetensors").write_bytes(b"\x08" + bytes(20))
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        cm3leon.load_chameleon(tmp_path)
