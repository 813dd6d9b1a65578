"""Sharding the model with FSDP2 (``torch.distributed.fsdp.fully_shard``): one unit per block, then the root."""
from __future__ import annotations

from .model import CM3Leon


def shard_model(model: CM3Leon, *, mesh=None, reshard_after_forward: bool = True) -> CM3Leon:
    """Applies FSDP2 to every transformer block and to the root module (embeddings, final norm, output),
    around ``forward`` and ``loss``.

    Call after ``torch.distributed.init_process_group``; ``mesh`` defaults to all ranks on the model's device
    type. Works on CPU with the gloo backend and on GPUs with NCCL.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method
    import torch.distributed as dist

    if mesh is None:
        mesh = init_device_mesh(model.embed.weight.device.type, (dist.get_world_size(),))
    for block in model.blocks:
        fully_shard(block, mesh=mesh, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard_after_forward)
    # The training loss reads the root's parameters (embeddings, output layer) outside forward(): FSDP must
    # gather them around that method too, or they stay sharded DTensors.
    register_fsdp_forward_method(model, "loss")
    return model
