"""What a run of orpo.py observes and records, besides its checkpoint: answers sampled for
held-out prompts, with the synthetic task's judge's verdicts; out_dir/log.jsonl (a JSON line
per optimizer step, per eval and per set of samples); the eval and sample lines it prints;
peak memory; what the training loop costs (the Meter: the tokens and FLOPs of each step for
the log line's tok/s and FLOP/s, the run's passes, FLOPs and seconds for summary.json); and
the summary at the end (printed, and written to out_dir/summary.json). orpo.py calls these
(bench.py reads peak_mem_mb and batch_tokens too); its loss, step and loop never read what
they make.
"""
import json
import os
import sys
import time

import numpy as np
import torch

import prepare_data
from prepare_data import CHOSEN, OFF, PROMPT, REJECTED
from machinery import synthetic
from machinery.safe import atomic_write, die, one_line


@torch.no_grad()
def sample_and_judge(model, split, meta, cfg, device, ctx):
    """Sample an answer to each of the first n_samples held-out prompts. On the synthetic
    task the judge scores it; a win is a sample scored above the pair's chosen answer (a tie
    counts half), as the paper counts reward-model wins against a reference."""
    enc, eot = prepare_data.get_encoding(meta["tokenizer"]), meta["eot"]
    text = lambda ids: prepare_data.decode(enc, ids, eot)
    tokens, index = split
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    by_len, out = {}, []
    for r in range(min(cfg.n_samples, len(index))):  # prompts of one length: one batch
        by_len.setdefault(int(index[r][PROMPT]), []).append(r)
    model.eval()
    for p, group in sorted(by_len.items()):
        for i in range(0, len(group), cfg.batch_size):
            rs = group[i:i + cfg.batch_size]
            offs = [int(index[r][OFF]) for r in rs]
            prompts = torch.from_numpy(np.stack([tokens[o:o + p] for o in offs]).astype(np.int64))
            with ctx:
                ids = model.generate(prompts.to(device), cfg.max_new_tokens, cfg.temperature,
                                     cfg.top_k or None, eot, gen)
            for r, o, new in zip(rs, offs, ids[:, p:].tolist()):
                chosen = tokens[o + p:o + p + int(index[r][CHOSEN])].tolist()
                out.append(dict(row=r, prompt=text(tokens[o:o + p].tolist()), sample=text(new),
                                chosen=text(chosen)))
    model.train()
    out.sort(key=lambda s: s["row"])
    if meta["tokenizer"] == "synthetic":  # the synthetic task (not a file): its judge and the win
        try:
            verdicts = [synthetic.verdict(s["prompt"], s["sample"], s["chosen"]) for s in out]
        except ValueError as e:  # prompts cut short (a small block_size) cannot be judged
            print(f"note: the judge cannot score these answers: {one_line(e)}")
            return out
        for s, v in zip(out, verdicts):
            s.update(v)
    return out


def open_log(out_dir, resume_at=None):
    """out_dir/log.jsonl, open to append, and the samples taken before training. A new run
    starts an empty log (s0: None, not taken yet); a resumed run keeps the records up to its
    checkpoint's iteration, s0 among them, as the uninterrupted run's log has them: those
    after it are about to run again, and so are the samples taken at it after training."""
    name, kept, s0 = os.path.join(out_dir, "log.jsonl"), [], None
    try:
        os.makedirs(out_dir, exist_ok=True)
        if resume_at is not None and os.path.exists(name):
            with open(name) as f:  # a line cut short (a full disk, a kill) is one not yet run
                lines = [line for line in f if line.endswith("\n")]
            for n, line in enumerate(lines, 1):
                try:
                    r = json.loads(line)  # (a checkpoint is never at iteration 0: s0 stays)
                    if r["iter"] < resume_at or (r["iter"] == resume_at and r["kind"] != "samples"):
                        kept.append(line)
                        if r["kind"] == "samples" and s0 is None:  # the first: before training
                            s0 = r["samples"]
                except (ValueError, KeyError, TypeError):
                    die(f"{name}, line {n}: not a record of orpo.py's log")
        with atomic_write(name) as tmp, open(tmp, "w") as f:
            f.writelines(kept)
        log = open(name, "a")
    except OSError as e:
        die(f"could not write {name}: {one_line(e)}")
    return log, s0


def write(log, rec):
    if log:  # None on every process but the first
        try:
            log.write(json.dumps(rec) + "\n")
            log.flush()
        except OSError as e:
            die(f"could not write {log.name}: {one_line(e)}")


def print_step(it, vals, lr, toks, flops, dt):
    print(f"iter {it:5d} | loss {vals[0]:.4f} | L_SFT {vals[1]:.4f} | L_OR {vals[2]:.4f} | "
          f"lr {lr:.2e} | {toks / dt:,.0f} tok/s | {flops / dt / 1e9:,.1f} GFLOP/s")


def record_eval(log, history, it, m):
    """An eval's held-out means: into the run's history, the log, and one printed line."""
    history.append(dict(iter=it, **m))
    write(log, dict(kind="eval", iter=it, **m))
    print(f"eval {it:5d} | L_SFT {m['l_sft']:.4f} | L_OR {m['l_or']:.4f} | log P chosen "
          f"{m['ell_w']:.3f} | log P rejected {m['ell_l']:.3f} | log OR {m['log_or']:.3f} | "
          f"acc {m['acc']:.3f} | margin {m['margin']:.3f}")


def record_samples(log, it, title, samples, k=3):
    """Sampled answers: into the log, and the first k printed."""
    write(log, dict(kind="samples", iter=it, samples=samples))
    print(f"samples {title}:")
    for s in samples[:k]:
        judged = f"   judge {s['score']:.2f}" if "score" in s else ""
        print(f"  {s['prompt']!r} ->{s['sample']!r}{judged}")


def peak_mem_mb(dev_type):
    """This process's peak memory: its GPU allocations on CUDA, else its resident set."""
    if dev_type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    import resource
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / (2**20 if sys.platform == "darwin" else 2**10)


def summarize(cfg, preset, history, s0, s1, seconds, wall, pairs):
    """Print the held-out terms at the start and the end, and the judge's verdicts on the
    samples before (s0) and after (s1) training, each ± 1 standard error; return them as
    the dict that summary.json holds. A note says what this run's numbers show, or nothing."""
    a, b = history[0], history[-1]
    what = (f"DPO (beta={cfg.beta})" if cfg.loss == "dpo" else "SimPO" if cfg.ratio == "simpo"
            else "SFT baseline (lam=0)" if cfg.lam == 0 else f"ORPO (lam={cfg.lam})")
    moved = lambda k: "rose" if b[k] > a[k] else "fell" if b[k] < a[k] else ""
    sft_lifts = cfg.lam == 0 and cfg.loss == "orpo" and moved("ell_w") == moved("ell_l") == "rose"
    pushed = cfg.lam > 0 and moved("ell_l") == "fell"
    note_l = moved("ell_l") + (" with the chosen, as in the paper's Fig. 3" if sft_lifts else
                               f": {what.split()[0]} pushed it down" if pushed else "")
    row = lambda name, k, note="": f"  {name:29s} {a[k]:8.3f} {b[k]:8.3f}   {note}".rstrip()
    lines = [f"== summary: {what}, config {preset}, {b['iter']} iterations: {seconds:.0f} s in "
             f"the training loop, {wall:.0f} s in all ==",
             f"{f'held-out pairs ({pairs}):':31s}start      end",
             row("mean log P(chosen)    (Eq. 3)", "ell_w", moved("ell_w")),
             row("mean log P(rejected)  (Eq. 3)", "ell_l", note_l),
             row("log odds ratio        (Eq. 5)", "log_or"),
             row("preference accuracy", "acc", "share of pairs with log odds chosen > rejected"),
             row("L_SFT                 (Eq. 1)", "l_sft"), row("L_OR                  (Eq. 7)", "l_or")]
    out = dict(config=preset, loss=cfg.loss, lam=cfg.lam, iters=b["iter"], seconds=seconds,
               wall_seconds=wall, start=a, end=b)
    if s0 and s1 and "win" in s1[0]:  # the synthetic task: its judge scored the samples
        j, pm = synthetic.judged(s0, s1), lambda m_se: f"{m_se[0]:.3f} ± {m_se[1]:.3f}"
        lines += [f"judge, {len(s1)} sampled answers (T={cfg.temperature}), ± 1 standard error:",
                  f"  {'':29s} {'before':>15s} {'after':>15s} {'chosen answers':>15s}",
                  *(f"  {name:29s} {pm(j[k][0]):>15s} {pm(j[k][1]):>15s}" for name, k in
                    (("win rate vs chosen (ties 1/2)", "win_rate"), ("mean judge score", "judge_score"))),
                  *(f"  {f.replace('_', ' ') + ' rate':29s} " + " ".join(
                    f"{pm(j['flaw_rates'][k][f]):>15s}" for k in ("before", "after", "chosen"))
                    for f in synthetic.FLAWS)]
        rates = lambda i: {k: {f: v[f][i] for f in synthetic.FLAWS} for k, v in j["flaw_rates"].items()}
        out.update(win_rate=[m for m, _ in j["win_rate"]], win_rate_se=[e for _, e in j["win_rate"]],
                   judge_score=[m for m, _ in j["judge_score"]],
                   flaw_rates=rates(0), flaw_rates_se=rates(1))
    print("\n".join(lines))
    return out


def finish(log, cfg, preset, *, history, s0, s1, seconds, wall, pairs, cost):
    """Close the log; print the summary and write it to out_dir/summary.json."""
    log.close()
    summary = dict(summarize(cfg, preset, history, s0, s1, seconds, wall, pairs), cost=cost)
    with atomic_write(os.path.join(cfg.out_dir, "summary.json")) as tmp, open(tmp, "w") as f:
        json.dump(summary, f, indent=1)
    return summary


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
        self.cpu, self.hinted = time.process_time(), False

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
        """The log line, with every process's tokens and FLOPs since the last one; once, a
        note if the CPU ran this process's threads far less than the time they had."""
        dt, cpu = time.time() - self.t_log, time.process_time() - self.cpu
        print_step(it, vals, lr, self.toks * self.world, self.flops * self.world, dt)
        share = cpu / (dt * torch.get_num_threads())  # ~1 when each thread had its core
        if self.model.wte.weight.device.type == "cpu" and share < 0.75 and not self.hinted:
            self.hinted = True
            print(f"note: this process's {torch.get_num_threads()} threads got {share:.0%} of "
                  "the CPU time they had: other programs are using the cores. An idle machine, "
                  "or fewer threads (OMP_NUM_THREADS=1), runs faster")
        self.t_log, self.toks, self.flops, self.cpu = time.time(), 0, 0, time.process_time()

    def seconds(self):
        """Seconds in the training loop, the resumed run's included."""
        return time.time() - self.t_start

    def total(self, dev_type):
        """The cost as summary.json holds it: the passes and FLOPs of all the processes, as
        the log line counts them (each process runs as many micro-batches as process 0, whose
        counts these are); steps and seconds are the run's, shared by all."""
        per = {k: self.cost[k] * self.world for k in ("policy_passes", "ref_passes", "flops")}
        return dict(self.cost, **per, processes=self.world,
                    peak_mem_mb=round(peak_mem_mb(dev_type)))
