"""Multi-process training under torchrun (PyTorch DDP): `torchrun --nproc_per_node=N main.py ...`.

torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; without them everything here is a no-op for one process.
Each rank trains on its own share of every epoch's batches (dataset.TrainBatches), DDP averages the
gradients, validation is sharded over the ranks, and rank 0 alone writes logs, TensorBoard and checkpoints.
"""
import datetime
import os

import torch
import torch.distributed as dist

# Ranks wait in a collective while others validate or rank 0 writes checkpoints and the final report.
TIMEOUT = datetime.timedelta(hours=2)


def rank():
    return dist.get_rank() if dist.is_initialized() else 0


def world_size():
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main():
    return rank() == 0


def init(device):
    """Join the torchrun process group if launched by torchrun; returns this rank's device.

    NCCL on CUDA (one GPU per rank, chosen by LOCAL_RANK), gloo on CPU.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=TIMEOUT)
    return device


def shutdown():
    if dist.is_initialized():
        dist.destroy_process_group()


def sum_all(values):
    """Element-wise sum over ranks of a 1-d float64 tensor (the tensor itself for one process)."""
    if dist.is_initialized():
        dist.all_reduce(values)
    return values


def barrier():
    if dist.is_initialized():
        dist.barrier()


def any_rank(flag, device):
    """Whether `flag` is set on any rank (just `flag` for one process)."""
    if not dist.is_initialized():
        return bool(flag)
    return bool(sum_all(torch.tensor([float(bool(flag))], dtype=torch.float64, device=device)).item())


def broadcast(obj):
    """Rank 0's value of a picklable Python object (paths, flags), on every rank."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(obj):
    """Every rank's value of a picklable object (e.g. random states), as a list in rank order."""
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def gather_pool(emb, ids):
    """Every rank's pool rows, concatenated in rank order, with gradients flowing back to each rank's rows.

    Ranks may hold different numbers of rows: each is padded to the longest with id 0, and `bias` is
    -inf there (0 elsewhere) so a softmax ignores the padding; `bias` is None when nothing was padded.
    """
    if not dist.is_initialized():
        return emb, ids, None
    from torch.distributed import _functional_collectives as collectives  # needs a distributed build of torch
    sizes = [torch.zeros(1, dtype=torch.long, device=ids.device) for _ in range(world_size())]
    dist.all_gather(sizes, torch.tensor([len(ids)], device=ids.device))
    sizes = torch.cat(sizes)
    longest, pad = int(sizes.max()), int(sizes.max()) - len(ids)
    if pad:
        emb, ids = torch.cat([emb, emb.new_zeros(pad, emb.shape[1])]), torch.cat([ids, ids.new_zeros(pad)])
    id_parts = [torch.empty_like(ids) for _ in range(world_size())]
    dist.all_gather(id_parts, ids.contiguous())
    # torch's all-gather with autograd (what torch.distributed.nn.functional.all_gather, deprecated, points to):
    # backward gives each rank's rows the sum over ranks of their gradients; wait_tensor: a plain tensor
    pool = collectives.wait_tensor(collectives.all_gather_single_autograd(emb.contiguous(), 0, dist.group.WORLD))
    pool_ids = torch.cat(id_parts)
    if bool((sizes == longest).all()):
        return pool, pool_ids, None
    valid = torch.arange(longest, device=ids.device)[None, :] < sizes[:, None]
    bias = torch.zeros(valid.shape, device=emb.device, dtype=emb.dtype).masked_fill_(~valid, float("-inf"))
    return pool, pool_ids, bias.reshape(-1)
