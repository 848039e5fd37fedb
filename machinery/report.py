"""What a run of orpo.py records, and its loop never reads: sampled answers and their verdicts
(Judge), out_dir/log.jsonl, the printed lines (Speed: tok/s) and the summary (summary.json)."""
import json
import os
import sys
import time

import numpy as np
import torch

from machinery import boot, synthetic
from machinery.cli import settings
from machinery.safe import atomic_write, die, one_line


def decode(enc, ids, eot):
    return enc.decode(ids[:ids.index(eot)] if eot in ids else ids)


class Judge:
    """Answers sampled for a split's first n_samples prompts, and on the synthetic task the judge's."""

    def __init__(self, split, enc, meta, cfg, device, amp):
        tokens, index = split  # index columns, prepare_data.py's: offset, prompt, chosen, rejected
        self.pairs = [(tokens[o:o + p], tokens[o + p:o + p + c])
                      for o, p, c, _ in index[:min(cfg.n_samples, len(index))].tolist()]
        self.enc, self.meta, self.cfg, self.device, self.amp = enc, meta, cfg, device, amp

    @torch.no_grad()
    def __call__(self, model):
        cfg, eot, by_len, out = self.cfg, self.meta["eot"], {}, []
        text = lambda ids: decode(self.enc, [int(i) for i in ids], eot)
        gen = torch.Generator(device=self.device).manual_seed(cfg.seed)
        for r, (prompt, _) in enumerate(self.pairs):  # prompts of one length: one batch
            by_len.setdefault(len(prompt), []).append(r)
        model.eval()
        for p, group in sorted(by_len.items()):
            for i in range(0, len(group), cfg.batch_size):
                rs = group[i:i + cfg.batch_size]
                prompts = torch.from_numpy(np.stack([self.pairs[r][0] for r in rs]).astype(np.int64))
                with self.amp:
                    ids = model.generate(prompts.to(self.device), cfg.max_new_tokens, cfg.temperature,
                                         cfg.top_k or None, eot, gen)
                out += [dict(row=r, prompt=text(self.pairs[r][0]), sample=text(new),
                             chosen=text(self.pairs[r][1])) for r, new in zip(rs, ids[:, p:].tolist())]
        model.train()
        out.sort(key=lambda s: s["row"])
        if self.meta["tokenizer"] != "synthetic":  # a file's pairs: no judge
            return out
        try:
            return [dict(s, **synthetic.verdict(s["prompt"], s["sample"], s["chosen"])) for s in out]
        except ValueError as e:  # prompts cut short (a small block_size) cannot be judged
            print(f"note: the judge cannot score these answers: {one_line(e)}")
            return out


def open_log(out_dir, resume_at=None):
    """out_dir/log.jsonl, open to append, and the samples taken before training (None: not yet).
    A resumed run keeps the records before its checkpoint, and its eval: the rest run again."""
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


def record_eval(log, it, m):
    write(log, dict(kind="eval", iter=it, **m))
    print(f"eval {it:5d} | L_SFT {m['l_sft']:.4f} | L_OR {m['l_or']:.4f} | log P chosen "
          f"{m['ell_w']:.3f} | log P rejected {m['ell_l']:.3f} | log OR {m['log_or']:.3f} | "
          f"acc {m['acc']:.3f} | margin {m['margin']:.3f}")
    return dict(iter=it, **m)


def record_samples(log, it, title, samples, k=3):
    """Sampled answers: into the log, and k printed; after training, the first k that the
    judge found a flaw in, named, and how many have one: what the model still gets wrong."""
    write(log, dict(kind="samples", iter=it, samples=samples))
    bad = lambda s: [f.replace("_", " ") for f, v in s.get("flaws", {}).items() if v]
    flawed = [s for s in samples if bad(s)] if it else []
    print(f"samples {title}" + (f" ({len(flawed)} of {len(samples)} have a flaw; the first "
                                f"{min(k, len(flawed))}):" if flawed else ":"))
    for s in flawed[:k] or samples[:k]:
        judged = f"   judge {s['score']:.2f}" if "score" in s else ""
        print(f"  {s['prompt']!r} ->{s['sample']!r}{judged}" + (f"   ({', '.join(bad(s))})" if flawed else ""))
    return samples


def peak_mem_mb(dev_type):
    if dev_type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    import resource
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / (2**20 if sys.platform == "darwin" else 2**10)


def summarize(cfg, preset, loss, history, s0, s1, seconds, wall, pairs):
    """Print the held-out terms at start and end, the judge's on samples s0 (before) and s1 (after)."""
    a, b = history[0], history[-1]
    sft = loss.lam and cfg.lam == 0  # an ORPO-like loss without its L_OR: plain SFT
    what = (f"{loss.name} (beta={cfg.beta})" if loss.ref else "SFT baseline (lam=0)" if sft
            else f"{loss.name} (lam={cfg.lam})" if loss.lam else loss.name)
    moved = lambda k: "rose" if b[k] > a[k] else "fell" if b[k] < a[k] else ""
    rej = moved("ell_l")
    note_l = rej + (" with the chosen, as in the paper's Fig. 3" if sft and rej == moved("ell_w") == "rose"
                    else f": {what.split()[0]} pushed it down" if not sft and rej == "fell" else "")
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
               wall_seconds=wall, start=a, end=b, settings=settings(cfg))
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


def finish(log, cfg, preset, loss, history, s0, s1, seconds, wall, pairs, processes, dev_type):
    """Close the log; print the summary and write out_dir/summary.json (peak memory: this process's)."""
    log.close()
    summary = dict(summarize(cfg, preset, loss, history, s0, s1, seconds, wall, pairs),
                   processes=processes, peak_mem_mb=round(peak_mem_mb(dev_type)))
    with atomic_write(os.path.join(cfg.out_dir, "summary.json")) as tmp, open(tmp, "w") as f:
        json.dump(summary, f, indent=1)
    return summary


def batch_tokens(index, rows, sft_on_prompt):
    """(non-pad input tokens, positions the loss scores) of a batch, counted on the host."""
    p, c, r = index[rows][:, 1:].astype(np.int64).T  # prepare_data's columns 1-3: the lengths
    real = int((2 * p + c + r - 2).sum())
    return real, real if sft_on_prompt else int((c + r).sum())


def print_start(preset, raw, dev, dtype, cfg, n_train, world):
    """The line a run opens with: what it trains, where, and how the batch is made."""
    print(f"{preset}: {raw.num_params() / 1e6:.2f}M parameters, {dev} {dtype}, lam={cfg.lam}, "
          f"{n_train} train pairs, {world} process(es) x {cfg.grad_accum // world} "
          f"micro-steps x {cfg.batch_size} pairs")


class Speed:
    """The printed loss line, every log_interval steps, with the tokens per second of every
    process since the last one, counted on the host from the data's index (no device sync)."""

    def __init__(self, index, world):
        self.index, self.world, self.t, self.toks, self.n = index, world, time.time(), 0, 0
        boot.THREADS.check()  # before the first eval and samples, from the load since the start

    def step(self, rows, it, vals, lr, show):
        self.toks += sum(batch_tokens(self.index, r, False)[0] for r in rows) * self.world
        self.n += 1
        if show:
            dt = time.time() - self.t
            print(f"iter {it:5d} | loss {vals[0]:.4f} | L_SFT {vals[1]:.4f} | L_OR {vals[2]:.4f} | "
                  f"lr {lr:.2e} | {self.toks / dt:,.0f} tok/s | {1000 * dt / self.n:,.0f} ms/iter")
            self.t, self.toks, self.n = time.time(), 0, 0
        boot.THREADS.check()  # the thread count follows the load: at most every 2 s
