"""The cm3leon command line: tasks end to end on a saved tiny bundle, and one-line errors with exit status 2."""
from __future__ import annotations

import runpy
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from pipeline_fixtures import WORLD, parts, retrieval

from cm3leon import cli
from cm3leon.pipeline import load_bundle, save_bundle
from cm3leon.pipeline.image_io import write_png


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("bundle")
    save_bundle(root / "ckpt", *parts())
    write_png(WORLD.images(1)[0], root / "scene.png")
    return root


def _run(capsys, *argv):
    status = cli.main([str(a) for a in argv])
    out = capsys.readouterr()
    return status, out.out, out.err


def test_bundle_round_trip(checkpoint):
    model, codec, images = parts()
    bundle = load_bundle(checkpoint / "ckpt")
    assert bundle.codec.vocabulary == codec.vocabulary and bundle.codec.image_shape == (4, 4)
    for name, tensor in model.state_dict().items():
        assert torch.equal(bundle.model.state_dict()[name], tensor)
    assert bundle.codec.text_tokenizer.encode("a red circle") == codec.text_tokenizer.encode("a red circle")
    assert bundle.pipeline().image_size == images.config.image_size
    assert bundle.model.blocks[0].attn.qkv_proj is not None  # fused for inference


def test_bundle_reads_a_training_export(checkpoint, tmp_path):
    """The trainer's export: model.safetensors beside its corpus's text.json, image_tokenizer.safetensors,
    vocabulary.json."""
    import shutil

    root = shutil.copytree(checkpoint / "ckpt", tmp_path / "export")
    assert load_bundle(root).pipeline().image_size == parts()[2].config.image_size
    (root / "text.json").unlink()
    with pytest.raises(FileNotFoundError, match="lacks text.json"):
        load_bundle(root)


def test_bundle_names_the_files_that_disagree(checkpoint, tmp_path):
    import shutil

    from cm3leon.tokenizer import ImageTokenizer, ImageTokenizerConfig, TextTokenizer

    root = shutil.copytree(checkpoint / "ckpt", tmp_path / "text")
    TextTokenizer.train(["a red circle", "a blue square"] * 3, vocab_size=280).save(root / "text.json")
    with pytest.raises(ValueError, match=r"text\.json does not match .*vocabulary\.json: text_tokenizer"):
        load_bundle(root)
    root = shutil.copytree(checkpoint / "ckpt", tmp_path / "codes")
    other = ImageTokenizer(ImageTokenizerConfig.preset("tiny", codebook_size=32))
    other.save(root / "image_tokenizer.safetensors")
    with pytest.raises(ValueError, match=f"directory '{root}' disagree: image_tokenizer has 32 codes"):
        load_bundle(root)


def test_text_to_image_writes_a_png_grid(checkpoint, capsys):
    out = checkpoint / "grid.png"
    status, _, err = _run(capsys, "generate", "--checkpoint", checkpoint / "ckpt", "--task", "text-to-image",
                          "--prompt", "a red circle", "--samples", "3", "--strategy", "mix", "--out", out, "--quiet")
    assert status == 0, err
    with Image.open(out) as im:
        assert im.mode == "RGB" and im.size == (3 * 18 + 2, 18 + 2)


def test_text_tasks_print_one_line_per_input(checkpoint, capsys):
    ckpt, image = checkpoint / "ckpt", checkpoint / "scene.png"
    status, out, err = _run(capsys, "generate", "--checkpoint", ckpt, "--task", "caption", "--image", image,
                            "--image", image, "--max-new-tokens", "4", "--quiet")
    assert status == 0, err
    assert len(out.splitlines()) == 2 and out.splitlines()[0] == out.splitlines()[1]
    status, out, err = _run(capsys, "generate", "--checkpoint", ckpt, "--task", "infill", "--prompt",
                            "a large <mask> in the center", "--image", image, "--max-new-tokens", "3", "--quiet")
    assert status == 0 and out.startswith("a large") and out.rstrip().endswith("in the center"), err
    status, _, err = _run(capsys, "generate", "--checkpoint", ckpt, "--task", "edit", "--image", image,
                          "--prompt", "make it red", "--samples", "1", "--out", checkpoint / "edit.png", "--quiet")
    assert status == 0, err


def _bad_images(root):
    small = root / "small.png"
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(small)
    gray = root / "gray.png"
    Image.fromarray(np.zeros((16, 16), dtype=np.uint8)).save(gray)
    junk = root / "junk.png"
    junk.write_bytes(b"not a png")
    return small, gray, junk


@pytest.mark.parametrize("case,match", [
    ("missing checkpoint", "does not exist"),
    ("incomplete checkpoint", "lacks model.safetensors"),
    ("unknown task", "unknown task 'paint'"),
    ("small image", "is 8x8 pixels; this model reads 16x16"),
    ("gray image", "has mode L; expected an RGB image"),
    ("junk image", "cannot read --image"),
    ("missing image", "--image file"),
    ("long prompt", "exceeds the model's max_seq_len"),
    ("no out", "give --out"),
    ("bad box", "--box must look like"),
    ("bad option", "unrecognized arguments"),
    ("bad device", "not a device name"),
    ("bad out", "its folder does not exist"),
    ("out is a folder", "is a folder; give the PNG file"),
    ("grounded without a box", "--task grounded needs --box"),
])
def test_bad_input_is_one_line_and_status_2(checkpoint, capsys, case, match):
    ckpt = checkpoint / "ckpt"
    small, gray, junk = _bad_images(checkpoint)
    base = ["generate", "--checkpoint", ckpt, "--quiet"]
    argv = {
        "missing checkpoint": ["generate", "--checkpoint", checkpoint / "nope", "--task", "caption", "--image", small],
        "incomplete checkpoint": ["generate", "--checkpoint", checkpoint, "--task", "caption", "--image", small],
        "unknown task": base + ["--task", "paint", "--prompt", "x", "--out", "x.png"],
        "small image": base + ["--task", "caption", "--image", small],
        "gray image": base + ["--task", "caption", "--image", gray],
        "junk image": base + ["--task", "caption", "--image", junk],
        "missing image": base + ["--task", "caption", "--image", checkpoint / "absent.png"],
        "long prompt": base + ["--task", "text-to-image", "--prompt", "a red circle " * 60, "--out", "x.png"],
        "no out": base + ["--task", "text-to-image", "--prompt", "a red circle"],
        "bad box": base + ["--task", "grounded", "--box", "red circle:1,2", "--out", "x.png"],
        "bad option": base + ["--task", "caption", "--colour", "red"],
        "bad device": base + ["--task", "caption", "--image", small, "--device", "gpu0"],
        "bad out": base + ["--task", "text-to-image", "--prompt", "a", "--out", checkpoint / "no" / "g.png"],
        "out is a folder": base + ["--task", "text-to-image", "--prompt", "a", "--out", checkpoint],
        "grounded without a box": base + ["--task", "grounded", "--out", checkpoint / "g.png"],
    }[case]
    status, out, err = _run(capsys, *argv)
    assert status == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and err.startswith("cm3leon: error: ") and match in err, err


# Tiny sizes throughout: without the checks, several of these ran to the end (or failed only after training).
TINY_IMAGE = ["--preset", "tiny", "--steps", "1", "--batch-size", "2", "--eval-images", "2", "--no-progress"]
TINY_TRAIN = ["--config", "tiny-pretrain", "--set", "schedule.steps=2", "--set", "schedule.warmup=1"]


@pytest.mark.parametrize("module,argv,match", [
    ("cm3leon.tokenizer.train_text", ["--examples", "-5"],
     "argument --examples: must be a positive int, got -5"),
    ("cm3leon.tokenizer.train_text", ["--examples", "20", "--vocab-size", "10"],
     "argument --vocab-size: must be an int >= 256, got 10"),
    ("cm3leon.tokenizer.train_text", ["--examples", "20", "--out", "{file}/text.json"],
     "--out {file}/text.json: {file} is a file, not a folder"),
    ("cm3leon.tokenizer.train_text", ["--examples", "20", "--out", "{tmp}"],
     "--out {tmp}: is a folder, not a file"),
    ("cm3leon.tokenizer.train_image", [*TINY_IMAGE, "--eval-images", "0"],
     "argument --eval-images: must be a positive int"),
    ("cm3leon.tokenizer.train_image", [*TINY_IMAGE, "--threads", "-2"],
     "argument --threads: must be a non-negative int"),
    ("cm3leon.tokenizer.train_image", [*TINY_IMAGE, "--lr", "-1"],
     "argument --lr: must be a finite number > 0"),
    ("cm3leon.tokenizer.train_image", ["--preset", "nope"], "unknown preset 'nope'"),
    ("cm3leon.tokenizer.train_image", [*TINY_IMAGE, "--set", "codebook_size=abc"],
     "--set codebook_size=abc: the value must be JSON"),
    ("cm3leon.tokenizer.train_image", [*TINY_IMAGE, "--set", "bogus=1"], "'bogus'"),
    ("cm3leon.tokenizer.train_image", [*TINY_IMAGE, "--out", "{file}"], "--out {file}: {file} is a file"),
    ("cm3leon.data.scorer_eval", ["--n", "0"], "argument --n: must be a positive int, got 0"),
    ("cm3leon.data.scorer_eval", ["--n", "2", "--size", "5"], "--size 5: image_size must be an int >= 16"),
    ("cm3leon.data.scorer_eval", ["--n", "2", "--sigma", "-1"],
     "argument --sigma: must be a finite number >= 0"),
    ("cm3leon.data.scorer_eval", ["--n", "2", "--noise", "nan"], "argument --noise: must be a finite number"),
    ("cm3leon.demo", ["--scale", "toy", "--no-progress", "--out", "{file}/run"], "{file} is a file"),
    ("cm3leon.training", [*TINY_TRAIN, "--set", "out_dir='{file}'"], "out_dir='{file}': {file} is a file"),
    ("cm3leon.training", [*TINY_TRAIN, "--set", "data.corpus_dir='{file}/corpus'"],
     "data.corpus_dir='{file}/corpus': {file} is a file"),
    ("cm3leon.training", [*TINY_TRAIN, "--set", "data.memory_bank='{tmp}/none'",
                          "--set", "data.retrieval_encoder='{tmp}/none'"],
     "data.memory_bank='{tmp}/none': no such file"),
    ("cm3leon.training", [*TINY_TRAIN, "--set", "data.source='folder'", "--set", "data.path='{tmp}/none'"],
     "data.path='{tmp}/none': no such file or folder"),
])
# runpy warns when another test already imported the module; it runs it afresh all the same
@pytest.mark.filterwarnings("ignore:.*found in sys.modules:RuntimeWarning")
def test_module_commands_reject_bad_arguments_with_status_2(tmp_path, monkeypatch, capsys, module: str,
                                                           argv: list[str], match: str):
    """The documented ``python -m`` commands: a bad argument is argparse's one error line and exit status 2,
    before any work (it used to be a traceback, often after training, or a silently empty result)."""
    monkeypatch.chdir(tmp_path)  # default outputs (runs/...) land here, never in the repository
    (tmp_path / "file").write_text("")
    paths = dict(tmp=tmp_path, file=tmp_path / "file")
    monkeypatch.setattr(sys, "argv", [module, *(a.format(**paths) for a in argv)])
    with pytest.raises(SystemExit) as exit_info:  # as python -m runs it
        runpy.run_module(module, run_name="__main__")
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"python -m {module}: error: ") and match.format(**paths) in last, err


def test_an_unwritable_output_folder_is_a_usage_error(tmp_path, monkeypatch, capsys):
    # os.access stands in for a read-only folder (the tests may run as root, which may write anywhere)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("cm3leon._cli_args.os.access", lambda path, mode: False)
    monkeypatch.setattr(sys, "argv", ["cm3leon.training", *TINY_TRAIN, "--set", f"out_dir='{tmp_path}/run'"])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_module("cm3leon.training", run_name="__main__")
    assert exit_info.value.code == 2 and f"{tmp_path} is not writable" in capsys.readouterr().err


def test_train_delegates_to_the_training_module(monkeypatch, capsys):
    seen = {}

    def fake_run_module(name, run_name, alter_sys):
        seen.update(name=name, argv=list(sys.argv))
        raise SystemExit(3)

    monkeypatch.setattr(cli.importlib.util, "find_spec", lambda name: object())
    monkeypatch.setattr(cli.runpy, "run_module", fake_run_module)
    assert cli.main(["train", "--config", "demo-pretrain"]) == 3
    assert seen == {"name": "cm3leon.training", "argv": ["cm3leon train", "--config", "demo-pretrain"]}
    monkeypatch.setattr(cli.importlib.util, "find_spec", lambda name: None)
    status, _, err = _run(capsys, "train", "--config", "demo-pretrain")
    assert status == 2 and "needs the cm3leon.training package" in err


def test_python_dash_m_entry_point(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "cm3leon", "generate", "--checkpoint", str(tmp_path / "none"),
                           "--task", "caption", "--image", "x.png"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0 and "does not exist" in proc.stderr


def test_bundle_reads_the_optional_retrieval_files(checkpoint, tmp_path, monkeypatch):
    """retrieval/dual_encoder.safetensors gives the scorer, + memory_bank.safetensors the retriever."""
    import shutil

    from cm3leon.retrieval import ImageTextScorer, Retriever

    retriever, _ = retrieval()
    root = shutil.copytree(checkpoint / "ckpt", tmp_path / "ckpt")
    (root / "retrieval").mkdir()
    retriever.bank.save(root / "retrieval" / "memory_bank.safetensors")
    with pytest.raises(FileNotFoundError, match="needs the dual encoder"):
        load_bundle(root)
    retriever.encoder.save(root / "retrieval" / "dual_encoder.safetensors")
    bundle = load_bundle(root)
    assert isinstance(bundle.retriever, Retriever) and isinstance(bundle.scorer, ImageTextScorer)
    assert len(bundle.retriever.bank) == len(retriever.bank)
    status = cli.main(["generate", "--checkpoint", str(root), "--task", "text-to-image", "--prompt", "a red circle",
                       "--samples", "2", "--retrieved", "2", "--out", str(tmp_path / "g.png"), "--quiet"])
    assert status == 0
    (root / "retrieval" / "memory_bank.safetensors").unlink()
    bundle = load_bundle(root)
    assert bundle.retriever is None and bundle.scorer is not None
    monkeypatch.setitem(sys.modules, "cm3leon.retrieval", None)  # as if FAISS were missing
    with pytest.raises(ImportError, match="holds retrieval files, but cm3leon.retrieval cannot be imported"):
        load_bundle(root)


@pytest.mark.slow
def test_train_then_generate_from_the_export(tmp_path, capsys):
    """cm3leon train runs the trainer; its export directory is a checkpoint cm3leon generate reads."""
    out = tmp_path / "run"
    assert cli.main(["train", "--config", "tiny-pretrain", "--set", f'out_dir="{out}"',
                     "--set", "schedule.steps=2", "--set", "checkpoint.every=0"]) == 0
    status, _, err = _run(capsys, "generate", "--checkpoint", out, "--task", "text-to-image", "--prompt",
                          "a large red circle", "--samples", "2", "--out", tmp_path / "g.png", "--quiet")
    assert status == 0, err
    status, text, err = _run(capsys, "generate", "--checkpoint", out, "--task", "infill", "--prompt",
                             "a large <mask> in the center", "--max-new-tokens", "3", "--quiet")
    assert status == 0 and text.startswith("a large"), err
