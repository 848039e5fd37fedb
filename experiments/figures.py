"""The paper's findings (FIGURES), from runs of orpo.py, each its own process, in turn: their
numbers as CSVs in out_dir/NAME/, and NAME.png. orpo.py's --config and --key=value follow NAME:

    python -m experiments.figures NAME [--seeds=3] [--key=value ...]
"""
from machinery import boot  # first: it sets what torch reads as it loads
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
import types

import numpy as np
import torch

import orpo
import prepare_data
from experiments import plot
from machinery import checkpoint, report, synthetic
from machinery.cli import parse_args, setup_device
from machinery.safe import die

def train(f, name, flags):
    out, f.k = os.path.join(f.d, name), f.k + 1
    shutil.rmtree(out, ignore_errors=True)  # a figure made again replaces its own runs
    left = f", about {(time.time() - f.t0) / (f.k - 1) * (f.n - f.k + 1):.0f} s left" if f.k > 1 else ""
    print(f"== run {f.k} of {f.n}: {name} {' '.join(flags)}{left} ==")
    # its own process group, so that Ctrl-C reaches this process alone, which says what is
    # on disk; subprocess.run kills the run on the way out (its checkpoints are atomic)
    cmd = [sys.executable, orpo.__file__, *f.flags, *flags, f"--out_dir={out}"]
    if subprocess.run(cmd, process_group=0).returncode:
        die(f"the run in {out} failed (its error is above)")
    with open(os.path.join(out, "summary.json")) as s:
        return dict(dir=out, summary=json.load(s), log=plot.read_log(out))

def samples(run):  # the answers sampled after training
    return [r["samples"] for r in run["log"] if r["kind"] == "samples"][-1]

def trained(run, f):
    path = os.path.join(run["dir"], "ckpt.pt")
    return checkpoint.model_from_checkpoint(checkpoint.load_checkpoint(path), path).to(f.dev)

@torch.no_grad()
def pair_logps(model, split, f):
    """Per held-out pair (the first eval_pairs): response lengths and mean log-probs, chosen
    then rejected, and P(end-of-text) where the chosen answer ends (its last target)."""
    rows, n, B = [], min(f.cfg.eval_pairs, len(split[1])), f.cfg.batch_size
    for i in range(0, n, B):
        x, y, resp_mask, _ = orpo.make_batch(split, range(i, min(i + B, n)), f.dev)
        scored, m, b = resp_mask.bool(), resp_mask.sum(1), x.size(0) // 2
        with f.amp:
            tok = model.eval()(x, scored, y[scored])
        ell, ends = orpo.response_logps(tok, resp_mask, scored)[1], m.long().cumsum(0) - 1
        rows += [dict(len_w=int(m[j]), len_l=int(m[j + b]), mean_w=float(ell[j]),
                      mean_l=float(ell[j + b]), p_eot=float(tok[ends[j]].exp())) for j in range(b)]
    return rows

def head_to_head(a, b):
    """a's samples against b's, same prompts: (win, tie, loss) rates; win rate, ties half, ± s.e."""
    by_row = {s["row"]: s["score"] for s in b}
    w = [synthetic.win(s["score"], by_row[s["row"]]) for s in a]
    return [w.count(v) / len(w) for v in (1.0, 0.5, 0.0)], synthetic.mean_se(w)

def outcome(smp, f, model, split):
    """The judge's flaw rates and win rate vs chosen (± s.e.) of a model's answers; and why:
    P(end-of-text) where chosen ends (split's pairs), words sampled and chosen, share unended."""
    j = synthetic.judged(smp, smp)
    full = [len(f.enc.encode(s["sample"], disallowed_special=())) >= f.cfg.max_new_tokens for s in smp]
    return dict(**{k: j["flaw_rates"]["after"][k][0] for k in synthetic.FLAWS},
                win_vs_chosen=j["win_rate"][1][0], win_vs_chosen_se=j["win_rate"][1][1],
                p_eot=float(np.mean([p["p_eot"] for p in pair_logps(model, split, f)])),
                words=np.mean([len(s["sample"].split()) for s in smp]),
                words_chosen=np.mean([len(s["chosen"].split()) for s in smp]), at_limit=np.mean(full))

def cost(run, f, model):
    """What a run took: steps, forward passes, FLOPs (its batches replayed in step_rows'
    order; DPO adds the reference's forward pass, a third of a step), seconds, peak memory."""
    s, dpo, index = run["summary"], run["summary"]["loss"] == "dpo", f.index
    flops, order = 0.0, orpo.step_rows(index, f.cfg, 0, 0, 0, 1)
    for _ in range(s["iters"]):
        for rows in next(order)[0]:
            real, n_scored = report.batch_tokens(index, rows, f.cfg.sft_on_prompt)
            p, c, r = index[rows, 1:].T  # prepare_data's columns: lengths of prompt, chosen, rejected
            T = int((p + np.maximum(c, r)).max()) - 1  # the batch's width: its longest pair, less 1
            flops += model.flops(real, n_scored, T) * (4 / 3 if dpo else 1)
    passes = s["iters"] * f.cfg.grad_accum * f.cfg.batch_size * 2
    return dict(steps=s["iters"], policy_passes=passes, ref_passes=passes if dpo else 0,
                gflop=round(flops / 1e9, 3), train_s=round(s["seconds"], 1), peak_mb=s["peak_mem_mb"])

def judged(f, runs):
    """sft-vs-orpo: per seed, ORPO's answers against SFT's on the same prompts, and their
    off-topic rates, that run's standard errors apart; each model's flaw rates over the seeds."""
    seeds = sorted({s for _, s in runs})
    if "flaw_rates" not in runs["SFT", seeds[0]]["summary"]:
        return {}  # data that has no judge
    rate = lambda m, s, k, when="after", se="": runs[m, s]["summary"]["flaw_rates" + se][when][k]
    per_seed, flaws = [], []
    for s in seeds:
        (win, tie, loss), (h2h, se) = head_to_head(samples(runs["ORPO", s]), samples(runs["SFT", s]))
        a, b = (rate(m, s, "off_topic") for m in ("SFT", "ORPO"))
        gap = np.hypot(*(rate(m, s, "off_topic", se="_se") for m in ("SFT", "ORPO")))
        per_seed.append(dict(seed=s, orpo_vs_sft=h2h, orpo_vs_sft_se=se, win=win, tie=tie, loss=loss,
                             off_topic_sft=a, off_topic_orpo=b, ses_apart=(a - b) / gap if gap else 0.0))
    if len(seeds) > 1:  # and their mean, with the standard error of the head-to-head's
        h2h = synthetic.mean_se([r["orpo_vs_sft"] for r in per_seed], ddof=1)
        per_seed.append(dict({k: float(np.mean([r[k] for r in per_seed])) for k in per_seed[0]},
                             seed="mean", orpo_vs_sft_se=h2h[1]))
    for model, m, when in (("SFT", "SFT", "after"), ("ORPO", "ORPO", "after"),
                           ("chosen answers", "ORPO", "chosen")):
        flaws.append(dict(model=model))
        for k in synthetic.FLAWS:
            xs = [rate(m, s, k, when) for s in seeds]
            one = (xs[0], rate(m, seeds[0], k, when, "_se"))  # one seed: its prompts' error
            flaws[-1][k], flaws[-1][k + "_se"] = synthetic.mean_se(xs, ddof=1) if len(xs) > 1 else one
    return dict(seeds=per_seed, flaws=flaws)

def uniform(f, runs):
    """ratio, Fig. 6: log OR and log PR for P_w, P_l uniform on (0, 1): spread, histogram."""
    p = torch.rand(2, 100_000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    odds = p.log() - (-p).log1p()
    ratios = {"log odds ratio": odds[0] - odds[1], "log prob ratio": p[0].log() - p[1].log()}
    e = np.linspace(-10, 10, 101)
    return dict(spread=[{f"std_{k.replace(' ', '_')}": float(v.std()) for k, v in ratios.items()}],
                uniform=[dict(run=k, log_ratio=(a + b) / 2, count=int(n)) for k, v in ratios.items()
                         for a, b, n in zip(e, e[1:], np.histogram(v.numpy(), e)[0])])

def by_length(pairs):
    """The share of pairs that mean and summed log P rank right (chosen above rejected),
    where the chosen answer is shorter, as long, longer; and how many pairs each."""
    row = {}
    for sign, what in ((-1, "shorter"), (0, "same"), (1, "longer")):
        g = [p for p in pairs if np.sign(p["len_w"] - p["len_l"]) == sign]
        row[f"n_{what}"] = len(g)
        row[f"{what}_by_mean"] = np.mean([p["mean_w"] > p["mean_l"] for p in g] or 0)
        row[f"{what}_by_sum"] = np.mean([p["mean_w"] * p["len_w"] > p["mean_l"] * p["len_l"] for p in g] or 0)
    return row

def lengths(f, runs):
    """length: by_length under the untrained model, then each run's (the first seed's)."""
    torch.manual_seed(f.cfg.seed)  # the model every run starts from: orpo.train's seed, then its model
    models = dict(untrained=checkpoint.build_model(f.cfg, f.meta, None).to(f.dev))
    models.update({m: trained(r, f) for (m, s), r in runs.items() if s == f.cfg.seed})
    return dict(by_length=[dict(run=m, **by_length(pair_logps(x, f.val, f))) for m, x in models.items()])

def tune_dpo(f, sft, n_report):
    """DPO from the SFT run, its reference, at each (beta, lr), judged on the n_tune held-out
    prompts after the n_report reported: the best by win rate vs chosen, and the grid's table."""
    M, n = f.opts["dpo_iters"] or f.cfg.max_iters // 2, f.opts["n_tune"]
    ck = os.path.join(sft["dir"], "ckpt.pt")
    tune, points = (f.val[0], f.val[1][n_report:n_report + n]), []
    judge = report.Judge(tune, f.enc, f.meta, dataclasses.replace(f.cfg, n_samples=n), f.dev, f.amp)
    for beta, lr in f.opts["grid"]:
        points.append(dict(train(f, f"DPO_beta{beta:g}_lr{lr:g}", [
            "--loss=dpo", f"--init_from={ck}", f"--ref={ck}", f"--max_iters={M}", f"--beta={beta}",
            f"--lr={lr}", f"--min_lr={lr / 10}", f"--warmup_iters={M // 20}", f"--eval_interval={M}",
            f"--n_samples={n_report}"]), beta=beta, lr=lr))
        if n:  # judged on the tuning prompts, then let go
            model = trained(points[-1], f)
            points[-1]["row"] = dict(beta=beta, lr=lr, **outcome(judge(model), f, model, tune))
    if not n:
        return points[0], []
    print(f"DPO's beta and lr, tuned on {n} held-out prompts (val rows {n_report + 1}-{n_report + n}), "
          f"not the {n_report} reported")
    best = max(points, key=lambda p: p["row"]["win_vs_chosen"])
    return best, [dict(p["row"], chosen=p is best) for p in points]

def methods(f, runs):
    """SFT, then DPO from it (tune_dpo), against ORPO from scratch: what each costs, what comes
    out and why. Each phase is its own process, so its peak memory is its own."""
    n_report = min(f.cfg.n_samples, len(f.val[1]) - f.opts["n_tune"])
    if n_report < 1:
        die(f"--tune_samples={f.opts['n_tune']} leaves none of the {len(f.val[1])} held-out prompts "
            "to report on")
    f.n = 2 + len(f.opts["grid"])
    sft, orpo_run = (train(f, m, [f"--lam={lam}", f"--n_samples={n_report}"])
                     for m, lam in (("SFT", 0), ("ORPO", 1)))
    best, grid = tune_dpo(f, sft, n_report)
    model = trained(sft, f)  # of the runs' shape, which gives their FLOPs
    c = {m: cost(r, f, model) for m, r in (("SFT", sft), ("DPO phase", best), ("ORPO", orpo_run))}
    c["SFT then DPO"] = {k: max(c["SFT"][k], c["DPO phase"][k]) if k == "peak_mb" else
                         c["SFT"][k] + c["DPO phase"][k] for k in c["SFT"]}
    outcomes = []
    for m, r in (("SFT", sft), ("SFT then DPO", best), ("ORPO", orpo_run)):
        e, h2h = r["summary"]["end"], head_to_head(samples(r), samples(orpo_run))[1]
        outcomes.append(dict(method=m, logp_chosen=e["ell_w"], logp_rejected=e["ell_l"],
                             margin=e["margin"], acc=e["acc"], **outcome(samples(r), f, trained(r, f), f.val),
                             h2h_vs_orpo=h2h[0], h2h_vs_orpo_se=h2h[1]))
    costs = [dict(method=m, **c[m]) for m in ("SFT", "DPO phase", "SFT then DPO", "ORPO")]
    return dict(grid=grid, costs=costs, outcomes=outcomes)

FIGURES = {  # name: ({run: orpo.py's flags}, what the figure adds to the runs' curves)
    "sft-vs-orpo": ({"SFT": ["--lam=0"], "ORPO": ["--lam=1"]}, judged),  # Figs. 3, 7: SFT lifts both
    "lambda": ({f"lam={x}": [f"--lam={x}"] for x in (0.0, 0.1, 0.5, 1.0)}, None),  # App. E: L_OR's weight
    "ratio": ({"odds ratio": ["--loss=orpo"], "prob ratio": ["--loss=prob"]}, uniform),  # Sec. 7.1
    "length": ({"mean log P": ["--loss=orpo"], "summed log P": ["--loss=sum"]}, lengths),  # Eq. 3
    "methods": ({}, methods),  # SFT then DPO (tuned) vs ORPO: runs that depend on each other
}
BARS = {  # a table: its panels of bars, (columns, title, with ± 1 standard error), by its first column
    "by_length": [([f"{w}_by_{k}" for w in ("shorter", "same", "longer") for k in ("mean", "sum")],
                   "pairs ranked right, chosen answer shorter, as long, longer", False)],
    "flaws": [(synthetic.FLAWS, "flaw rates of the sampled answers", True)],
    "costs": [(["gflop"], "training GFLOP", False), (["peak_mb"], "peak memory, MB", False)],
    "outcomes": [(["logp_chosen", "logp_rejected"], "held-out mean log P", False),
                 (["win_vs_chosen", "h2h_vs_orpo"], "win rates, ± 1 s.e.", True),
                 (synthetic.FLAWS, "flaw rates of the sampled answers", False),
                 (["p_eot", "at_limit"], "P(end-of-text) where chosen ends; unended", False)],
}

def panels(t):
    """What a figure's PNG shows, from its tables t: [(plot's function, its arguments)]."""
    p = [(plot.curves, t["curves"], [k], f"held-out mean log P({k[5:]})")
         for k in ("logp_chosen", "logp_rejected") if "curves" in t]
    if "uniform" in t:
        p.append((plot.curves, t["uniform"], ["count"], "uniform random P_w, P_l (Fig. 6)", "log_ratio"))
    return p + [(plot.bars, t[k], *bar) for k in BARS if k in t for bar in BARS[k]]

def changed(cfg, preset):
    base = orpo.Config(**orpo.PRESETS[preset])
    return {k: v for k, v in dataclasses.asdict(cfg).items() if v != getattr(base, k)}

def run_title(name, preset, cfg, seeds=1):
    """What ran (config, seeds), and each setting that differs from the preset's own, so
    that a short or small run never passes for the default one."""
    diff = [f"{k}={v}" for k, v in changed(cfg, preset).items() if k not in ("out_dir", "data_dir", "seed")]
    s = f"seeds {cfg.seed}-{cfg.seed + seeds - 1}" if seeds > 1 else f"seed {cfg.seed}"
    return f"{name}: config {preset}, {s}" + ("\n" + ", ".join(diff) if diff else "")

def make(name, d, cfg, preset, opts):
    """Train the figure's runs (each seed) and add its tables; write them, print the short ones."""
    runs, extra = FIGURES[name]
    seeds = range(cfg.seed, cfg.seed + opts["seeds"])
    # f: the figure being made, which its parts share: settings, progress, held-out data
    f = types.SimpleNamespace(cfg=cfg, opts=opts, d=d, n=len(runs) * len(seeds), k=0, t0=time.time())
    f.flags = [f"--config={preset}", *(f"--{k}={v}" for k, v in changed(cfg, preset).items()),
               f"--eval_interval={opts['every']}"]
    f.meta, data, f.enc = prepare_data.for_run(cfg)
    f.val, f.index = data["val"], data["train"][1]
    f.dev, _, _, f.amp = setup_device(cfg.device, cfg.dtype)
    done = {(m, s): train(f, f"{m}_seed{s}".replace(" ", "_"), [*flags, f"--seed={s}"])
            for s in seeds for m, flags in runs.items()}
    curves = [[dict(run=m, seed=s, iter=e["iter"], logp_chosen=e["ell_w"], logp_rejected=e["ell_l"],
                    margin=e["margin"], acc=e["acc"]) for e in r["log"] if e["kind"] == "eval"]
              for (m, s), r in done.items()]
    tables = dict(curves=sum(curves, []), end=[c[-1] for c in curves], **(extra(f, done) if extra else {}))
    tables = {k: rows for k, rows in tables.items() if rows}  # methods has no curves; one DPO, no grid
    for k, rows in tables.items():
        plot.write_csv(os.path.join(d, f"{k}.csv"), rows)
        if k not in ("curves", "uniform"):
            plot.show(os.path.join(d, f"{k}.csv"), rows)
    return tables

OPTIONS = {  # figures.py's own options: (default, what --help says)
    "seeds": (1, "runs of each setting, seeds seed, seed+1, ...; curves show their mean (not methods)"),
    "dpo_iters": (0, "methods: DPO's iterations from the SFT run; 0: max_iters / 2"),
    "dpo_betas": ("0.01,0.03,0.1", "methods: DPO's betas to tune over, comma-separated"),
    "dpo_lrs": ("3e-5,1e-4,3e-4", "methods: DPO's learning rates to tune over, comma-separated"),
    "tune_samples": (200, "methods: held-out prompts, after those reported, that pick DPO's setting"),
}

def main():
    sys.stdout.reconfigure(line_buffering=True)
    args = sys.argv[1:]
    name = args.pop(0) if args and args[0] in FIGURES else None
    if name is None and not {"-h", "--help"} & set(args):
        die(f"the first argument names the figure: one of {', '.join(FIGURES)}")
    preset, cfg, opts = parse_args(
        args, orpo.Config, orpo.PRESETS, {k: v[0] for k, v in OPTIONS.items()}, rules=orpo.RULES,
        usage=f"NAME [--config NAME] [--key=value ...]; NAME: {', '.join(FIGURES)};",
        notes={k: v[1] for k, v in OPTIONS.items()})
    try:  # figures.py's own options, before any work; methods' grid of (beta, lr) into opts
        betas, lrs = ([float(v) for v in opts[k].split(",")] for k in ("dpo_betas", "dpo_lrs"))
    except ValueError:
        die(f"--dpo_betas and --dpo_lrs take numbers, comma-separated, got {opts['dpo_betas']!r} "
            f"and {opts['dpo_lrs']!r}")
    grid = [(b, lr) for b in betas for lr in lrs]
    if opts["seeds"] < 1 or opts["dpo_iters"] < 0 or opts["tune_samples"] < 0 or min(betas + lrs) <= 0:
        die("--seeds must be >= 1, --dpo_iters and --tune_samples >= 0, DPO's betas and lrs > 0")
    if len(grid) > 1 and not opts["tune_samples"]:
        die(f"--tune_samples=0 chooses none of the {len(grid)} DPO settings: give one beta and one lr")
    opts.update(grid=grid, n_tune=opts["tune_samples"] if len(grid) > 1 else 0)
    if hasattr(orpo, "holes_left"):  # the assignment's handout: the holes that every run
        orpo.holes_left(cfg)  # reaches are named before any work
    # about 30 evaluations per run, so that a curve shows its shape, not its corners
    opts["every"] = min(cfg.eval_interval, max(1, cfg.max_iters // 30))
    if opts["every"] != cfg.eval_interval:
        print(f"evals every {opts['every']} iterations, not --eval_interval={cfg.eval_interval}: about "
              f"30 points a curve over {cfg.max_iters} iterations; a smaller --eval_interval gives more")
    d = os.path.join(cfg.out_dir, name)
    try:
        tables = make(name, d, cfg, preset, opts)
    except KeyboardInterrupt:
        die(f"interrupted; safe on disk in {d}: each finished run's folder, the unfinished one's "
            f"ckpt.pt as of its last eval; the tables and the PNG are written at the end", 130)
    png = os.path.join(d, f"{name}.png")
    plot.draw(png, run_title(name, preset, cfg, opts["seeds"]), panels(tables), os.path.join(d, ""))

if __name__ == "__main__":
    main()
