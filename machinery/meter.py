"""What the training loop costs, counted on the host: the tokens and FLOPs of each step (the
log line's tok/s and FLOP/s) and the run's passes, FLOPs and seconds (summary.json's cost)."""
import time

import numpy as np

from machinery.report import peak_mem_mb, print_step
from prepare_data import CHOSEN, PROMPT, REJECTED


def batch_tokens(index, rows, sft_on_prompt):
    """(non-pad input tokens, positions the loss scores) of a batch, counted on the host."""
    lens = index[rows].astype(np.int64)
    real = int((2 * lens[:, PROMPT] + lens[:, CHOSEN] + lens[:, REJECTED] - 2).sum())
    return real, real if sft_on_prompt else int(lens[:, CHOSEN:].sum())


def print_start(preset, raw, dev, dtype, cfg, n_train, world):
    """The line a run opens with: what it trains, where, and how the batch is made."""
    print(f"{preset}: {raw.num_params() / 1e6:.2f}M parameters, {dev} {dtype}, lam={cfg.lam}, "
          f"{n_train} train pairs, {world} process(es) x {cfg.grad_accum // world} "
          f"micro-steps x {cfg.batch_size} pairs")


class Meter:
    """What the training loop costs: its steps, forward passes and FLOPs, kept in the run's
    Progress (summary.json's cost), and the tokens/s and FLOP/s of the printed line. Counted
    on the host from the data's index: no device sync. Made as the loop starts."""

    def __init__(self, model, index, cfg, world, progress, ref):
        self.model, self.index, self.sft_on_prompt = model, index, cfg.sft_on_prompt
        self.world, self.ref, self.cost = world, ref, progress.cost
        self.t_start = time.time() - progress.seconds  # the clock goes on from a checkpoint's
        self.t_log, self.toks, self.flops = time.time(), 0, 0

    def step(self, rows, batches, t0):
        """Count one optimizer step on this process: its batches' rows, begun at time t0."""
        n, f = 0, 0  # this step's tokens and FLOPs
        for r, b in zip(rows, batches):
            real, n_scored = batch_tokens(self.index, r, self.sft_on_prompt)
            fb = self.model.flops(real, n_scored, b[0].size(1))
            n, f = n + real, f + fb + (fb / 3 if self.ref else 0)  # ref: a forward pass alone
            self.cost["policy_passes"] += len(b[0])
            self.cost["ref_passes"] += len(b[0]) if self.ref else 0
        self.toks, self.flops = self.toks + n, self.flops + f
        self.cost["steps"], self.cost["flops"] = self.cost["steps"] + 1, self.cost["flops"] + f
        self.cost["train_seconds"] += time.time() - t0

    def print_step(self, it, vals, lr):
        """The log line, with every process's tokens and FLOPs since the last one."""
        print_step(it, vals, lr, self.toks * self.world, self.flops * self.world,
                   time.time() - self.t_log)
        self.t_log, self.toks, self.flops = time.time(), 0, 0

    def seconds(self):
        """Seconds in the training loop, the resumed run's included."""
        return time.time() - self.t_start

    def total(self, dev_type):
        """The cost as summary.json holds it."""
        return dict(self.cost, processes=self.world, peak_mem_mb=round(peak_mem_mb(dev_type)))
