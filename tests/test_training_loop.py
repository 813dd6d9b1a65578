"""The training loop on one process: exact resume, faults, gradient accumulation, checkpoints, outputs.

Exact-resume tests run the kernels on one thread: the attention backward's dQ sums per-thread partial
results, so with two threads it is not bit-reproducible run to run (differences up to ~6e-7), and two
uninterrupted runs would already differ.
"""
from __future__ import annotations

import json
import os
import signal

import pytest
import torch
from training_fakes import fake_data, one_thread_and_fake_loader, use_fake_loader  # noqa: F401 (fixture)

import cm3leon
from cm3leon.training import load_config
from cm3leon.training.checkpointing import CheckpointError, step_dirs
from cm3leon.training.observe import read_metrics
from cm3leon.training.trainer import NonFiniteLossError, Trainer

CURVE_KEYS = ("step", "loss", "lr", "grad_norm", "tokens", "padding", "val_loss")


pytestmark = pytest.mark.usefixtures("one_thread_and_fake_loader")


def _config(out, *extra):
    return load_config("tiny-pretrain", [f"out_dir='{out}'", "schedule.steps=6", "checkpoint.every=0",
                                         "logging.val_every=2", *extra])


def _curve(out):
    return [{k: r[k] for k in CURVE_KEYS if k in r} for r in read_metrics(out / "metrics.jsonl")]


def _state(trainer):
    params = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    optim = {i: {k: v.clone() for k, v in s.items()} for i, s in enumerate(trainer.optimizer.state.values())}
    return params, optim


def _assert_bitwise_equal(a, b):
    (pa, oa), (pb, ob) = a, b
    assert pa.keys() == pb.keys()
    for name in pa:
        assert torch.equal(pa[name], pb[name]), name
    assert oa.keys() == ob.keys()
    for i in oa:
        for key in oa[i]:
            assert torch.equal(oa[i][key], ob[i][key]), (i, key)


def test_sigterm_checkpoint_and_resume_are_bit_identical_to_an_uninterrupted_run(tmp_path, monkeypatch):
    full = Trainer(_config(tmp_path / "full"), data=fake_data())
    assert full.fit()["step"] == 6

    interrupted = Trainer(_config(tmp_path / "cut"), data=fake_data())
    original_step = interrupted.train_step

    def step_then_sigterm(batches):
        result = original_step(batches)
        if interrupted.step == 2:  # the handler only sets a flag: step 3 completes, then save and stop
            os.kill(os.getpid(), signal.SIGTERM)
        return result

    interrupted.train_step = step_then_sigterm
    summary = interrupted.fit()
    assert summary["interrupted"] == signal.SIGTERM and summary["step"] == 3
    assert [s for s, _ in step_dirs(tmp_path / "cut" / "checkpoints")] == [3]
    assert not (tmp_path / "cut" / "model.safetensors").exists()  # not exported: the run is unfinished
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is gone again

    resumed = Trainer(_config(tmp_path / "cut"), data=fake_data())
    assert resumed.fit(resume=True)["step"] == 6
    _assert_bitwise_equal(_state(resumed), _state(full))
    assert _curve(tmp_path / "cut") == _curve(tmp_path / "full")
    assert [r["step"] for r in read_metrics(tmp_path / "cut" / "metrics.jsonl")] == [1, 2, 3, 4, 5, 6]


def test_resume_drops_metrics_a_crashed_run_wrote_after_its_last_checkpoint(tmp_path):
    config = _config(tmp_path, "checkpoint.every=2", "schedule.steps=4")
    Trainer(config, data=fake_data()).fit()
    reference = _curve(tmp_path)
    # a crash after step 3: the checkpoint of step 4 never got written, metrics of step 3 and 4 did
    import shutil
    shutil.rmtree(tmp_path / "checkpoints" / "step-4")
    assert Trainer(config, data=fake_data()).fit(resume=True)["step"] == 4
    assert _curve(tmp_path) == reference


def test_gradient_accumulation_equals_one_big_batch(tmp_path):
    trainer = Trainer(_config(tmp_path, "optim.grad_clip=0"), data=fake_data())
    # plain SGD: the update is lr x gradient (Adam's first step would amplify round-off of tiny gradients)
    trainer.optimizer = torch.optim.SGD(trainer.model.parameters(), lr=1.0)
    loader = iter(trainer.loader)
    micro = [next(loader), next(loader)]
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    accumulated = trainer.train_step(micro)
    after_accum = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}

    from cm3leon.data import PackedBatch
    b1, b2 = micro
    merged = PackedBatch(torch.cat([b1.tokens, b2.tokens]), torch.cat([b1.targets, b2.targets]),
                   torch.cat([b1.loss_weights, b2.loss_weights]),
                   torch.cat([b1.cu_seqlens, b2.cu_seqlens[1:] + b1.cu_seqlens[-1]]),
                   max(b1.max_seqlen, b2.max_seqlen), b1.n_sequences + b2.n_sequences, 0)
    with torch.no_grad():
        for n, p in trainer.model.named_parameters():
            p.copy_(before[n])
    single = trainer.train_step([merged])
    assert accumulated["loss"] == pytest.approx(single["loss"], rel=1e-6)
    assert accumulated["grad_norm"] == pytest.approx(single["grad_norm"], rel=1e-5)
    for n, p in trainer.model.named_parameters():
        torch.testing.assert_close(p.detach() - before[n], after_accum[n] - before[n], rtol=1e-4, atol=1e-9,
                                   msg=n)


def test_non_finite_losses_skip_steps_then_stop_with_a_clear_error(tmp_path, monkeypatch):
    trainer = Trainer(_config(tmp_path, "optim.max_bad_steps=3"), data=fake_data())
    loss = trainer.model.loss

    def sometimes_nan(*args, **kwargs):  # training steps 2, 4, 5, 6 (validation stays finite)
        value = loss(*args, **kwargs)
        return value * float("nan") if trainer.model.training and trainer.step in (1, 3, 4, 5) else value

    monkeypatch.setattr(trainer.model, "loss", sometimes_nan)
    with pytest.raises(NonFiniteLossError, match="3 consecutive steps"):
        trainer.fit()
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["skipped_steps"] for r in records] == [0, 1, 1, 2, 3][: len(records)]
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())  # no NaN reached the weights


def test_failed_save_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    trainer = Trainer(_config(tmp_path, "schedule.steps=4"), data=fake_data())
    iterator = iter(trainer.loader)
    trainer.train_step([next(iterator)])
    trainer.step = 1
    good = trainer.save_checkpoint()
    trainer.train_step([next(iterator)])
    trainer.step = 2

    import cm3leon.training.checkpointing as ckpt

    def disk_full(state, checkpoint_id):
        (ckpt.Path(checkpoint_id) / "__0_0.distcp").write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ckpt.dcp, "save", disk_full)
    with pytest.raises(CheckpointError, match="No space left on device.*untouched"):
        trainer.save_checkpoint()
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-1"]
    monkeypatch.undo()
    use_fake_loader(monkeypatch)
    fresh = Trainer(_config(tmp_path, "schedule.steps=4"), data=fake_data())
    assert fresh.resume() and fresh.step == 1 and good.is_dir()


def test_unwritable_checkpoint_folder_fails_the_save(tmp_path):
    (tmp_path / "checkpoints").write_text("a file where the folder should be")
    trainer = Trainer(_config(tmp_path), data=fake_data())
    with pytest.raises(CheckpointError, match="create"):
        trainer.save_checkpoint()


def test_resume_skips_a_damaged_checkpoint_with_a_warning_and_keeps_the_newest_k(tmp_path):
    config = _config(tmp_path, "checkpoint.every=1", "checkpoint.keep=2", "schedule.steps=3")
    Trainer(config, data=fake_data()).fit()
    assert [s for s, _ in step_dirs(tmp_path / "checkpoints")] == [3, 2]
    shard = tmp_path / "checkpoints" / "step-3" / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[:100])  # truncated by a crash of the storage
    trainer = Trainer(config, data=fake_data())
    with pytest.warns(UserWarning, match="skipping damaged checkpoint .*step-3"):
        assert trainer.resume()
    assert trainer.step == 2
    (tmp_path / "checkpoints" / "step-2" / "manifest.json").unlink()
    with pytest.warns(UserWarning), pytest.raises(CheckpointError, match="no usable checkpoint"):
        Trainer(config, data=fake_data()).resume()


def test_outputs_metrics_plot_and_an_exported_model_for_generation(tmp_path):
    summary = Trainer(_config(tmp_path), data=fake_data()).fit()
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert {"loss", "lr", "grad_norm", "tokens_per_s", "padding", "mfu"} <= records[0].keys()
    assert 0 < records[0]["mfu"] < 1 and records[-1]["loss"] < records[0]["loss"]
    assert [r["step"] for r in records if "val_loss" in r] == [2, 4, 6]
    assert (tmp_path / "loss.png").stat().st_size > 1000
    assert load_config(tmp_path / "config.toml") == _config(tmp_path)
    model = cm3leon.load(tmp_path / "model.safetensors")
    batch = next(iter(Trainer(_config(tmp_path / "other"), data=fake_data()).loader))
    with torch.no_grad():
        loss = model.loss(batch.tokens, batch.targets, batch.loss_weights, cu_seqlens=batch.cu_seqlens)
    assert loss.item() < records[0]["loss"]
    assert json.loads(json.dumps(summary))["step"] == 6


def test_resume_without_checkpoints_starts_from_scratch(tmp_path):
    trainer = Trainer(_config(tmp_path, "schedule.steps=2"), data=fake_data())
    assert trainer.fit(resume=True)["step"] == 2


def test_bf16_autocast_keeps_float32_master_weights_and_optimizer_state(tmp_path):
    trainer = Trainer(_config(tmp_path, "model.precision='bf16'", "schedule.steps=2",
                              "checkpoint.export=false",
                              "logging.val_every=0"), data=fake_data())
    summary = trainer.fit()
    assert summary["step"] == 2 and torch.isfinite(torch.tensor(summary["loss"]))
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())
    assert all(v.dtype == torch.float32 for s in trainer.optimizer.state.values() for k, v in s.items()
               if k != "step")


def test_init_from_a_previous_run_takes_its_weights_only(tmp_path):
    first = Trainer(_config(tmp_path / "pre"), data=fake_data())
    first.fit()
    for source in ("checkpoints", "checkpoints/step-6", "model.safetensors"):
        second = Trainer(_config(tmp_path / "sft", f"checkpoint.init_from='{tmp_path / 'pre' / source}'",
                                 "stage='sft'"), data=fake_data())
        for (name, a), b in zip(first.model.named_parameters(), second.model.parameters()):
            assert torch.equal(a, b), (source, name)
        assert second.step == 0 and not second.optimizer.state
    with pytest.raises(ValueError, match="init_from"):
        Trainer(_config(tmp_path / "x", f"checkpoint.init_from='{tmp_path / 'sft'}'"), data=fake_data())


def test_init_from_a_damaged_or_foreign_weights_file_raises(tmp_path):
    # the file was read with safetensors' load_file: a flipped byte loaded silently, a truncated file raised
    # SafetensorError and another model's weights a RuntimeError from load_state_dict
    Trainer(_config(tmp_path / "pre", "schedule.steps=1", "schedule.warmup=0"), data=fake_data()).fit()
    data = bytearray((tmp_path / "pre" / "model.safetensors").read_bytes())
    data[-8] ^= 0xFF
    (tmp_path / "flipped.safetensors").write_bytes(bytes(data))
    (tmp_path / "cut.safetensors").write_bytes(bytes(data[:100]))
    cm3leon.save(cm3leon.CM3Leon(cm3leon.preset("tiny", vocab_size=700)), tmp_path / "other.safetensors")
    for name, match in (("flipped", "fails its checksum"), ("cut", "cut.safetensors"),
                        ("other", "init_from.*do not fit the model.*'embed.weight'")):
        with pytest.raises(ValueError, match=match):
            Trainer(_config(tmp_path / name, f"checkpoint.init_from='{tmp_path / name}.safetensors'"),
                    data=fake_data())
