"""Process setup: one process, or one of several (DDP), started by `--nproc=N` or torchrun."""
import contextlib
import ctypes
import gc
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

import torch

from machinery.safe import die


def launch(n):
    """Run this same command as n DDP workers, as torchrun would, and return the exit status;
    a failure stops the others, and the first one's error is said once."""
    with socket.socket() as s:  # a free port for the workers to meet on
        s.bind(("127.0.0.1", 0))
        env = dict(os.environ, WORLD_SIZE=str(n), LOCAL_WORLD_SIZE=str(n), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(s.getsockname()[1]))
    errs = [tempfile.TemporaryFile("w+") for _ in range(n)]
    kids = [subprocess.Popen([sys.executable, *sys.argv], env=dict(env, RANK=str(r), LOCAL_RANK=str(r)),
                             stdout=None if r == 0 else subprocess.DEVNULL, stderr=errs[r])
            for r in range(n)]
    sig, t_done = signal.SIGTERM, None  # t_done: when the first ended well
    try:  # until one fails or all are done
        while not any(codes := [k.poll() for k in kids]) and None in codes:
            # the first is done, the run written: the others must not hang on its leaving the group
            if codes[0] == 0 and time.time() - (t_done := t_done or time.time()) > 10:
                break
            time.sleep(0.1)
        first = next((r for r, c in enumerate(codes) if c), None)  # the first that failed
    except KeyboardInterrupt:  # the workers had it too, from the terminal, or have it now
        first, sig = 0, signal.SIGINT
        t_end = time.time() + 3  # a terminal's Ctrl-C reached them all: they end by themselves
        while None in [k.poll() for k in kids] and time.time() < t_end:
            time.sleep(0.1)
    for k in kids:  # (send_signal passes over one that has ended)
        k.send_signal(sig)
    for k in kids:
        try:
            k.wait(timeout=10)
        except subprocess.TimeoutExpired:
            k.kill()
            k.wait()
    if sig == signal.SIGINT:  # the first worker whose own handler said what it kept
        first = next((r for r, k in enumerate(kids) if k.returncode == 130), 0)
    errs[first or 0].seek(0)
    sys.stderr.write(errs[first or 0].read())
    code = kids[first].returncode if first is not None else 0
    return 128 - code if code < 0 else code  # a signal's death, as a shell reports it


def start(cfg):
    """(rank, world size, device); with --nproc=N, it runs the workers and ends with their status."""
    if cfg.nproc > 1 and "RANK" not in os.environ:
        sys.exit(launch(cfg.nproc))
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    device = cfg.device
    if world > 1:
        if cfg.grad_accum % world:
            die(f"--grad_accum={cfg.grad_accum} must be a multiple of the {world} processes")
        nccl = torch.cuda.is_available() and cfg.device in ("auto", "cuda")
        # DDP's first use imports torch._dynamo, and with it modules whose functions take the
        # world group as a default argument: imported after init, they would keep the group
        # alive past destroy_process_group, and gloo's threads would be torn down as Python
        # exits, where one that needs the GIL aborts the process ("terminate called without
        # an active exception"). Imported before init, those defaults are None.
        import torch._dynamo as _  # noqa: F401 (as _: `import torch.x` would make torch local)
        hook = sys.excepthook  # boot's one line
        torch.distributed.init_process_group("nccl" if nccl else "gloo")
        # init wraps the hook in one that holds its output in a buffer, to prefix it with the
        # rank: boot's os._exit would end the process first, and Ctrl-C's line go unsaid
        sys.excepthook = hook
        if nccl:
            device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
            torch.cuda.set_device(device)
        if sys.platform == "linux":  # a worker whose launcher dies stops, not trains on alone
            ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # 1: PR_SET_PDEATHSIG
            if os.getppid() == 1:  # it died before that line
                die("the process that started this one is gone", 143)
    return rank, world, device


@contextlib.contextmanager
def rank0_first(world, rank):
    if world > 1 and rank != 0:
        torch.distributed.barrier()
    yield
    if world > 1 and rank == 0:
        torch.distributed.barrier()


def wrap(model, world, dev, dev_type):
    return model if world == 1 else torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[dev] if dev_type == "cuda" else None)


def rng_states(world, dev_type):
    """Every process's RNG state (dropout draws from it), gathered for the checkpoint."""
    mine = (torch.get_rng_state(), torch.cuda.get_rng_state() if dev_type == "cuda" else None)
    every = [mine] * world
    if world > 1:
        torch.distributed.all_gather_object(every, mine)  # fills every place
    return every


def stop(world):
    """End the process group, once the caller has let go of its DDP model (gloo's threads: start())."""
    if world > 1:
        gc.collect()  # a DDP model's last references may sit in cycles
        torch.distributed.destroy_process_group()
