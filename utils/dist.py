"""torch.distributed in a few functions: every call is a no-op in a single process, so the loop reads the same."""
import datetime
import os

import torch
import torch.distributed as dist


def init_distributed():
    """Join the process group when started by torchrun, even as its only process (the same code path as with more);
    returns (rank, world_size, local_rank)."""
    if "TORCHELASTIC_RUN_ID" not in os.environ and int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1, 0
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", timeout=datetime.timedelta(minutes=30))
    return dist.get_rank(), dist.get_world_size(), local_rank


def is_distributed():
    return dist.is_available() and dist.is_initialized()


def rank():
    return dist.get_rank() if is_distributed() else 0


def world_size():
    return dist.get_world_size() if is_distributed() else 1


def local_rank():
    """This process's index among those of its machine (torchrun's LOCAL_RANK)."""
    return int(os.environ.get("LOCAL_RANK", "0")) if is_distributed() else 0


def local_world_size():
    """The number of processes training on this machine."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if is_distributed() else 1


def is_main_process():
    return rank() == 0


def all_reduce_sum(tensor):
    """Sum a tensor over all processes (in place) and return it."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast_object(obj):
    """Rank 0's value of a picklable object, on every rank."""
    if not is_distributed():
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def broadcast_buffers(module):
    """Give every rank rank 0's buffers (BatchNorm statistics) so evaluation agrees across ranks."""
    if is_distributed():
        for buffer in module.buffers():
            dist.broadcast(buffer, src=0)


def barrier():
    if is_distributed():
        dist.barrier()


def cleanup():
    if is_distributed():
        dist.destroy_process_group()
