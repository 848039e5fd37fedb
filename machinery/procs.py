"""Process setup: one process, or one of torchrun's (DDP). orpo.py calls each piece once:
start() before anything, rank0_first() around the data, wrap() around the model,
rng_states() at each checkpoint and stop() at the end."""
import contextlib
import ctypes
import os
import signal
import sys

import torch

from machinery.safe import die


def start(cfg):
    """(rank, world size, device): one process, or torchrun's (it sets RANK, WORLD_SIZE)."""
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    device = cfg.device
    if world > 1:
        if cfg.grad_accum % world:
            die(f"--grad_accum={cfg.grad_accum} must be a multiple of the {world} processes")
        nccl = torch.cuda.is_available() and cfg.device in ("auto", "cuda")
        torch.distributed.init_process_group("nccl" if nccl else "gloo")
        if nccl:
            device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
            torch.cuda.set_device(device)
        if sys.platform == "linux":  # a worker whose launcher dies stops, not trains on alone
            ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # 1: PR_SET_PDEATHSIG
            if os.getppid() == 1:  # it died before that line
                die("torchrun, which started this process, is gone", 143)
    return rank, world, device


@contextlib.contextmanager
def rank0_first(world, rank):
    """The first process runs the block (it prepares the data) before the others do."""
    if world > 1 and rank != 0:
        torch.distributed.barrier()
    yield
    if world > 1 and rank == 0:
        torch.distributed.barrier()


def wrap(model, world, dev, dev_type):
    """The model as the loop trains it: itself, or under DDP, which averages the gradients."""
    if world == 1:
        return model
    return torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[dev] if dev_type == "cuda" else None)


def rng_states(world, dev_type):
    """Every process's RNG state (dropout draws from it), gathered for the checkpoint."""
    mine = (torch.get_rng_state(), torch.cuda.get_rng_state() if dev_type == "cuda" else None)
    if world == 1:
        return [mine]
    every = [None] * world
    torch.distributed.all_gather_object(every, mine)
    return every


def stop(world):
    if world > 1:
        torch.distributed.destroy_process_group()
