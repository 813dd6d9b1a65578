"""FSDP2 wrapping, proven with a 2-process CPU run on the gloo backend."""
from __future__ import annotations

import datetime
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from model_fixtures import small_model


def _train_step(model, tokens, cu):
    logits = model(tokens, cu_seqlens=cu, max_seqlen=12)
    loss = torch.nn.functional.cross_entropy(logits[:-1].float(), tokens[1:])
    loss.backward()
    return loss.detach()


def _worker(rank: int, world: int, out_dir: str) -> None:
    # A file store instead of a TCP port: no port to race for with other processes on the machine.
    dist.init_process_group("gloo", init_method=f"file://{out_dir}/store", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    try:
        from cm3leon.distributed import shard_model

        torch.set_num_threads(1)
        model = shard_model(small_model("chameleon").train())
        g = torch.Generator().manual_seed(rank)  # each rank its own data, as in data parallelism
        tokens = torch.randint(0, 97, (20,), generator=g)
        loss = _train_step(model, tokens, torch.tensor([0, 12, 20], dtype=torch.int32))
        grads = {n: p.grad.full_tensor() for n, p in model.named_parameters()}
        if rank == 0:
            torch.save({"loss": loss, "grads": grads}, Path(out_dir) / "rank0.pt")
        dist.barrier()  # both ranks are done with the collectives before either tears down
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")
def test_fsdp2_two_process_gradients_match_single_process(tmp_path):
    mp.start_processes(_worker, args=(2, str(tmp_path)), nprocs=2, join=True, start_method="spawn")
    result = torch.load(tmp_path / "rank0.pt")
    # Reference: the same two ranks' batches on one process; FSDP averages gradients over ranks.
    model = small_model("chameleon").train()
    cu = torch.tensor([0, 12, 20], dtype=torch.int32)
    for rank in range(2):
        tokens = torch.randint(0, 97, (20,), generator=torch.Generator().manual_seed(rank))
        loss = _train_step(model, tokens, cu)
        if rank == 0:
            torch.testing.assert_close(result["loss"], loss, rtol=1e-5, atol=1e-6)
    for name, p in model.named_parameters():
        torch.testing.assert_close(result["grads"][name], p.grad / 2, rtol=1e-4, atol=1e-6, msg=name)
