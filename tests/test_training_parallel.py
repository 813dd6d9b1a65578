"""The trainer on two CPU processes (gloo): DDP and FSDP2 against one process with the same global batch,
exact resume on two processes, and resume across world sizes (2 -> 1, 1 -> 2).

Tolerance of the cross-configuration comparisons: rtol 1e-5 on losses, 1e-4 (atol 1e-6) on weights and Adam
moments. The runs see the same global batches (the test loader hands rank r the r-th batch of each round;
one process accumulates those batches), so the only difference is float32 summation order: gradients are
summed by an all-reduce instead of by accumulation on one process, and Adam's normalised update carries the
rounding into later steps. Resuming on the same number of processes is compared bit for bit.
Everything runs the kernels on one thread: the attention backward's dQ is not bit-reproducible across two
threads.
"""
from __future__ import annotations

import os
import shutil
import signal

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from training_fakes import fake_data, one_thread_and_fake_loader  # noqa: F401 (fixture)
from training_workers import config, full_state, worker

from cm3leon.training.observe import read_metrics
from cm3leon.training.trainer import Trainer

pytestmark = [pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo"),
              pytest.mark.usefixtures("one_thread_and_fake_loader")]




def _spawn(tmp_path, job):
    mp.start_processes(worker, args=(2, str(tmp_path), job), nprocs=2, join=True, start_method="spawn")
    return torch.load(tmp_path / f"{job}.pt")


def _losses(out):
    return [r["loss"] for r in read_metrics(out / "metrics.jsonl")]


def _assert_close_states(a, b, **tol):
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], msg=key, **tol)


def test_ddp_and_fsdp_match_one_process_with_the_same_global_batch(tmp_path):
    single = Trainer(config(tmp_path / "single", "optim.grad_accum=2"), data=fake_data())
    single.fit()
    reference = full_state(single)
    results = _spawn(tmp_path, "parallel")
    for mode in ("ddp", "fsdp"):
        torch.testing.assert_close(torch.tensor(_losses(tmp_path / mode)),
                                   torch.tensor(_losses(tmp_path / "single")), rtol=1e-5, atol=0, msg=mode)
        _assert_close_states(results[mode], reference, rtol=1e-4, atol=1e-6)


def test_two_process_exact_resume_and_resume_across_world_sizes(tmp_path):
    # A one-process run (2 micro-batches per step) stopped by SIGTERM after step 2; the 2-process job resumes it.
    cut = Trainer(config(tmp_path / "from1", "parallel.mode='none'", "optim.grad_accum=2"), data=fake_data())
    original = cut.train_step

    def stop_after_step_2(batches):
        result = original(batches)
        if cut.step == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return result

    cut.train_step = stop_after_step_2
    assert cut.fit()["step"] == 2

    results = _spawn(tmp_path, "resume")
    assert results["stopped_at"] == 2
    # two processes, interrupted and resumed: bit-identical weights, Adam state and loss curve
    for key in results["full"]:
        assert torch.equal(results["resumed"][key], results["full"][key]), key
    assert read_metrics(tmp_path / "cut" / "metrics.jsonl") == [
        {**r, "tokens_per_s": s["tokens_per_s"], "mfu": s["mfu"]}
        for r, s in zip(read_metrics(tmp_path / "full" / "metrics.jsonl"),
                        read_metrics(tmp_path / "cut" / "metrics.jsonl"))]
    # 1 -> 2 processes: same global batches, float32 rounding apart
    _assert_close_states(results["from1"], results["full"], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(torch.tensor(_losses(tmp_path / "from1")),
                               torch.tensor(_losses(tmp_path / "full")), rtol=1e-5, atol=0)
    # 2 -> 1 process: the 2-process checkpoint of step 2, continued by one process with 2 micro-batches
    (tmp_path / "to1" / "checkpoints").mkdir(parents=True)
    shutil.copytree(tmp_path / "cut" / "checkpoints" / "step-2", tmp_path / "to1" / "checkpoints" / "step-2")
    to1 = Trainer(config(tmp_path / "to1", "optim.grad_accum=2"), data=fake_data())
    assert to1.fit(resume=True)["step"] == 4
    _assert_close_states(full_state(to1), results["full"], rtol=1e-4, atol=1e-6)
