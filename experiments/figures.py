"""The paper's findings, reproduced by runs of orpo.py's training loop in sequence. Each
figure writes its numbers (CSV) to out_dir/<figure>/, and a PNG when matplotlib is installed.

    python figures.py sft-vs-orpo [--seeds=3]  # Figs. 3, 7: SFT lifts the rejected answers too
    python figures.py methods              # SFT then DPO (tuned) against ORPO: cost, outcome, why
    python figures.py lambda               # App. E: the weight of L_OR
    python figures.py ratio                # Sec. 7.1: odds ratio against probability ratio
    python figures.py length               # Eq. 3: why log P is a mean, not a sum

The figure's name comes first; orpo.py's --config NAME and --key=value overrides follow.
Every figure evaluates about 30 times per run, so that its curves show their shape.
`methods` tunes DPO's beta and learning rate (--dpo_betas, --dpo_lrs) on --tune_samples
held-out prompts that come after the --n_samples it reports on; ORPO keeps its preset's lam,
which was not tuned on those prompts either. --tune_samples=0 runs one DPO setting, --beta
and --dpo_lr.
"""
from machinery import boot  # first: it sets what torch reads as it loads
import csv
import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import torch

import orpo
import prepare_data
from machinery import checkpoint, report, synthetic
from machinery.cli import die, parse_args, setup_device
from model import GPT
from machinery.safe import atomic_write

FIGURES = {
    "sft-vs-orpo": {"SFT (lam=0)": dict(lam=0.0), "ORPO (lam=1)": dict(lam=1.0)},  # Figs. 3, 7
    "lambda": {f"lam={x}": dict(lam=x) for x in (0.0, 0.1, 0.5, 1.0)},              # App. E
    "ratio": {"odds ratio": dict(ratio="odds"), "prob ratio": dict(ratio="prob")},   # Sec. 7.1
    "length": {"mean log P": dict(logp="mean"), "summed log P": dict(logp="sum")},    # Eq. 3
    "methods": {"SFT": dict(lam=0.0), "SFT then DPO": dict(loss="dpo"), "ORPO": dict(lam=1.0)},
}


def write_csv(path, rows):
    """Whole or not at all (safe.atomic_write): an interrupted write leaves no half a table."""
    with atomic_write(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.writer(f)  # quotes a value that holds a comma
        w.writerow(rows[0])
        w.writerows(r.values() for r in rows)
    print(f"wrote {path}")


# ----------------------------------------------------------------------------------------
# Plots: optional (matplotlib); without it, each figure still writes its numbers


def pyplot(name, d):
    """matplotlib's pyplot, or None, with a note, where it is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        plt.rcParams.update({"font.size": 12, "axes.titlesize": 13, "legend.fontsize": 10})
        return plt
    except ImportError:
        print(f"matplotlib is not installed, so no {name}.png: `pip install matplotlib` "
              f"(or -r requirements-extra.txt); the numbers are in {d}/")
        return None


def panels(plt, n, title):
    """A figure of n panels, two to a row, titled with what ran (config and seeds)."""
    rows = (n + 1) // 2
    fig, axes = plt.subplots(rows, 2, figsize=(13, 4.8 * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    fig.suptitle(title, fontsize=15)
    return fig, list(axes.flat[:n])


def save(fig, d, name):
    path = os.path.join(d, f"{name}.png")
    fig.tight_layout()
    with atomic_write(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    print(f"wrote {path}")


def bars(ax, x, heights, width, rot=0, **kw):
    """Bars labelled with their values, so that a bar of 0 still shows (narrow bars: rot=90)."""
    ax.bar_label(ax.bar(x, heights, width, **kw), fontsize=8, padding=2, rotation=rot,
                 labels=[f"{h:,.0f}" if abs(h) >= 100 else f"{h:.2g}" for h in heights])


MARKERS = "osD^v*"


def plot_curves(axes, curves):
    """Held-out mean log P of the chosen (solid) and the rejected (dashed) answers, per run
    (mean over seeds): a colour and a marker per run, so that runs that overlap still show."""
    for ax, k, style in zip(axes, ("logp_chosen", "logp_rejected"), ("-", "--")):
        runs = list(dict.fromkeys(c["run"] for c in curves))
        for j, run in enumerate(runs):
            by_iter = {}
            for c in curves:
                if c["run"] == run:
                    by_iter.setdefault(c["iter"], []).append(c[k])
            every = max(2, len(by_iter) // 10)  # each run's markers at other iterations
            ax.plot(list(by_iter), [np.mean(v) for v in by_iter.values()], style, color=f"C{j}",
                    marker=MARKERS[j % 6], markevery=(j * every // len(runs), every), alpha=0.8,
                    lw=3 - j * 0.6 if j < 3 else 1, label=run)
        ax.set(title=f"held-out mean log P({k.split('_')[1]})", xlabel="iteration",
               ylabel="mean log P per token (nats)")
        ax.legend()


def plot(name, d, curves, extra, title):
    plt = pyplot(name, d)
    if plt is None:
        return
    fig, axes = panels(plt, 3 if extra else 2, title)
    plot_curves(axes, curves)
    if name == "ratio":
        axes[2].hist([[r["log_or"] for r in extra], [r["log_pr"] for r in extra]], bins=100,
                     range=(-10, 10), label=["log odds ratio", "log prob ratio"], histtype="step", lw=2)
        axes[2].set(title="contrast for uniform random P_w, P_l (Fig. 6)", xlabel="log ratio",
                    ylabel="count (of 100,000 draws)")
    if name == "length":
        for j, run in enumerate(dict.fromkeys(r["run"] for r in extra)):
            rs = [r for r in extra if r["run"] == run]
            axes[2].scatter([r["len_w"] - r["len_l"] + (j - 1) * 0.15 for r in rs],
                            [r["mean_w"] - r["mean_l"] for r in rs], s=10, alpha=0.5,
                            marker=MARKERS[j], label=run)
        axes[2].set(title="per held-out pair", xlabel="len(chosen) - len(rejected), tokens",
                    ylabel="mean log P chosen - rejected")
    if extra:
        axes[2].legend()
    save(fig, d, name)


def plot_sft_vs_orpo(d, curves, scores, table, title):
    plt = pyplot("sft-vs-orpo", d)
    if plt is None:
        return
    fig, axes = panels(plt, 4, title)
    plot_curves(axes, curves)
    x, n = np.arange(len(synthetic.FLAWS)), len(table)
    for j, (tag, label) in enumerate((("sft", "SFT"), ("orpo", "ORPO"), ("chosen", "chosen answers"))):
        m = [np.mean([t[f"{tag}_{f}"] for t in table]) for f in synthetic.FLAWS]
        err = [synthetic.mean_se([t[f"{tag}_{f}"] for t in table], ddof=1)[1] if n > 1 else
               table[0].get(f"{tag}_{f}_se", 0.0) for f in synthetic.FLAWS]
        bars(axes[2], x + (j - 1) * 0.27, m, 0.27, rot=90, yerr=err, capsize=3, label=label,
             color=f"C{j}")
    axes[2].margins(y=0.4)
    axes[2].set(title="flaw rates of the sampled answers (± 1 s.e.)", xticks=x, ylabel="rate", xlabel="flaw",
                xticklabels=[f.replace("_", " ") for f in synthetic.FLAWS])
    axes[2].legend(ncol=3, loc="upper center")
    runs = list(dict.fromkeys(s["run"] for s in scores))
    axes[3].hist([[s["score"] for s in scores if s["run"] == r] for r in runs], bins=9,
                 range=(0, 1.0001), label=runs, color=[f"C{j}" for j in range(len(runs))])
    axes[3].set(title="judge scores of the sampled answers", xlabel="score", ylabel="answers")
    axes[3].legend()
    save(fig, d, "sft-vs-orpo")


def plot_methods(d, rows, why, title):
    plt = pyplot("methods", d)
    if plt is None:
        return
    fig, axes = panels(plt, 6, title)
    names, colors = [r["method"] for r in rows], [f"C{j}" for j in range(len(rows))]
    for ax, k, what in ((axes[0], "gflop", "training GFLOP"), (axes[1], "peak_mb", "peak memory, MB"),
                        (axes[2], "logp_rejected", "held-out mean log P(rejected)")):
        bars(ax, names, [r[k] for r in rows], 0.6, color=colors)
        ax.set(title=what, xlabel="method", ylabel=what.split(",")[0])
    bars(axes[3], names, [r["win_vs_chosen"] for r in rows], 0.6, color=colors,
         yerr=[r["win_se"] for r in rows], capsize=4)
    axes[3].set(title="win rate against the chosen answers (± 1 s.e.)", xlabel="method",
                ylabel="wins + ties / 2")
    x = np.arange(len(synthetic.FLAWS))
    for j, r in enumerate(rows):
        bars(axes[4], x + (j - 1.5) * 0.2, [r[f] for f in synthetic.FLAWS], 0.2, rot=90,
             label=r["method"], color=colors[j])
    axes[4].margins(y=0.4)
    axes[4].set(title="flaw rates of the sampled answers", xticks=x, ylabel="rate", xlabel="flaw",
                xticklabels=[f.replace("_", " ") for f in synthetic.FLAWS])
    axes[4].legend(ncol=2, loc="upper center")
    c = axes[5].bar(np.arange(len(why)), [w["words"] for w in why], 0.6, color=["C5", "C3", "C0", "C2"])
    axes[5].bar_label(c, fontsize=8, padding=2, labels=[
        f"P(eot) {w['p_eot']:.3f}\n{w['at_limit']:.0%} unended" for w in why])
    axes[5].axhline(why[0]["words_chosen"], color="k", ls="--", lw=1, label="chosen answers")
    axes[5].set(title="sampled answers' length; P(end-of-text) at the chosen end", xlabel="model",
                ylabel="words per answer", xticks=np.arange(len(why)), ylim=(0, 1.3 * max(w["words"] for w in why)),
                xticklabels=[w["model"].split(" (")[0].replace(" then ", "\nthen ") for w in why])
    axes[5].legend(loc="upper right")
    save(fig, d, "methods")


# ----------------------------------------------------------------------------------------
# Runs and their curves


def fresh(cfg):
    """The untrained model a run of cfg starts from (orpo.train's seed and shape), the
    held-out split, device and autocast context."""
    meta, data = orpo.load_data(cfg)
    torch.manual_seed(cfg.seed)
    dev, _, _, ctx = setup_device(cfg.device, cfg.dtype)
    return GPT(checkpoint.model_config(cfg, meta)).to(dev), data["val"], dev, ctx


def new_run(out_dir):
    """A run's folder, emptied: a figure made again replaces its own runs (orpo.py will not
    start a new run over an old one)."""
    shutil.rmtree(out_dir, ignore_errors=True)
    return out_dir


def load_run(out_dir, dev):
    """The trained model in a run's out_dir."""
    path = os.path.join(out_dir, "ckpt.pt")
    return checkpoint.model_from_checkpoint(checkpoint.load_checkpoint(path), path).to(dev)


@torch.no_grad()
def pair_logps(model, split, cfg, device, ctx):
    """Per held-out pair: response lengths and mean log-probs, chosen then rejected, and the
    probability of the end-of-text token where the chosen answer ends (its last target)."""
    model.eval()
    rows, n = [], min(cfg.eval_pairs, len(split[1]))
    for i in range(0, n, cfg.batch_size):
        x, y, resp_mask, _ = orpo.make_batch(split, range(i, min(i + cfg.batch_size, n)), device)
        scored = resp_mask.bool()
        with ctx:
            tok = model.token_logps(x, scored, y[scored])
        _, ell = orpo.response_logps(tok, resp_mask, scored)
        m, B = resp_mask.sum(1), x.size(0) // 2
        ends = m.long().cumsum(0) - 1  # each row's last scored position in tok
        rows += [dict(len_w=int(m[b]), len_l=int(m[b + B]), mean_w=float(ell[b]),
                      mean_l=float(ell[b + B]), p_eot_w=float(tok[ends[b]].exp())) for b in range(B)]
    model.train()
    return rows


def length_table(extra):
    """Which answer each model's log P prefers, by the sign of the length difference."""
    for run in dict.fromkeys(r["run"] for r in extra):
        for sign, what in ((-1, "chosen shorter"), (0, "same length"), (1, "chosen longer")):
            g = [r for r in extra if r["run"] == run and np.sign(r["len_w"] - r["len_l"]) == sign]
            by_mean = sum(r["mean_w"] > r["mean_l"] for r in g) / max(1, len(g))
            by_sum = sum(r["mean_w"] * r["len_w"] > r["mean_l"] * r["len_l"] for r in g) / max(1, len(g))
            print(f"  {run:14s} {what:15s} {len(g):4d} pairs | accuracy by mean log P "
                  f"{by_mean:.3f}, by summed log P {by_sum:.3f}")


def uniform_ratios():
    """Fig. 6: log OR and log PR for P_w, P_l uniform on (0, 1)."""
    p = torch.rand(2, 100_000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    odds = p.log() - (-p).log1p()
    log_or, log_pr = odds[0] - odds[1], p[0].log() - p[1].log()
    print(f"uniform P: std of log OR {float(log_or.std()):.2f}, of log PR {float(log_pr.std()):.2f}")
    return [dict(log_or=float(o), log_pr=float(r)) for o, r in zip(log_or, log_pr)]


def run_title(name, preset, cfg, seeds=1):
    """A figure's title: what ran (config, seeds), and each setting that differs from the
    preset's own, so that a short or small run never passes for the default one."""
    base, quiet = orpo.Config(**orpo.PRESETS.get(preset, {})), ("out_dir", "data_dir", "seed")
    diff = [f"{f.name}={getattr(cfg, f.name)}" for f in dataclasses.fields(cfg)
            if f.name not in quiet and getattr(cfg, f.name) != getattr(base, f.name)]
    s = f"seeds {cfg.seed}-{cfg.seed + seeds - 1}" if seeds > 1 else f"seed {cfg.seed}"
    return f"{name}: config {preset}, {s}" + ("\n" + ", ".join(diff) if diff else "")


def dense(cfg):
    """About 30 evaluations per run, so that a curve shows its shape, not its corners."""
    return min(cfg.eval_interval, max(1, cfg.max_iters // 30))


def curve(run, history, **tags):
    return [dict(run=run, **tags, iter=e["iter"], logp_chosen=e["ell_w"], logp_rejected=e["ell_l"],
                 margin=e["margin"], acc=e["acc"]) for e in history]


def figure(name, cfg, preset):
    """Run each variant of FIGURES[name] in turn; write the curves and the plot."""
    d = os.path.join(cfg.out_dir, name)
    curves, finals, extra = [], [], []
    if name == "length":  # the untrained model too: its summed log P prefers shorter answers
        model, val, dev, ctx = fresh(cfg)
        extra = [dict(run="untrained", **p) for p in pair_logps(model, val, cfg, dev, ctx)]
    for run, change in FIGURES[name].items():
        rcfg = dataclasses.replace(cfg, out_dir=new_run(os.path.join(d, run.replace(" ", "_"))),
                                   eval_interval=dense(cfg), **change)
        print(f"== {name}: run '{run}' ==")
        res = orpo.train(rcfg, preset)
        curves += curve(run, res.history)
        finals.append(curves[-1])
        if name == "length":  # lengths and log P per held-out pair, under the final model
            extra += [dict(run=run, **p) for p in pair_logps(res.model, res.val, rcfg, res.dev, res.ctx)]
    write_csv(os.path.join(d, "curves.csv"), curves)
    extra = uniform_ratios() if name == "ratio" else extra
    if extra:
        write_csv(os.path.join(d, "pairs.csv"), extra)
    print(f"== {name}: held-out, at the end ==")
    for f in finals:
        print(f"  {f['run']:14s} log P chosen {f['logp_chosen']:7.3f} | rejected "
              f"{f['logp_rejected']:7.3f} | margin {f['margin']:6.3f} | acc {f['acc']:.3f}")
    if name == "length":
        length_table(extra)
    plot(name, d, curves, extra, run_title(name, preset, cfg))


# ----------------------------------------------------------------------------------------
# What the models say: flaw rates, head-to-head, over seeds (sft-vs-orpo), and the cost and
# outcome of SFT then DPO against ORPO (methods)


def head_to_head(a, b):
    """a's samples against b's on the same prompts, by judge score: (win, tie, loss) rates,
    and a's win rate with ties counted half as (mean, standard error)."""
    by_row = {s["row"]: s["score"] for s in b}
    w = [synthetic.win(s["score"], by_row[s["row"]]) for s in a]
    return [w.count(v) / len(w) for v in (1.0, 0.5, 0.0)], synthetic.mean_se(w)


def print_sft_vs_orpo(table):
    """Mean ± standard error over seeds; with one seed, the standard errors over its prompts."""
    n, pm = len(table), lambda m_se: f"{m_se[0]:7.3f} ± {m_se[1]:.3f}"
    col = lambda k: synthetic.mean_se([t[k] for t in table], ddof=1) if n > 1 else (table[0][k], table[0].get(k + "_se"))
    show = lambda m_se: pm(m_se) if m_se[1] is not None else f"{m_se[0]:7.3f}        "
    print("== sft-vs-orpo: held-out, at the end, " + (f"mean ± standard error over {n} seeds =="
          if n > 1 else "one seed, ± 1 standard error over the sampled prompts =="))
    print(f"  {'':26s} {'SFT':>15s} {'ORPO':>15s} {'chosen answers':>15s}")
    for k in ("logp_rejected", "margin"):
        print(f"  {k.replace('_', ' '):26s} {show(col('sft_' + k)):>15s} {show(col('orpo_' + k)):>15s}")
    for f in synthetic.FLAWS:
        print(f"  {f.replace('_', ' ') + ' rate':26s} " + " ".join(
            f"{show(col(f'{tag}_{f}')):>15s}" for tag in ("sft", "orpo", "chosen")))
    h2h = col("h2h_orpo_vs_sft") if n > 1 else (table[0]["h2h_orpo_vs_sft"], table[0]["h2h_se"])
    print(f"  {'ORPO vs SFT, head-to-head':26s} {show(h2h):>15s}   (wins + ties/2; win "
          f"{col('win')[0]:.3f}, tie {col('tie')[0]:.3f}, loss {col('loss')[0]:.3f})")
    for t in table:  # the effect within one run, in its own standard errors
        gap = t["sft_off_topic"] - t["orpo_off_topic"]
        se = math.hypot(t["sft_off_topic_se"], t["orpo_off_topic_se"])
        apart = f"{gap / se:.1f} standard errors apart" if se > 0 else "no spread to measure"
        print(f"  seed {t['seed']}: off-topic rate SFT {t['sft_off_topic']:.3f}, ORPO "
              f"{t['orpo_off_topic']:.3f}: {apart}")


def sft_vs_orpo(cfg, preset, seeds):
    """SFT (lam=0) and ORPO (lam=1) with `seeds` seeds; what each says, and its noise."""
    d, curves, scores, table = os.path.join(cfg.out_dir, "sft-vs-orpo"), [], [], []
    for k in range(seeds):
        res = {}
        for run, change in FIGURES["sft-vs-orpo"].items():
            rcfg = dataclasses.replace(cfg, seed=cfg.seed + k, eval_interval=dense(cfg), **change,
                                       out_dir=new_run(os.path.join(d, f"{run.split()[0]}_seed{cfg.seed + k}")))
            print(f"== sft-vs-orpo: run '{run}', seed {rcfg.seed} ==")
            res[run] = orpo.train(rcfg, preset)
            curves += curve(run, res[run].history, seed=rcfg.seed)
            scores += [dict(run=run, seed=rcfg.seed, row=s["row"], score=s["score"])
                       for s in res[run].samples]
        (sft, o) = (res[r] for r in FIGURES["sft-vs-orpo"])
        (win, tie, loss), (h2h, h2h_se) = head_to_head(o.samples, sft.samples)
        row = dict(seed=cfg.seed + k, h2h_orpo_vs_sft=h2h, h2h_se=h2h_se, win=win, tie=tie, loss=loss)
        for tag, r in (("sft", sft), ("orpo", o)):
            row.update({f"{tag}_logp_rejected": r.history[-1]["ell_l"], f"{tag}_margin": r.history[-1]["margin"]})
            for f in synthetic.FLAWS:
                row[f"{tag}_{f}"] = r.summary["flaw_rates"]["after"][f]
                row[f"{tag}_{f}_se"] = r.summary["flaw_rates_se"]["after"][f]
        for f in synthetic.FLAWS:
            row[f"chosen_{f}"] = o.summary["flaw_rates"]["chosen"][f]
            row[f"chosen_{f}_se"] = o.summary["flaw_rates_se"]["chosen"][f]
        table.append(row)
    write_csv(os.path.join(d, "curves.csv"), curves)
    write_csv(os.path.join(d, "scores.csv"), scores)
    write_csv(os.path.join(d, "table.csv"), table)
    print_sft_vs_orpo(table)
    plot_sft_vs_orpo(d, curves, scores, table, run_title("sft-vs-orpo", preset, cfg, seeds))


def run_phase(args, extra, out_dir):
    """One phase as its own `python orpo.py` process; its summary, and the answers it sampled
    before and after training."""
    cmd = [sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), "orpo.py"),
           *args, *extra, f"--out_dir={new_run(out_dir)}"]
    print(f"== methods: {' '.join(cmd[2:])} ==")
    # its own process group, so that Ctrl-C reaches this process alone, which stops the
    # phase quietly (its checkpoints are written atomically) and says what is on disk
    child = subprocess.Popen(cmd, process_group=0)
    try:
        if child.wait():
            die(f"the phase in {out_dir} failed (its error is above)")
    finally:
        if child.poll() is None:
            child.terminate()
            child.wait()
    with open(os.path.join(out_dir, "summary.json")) as f:
        summary = json.load(f)
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        samples = [r["samples"] for r in map(json.loads, f) if r["kind"] == "samples"]
    return summary, samples[0], samples[-1]


def outcome(samples):
    """The judge on sampled answers: each flaw's rate, and the win rate against the chosen
    answers with its standard error."""
    j = synthetic.judged(samples, samples)
    return dict(**{f: j["flaw_rates"]["after"][f][0] for f in synthetic.FLAWS},
                win_vs_chosen=j["win_rate"][1][0], win_se=j["win_rate"][1][1])


def stopping(model, samples, cfg, val, dev, ctx):
    """Where DPO goes wrong: P(end-of-text) where the chosen answer ends (mean over held-out
    pairs), and the sampled answers' length in words against the chosen ones', with the
    share that ran to the token limit without ending."""
    enc = prepare_data.get_encoding(orpo.load_data(cfg)[0]["tokenizer"])
    full = [len(enc.encode(s["sample"], disallowed_special=())) >= cfg.max_new_tokens for s in samples]
    return dict(p_eot=float(np.mean([p["p_eot_w"] for p in pair_logps(model, val, cfg, dev, ctx)])),
                words=float(np.mean([len(s["sample"].split()) for s in samples])),
                words_chosen=float(np.mean([len(s["chosen"].split()) for s in samples])),
                at_limit=float(np.mean(full)))


def grid_point(args, cfg, sft, beta, lr, M, tune):
    """DPO from the SFT run at (beta, lr) for M iterations, in its own process, sampling
    nothing; then, in this one, its answers to the tuning prompts `tune` (a split) judged."""
    d = os.path.join(cfg.out_dir, "methods", f"DPO_beta{beta:g}_lr{lr:g}")
    extra = ["--loss=dpo", f"--init_from={sft}", f"--ref={sft}", f"--max_iters={M}",
             f"--beta={beta}", f"--lr={lr}", f"--min_lr={lr / 10}", f"--warmup_iters={M // 20}",
             f"--eval_interval={M}", "--n_samples=0"]
    summary, _, _ = run_phase(args, extra, d)
    dev, _, _, ctx = setup_device(cfg.device, cfg.dtype)
    model = load_run(d, dev)  # judged, then let go: the best is read again from d
    point = dict(beta=beta, lr=lr, summary=summary, dir=d)
    if len(tune[1]):
        meta = orpo.load_data(cfg)[0]
        s = report.sample_and_judge(model, tune, meta, dataclasses.replace(cfg, n_samples=len(tune[1])),
                                    dev, ctx)
        point.update(outcome(s), **stopping(model, s, cfg, tune, dev, ctx))
    return point


def tune_dpo(args, cfg, sft, M, grid, n_report, n_tune):
    """Each (beta, lr) of the grid on the held-out prompts after the first n_report (rows
    n_report .. n_report + n_tune - 1 of the val split, which the report never samples);
    the best by the judge's win rate against the chosen answers."""
    val = orpo.load_data(cfg)[1]["val"]
    tune = (val[0], val[1][n_report:n_report + n_tune])
    points = [grid_point(args, cfg, sft, b, lr, M, tune) for b, lr in grid]
    if not n_tune:
        return points[0]
    best = max(points, key=lambda p: p["win_vs_chosen"])
    rows = [dict(beta=p["beta"], lr=p["lr"], chosen=p is best, **{k: round(p[k], 4) for k in (
        "win_vs_chosen", "win_se", *synthetic.FLAWS, "p_eot", "words", "at_limit")})
            for p in points]
    write_csv(os.path.join(cfg.out_dir, "methods", "grid.csv"), rows)
    print(f"== methods: DPO's beta and lr, tuned on {n_tune} held-out prompts (val rows "
          f"{n_report + 1}-{n_report + n_tune}), not the {n_report} reported below ==")
    print(f"  {'beta':>5s} {'lr':>7s} {'win vs chosen':>15s} " + " ".join(
        f"{f.replace('_', ' '):>11s}" for f in synthetic.FLAWS) + "  P(eot) words at limit")
    for r in rows:
        print(f"  {r['beta']:5g} {r['lr']:7.0e} {r['win_vs_chosen']:7.3f} ± {r['win_se']:.3f} "
              + " ".join(f"{r[f]:11.3f}" for f in synthetic.FLAWS)
              + f"  {r['p_eot']:6.3f} {r['words']:5.1f} {r['at_limit']:8.3f}" + ("  <- chosen" if r["chosen"] else ""))
    return best


def print_methods(rows, why):
    print("== methods: what each costs ==")
    print(f"  {'method':14s} {'steps':>6s} {'policy fwd':>10s} {'ref fwd':>8s} {'GFLOP':>9s} "
          f"{'train s':>8s} {'peak MB':>8s}")
    for r in rows:
        print(f"  {r['method']:14s} {r['steps']:6d} {r['policy_passes']:10d} {r['ref_passes']:8d} "
              f"{r['gflop']:9,.1f} {r['train_s']:8.1f} {r['peak_mb']:8d}")
    print("== methods: what comes out (held-out pairs; sampled answers, ± 1 standard error) ==")
    print(f"  {'method':14s} {'log P ch':>8s} {'log P rej':>9s} {'margin':>7s} {'acc':>6s} "
          + " ".join(f"{f.replace('_', ' '):>11s}" for f in synthetic.FLAWS)
          + f" {'win vs chosen':>15s} {'vs ORPO':>15s}")
    for r in rows:
        print(f"  {r['method']:14s} {r['logp_chosen']:8.3f} {r['logp_rejected']:9.3f} "
              f"{r['margin']:7.3f} {r['acc']:6.3f} " + " ".join(f"{r[f]:11.3f}" for f in synthetic.FLAWS)
              + f" {r['win_vs_chosen']:7.3f} ± {r['win_se']:.3f} {r['h2h_vs_orpo']:7.3f} ± {r['h2h_se']:.3f}")
    print("== methods: why: P(end-of-text) where the chosen answer ends (held-out pairs); the "
          "sampled answers' length, before and after ==")
    print(f"  {'model':34s} {'P(eot)':>7s} {'words sampled':>14s} {'words chosen':>13s} {'at token limit':>15s}")
    for r in why:
        print(f"  {r['model']:34s} {r['p_eot']:7.3f} {r['words']:14.2f} {r['words_chosen']:13.2f} "
              f"{r['at_limit']:15.3f}")


def cost_and_outcome(res, best):
    """The rows of the methods table: each method's summed cost over its phases, and what
    its last phase's model does."""
    rows = []
    for name, phases in (("SFT", ["SFT"]), ("DPO phase", ["DPO"]), ("SFT then DPO", ["SFT", "DPO"]),
                         ("ORPO", ["ORPO"])):
        costs = [res[p][0]["cost"] for p in phases]
        summary, _, samples = res[phases[-1]]  # what comes out: the last phase's model
        end, (_, (h2h, h2h_se)) = summary["end"], head_to_head(samples, res["ORPO"][2])
        rows.append(dict(
            method=name, steps=sum(c["steps"] for c in costs),
            policy_passes=sum(c["policy_passes"] for c in costs),
            ref_passes=sum(c["ref_passes"] for c in costs),
            gflop=round(sum(c["flops"] for c in costs) / 1e9, 3),
            train_s=round(sum(c["train_seconds"] for c in costs), 1),
            peak_mb=max(c["peak_mem_mb"] for c in costs),
            logp_chosen=end["ell_w"], logp_rejected=end["ell_l"], margin=end["margin"], acc=end["acc"],
            **outcome(samples), h2h_vs_orpo=h2h, h2h_se=h2h_se,
            beta=best["beta"] if "DPO" in phases else "", lr=best["lr"] if "DPO" in phases else ""))
    return rows


def methods(args, cfg, preset, opts, grid):
    """SFT for max_iters; then DPO for dpo_iters from it, with it as the frozen reference, at
    each (beta, lr) of the grid, the best chosen on held-out prompts the report never sees;
    and ORPO for max_iters from scratch, at its preset. Each phase in its own process, so
    that its peak memory is its own."""
    d, M = os.path.join(cfg.out_dir, "methods"), opts["dpo_iters"] or cfg.max_iters // 2
    meta, data = orpo.load_data(cfg)
    n_val, n_tune = len(data["val"][1]), opts["tune_samples"] if len(grid) > 1 else 0
    n_report = min(cfg.n_samples, n_val - n_tune)
    if n_report < 1:
        die(f"--tune_samples={n_tune} leaves none of the {n_val} held-out prompts to report on")
    if n_report < cfg.n_samples:
        print(f"{n_val} held-out prompts: the report samples the first {n_report}, not "
              f"--n_samples={cfg.n_samples}; the next {n_tune} tune DPO")
    res, sft = {}, os.path.join(d, "SFT", "ckpt.pt")
    for phase, lam in (("SFT", 0), ("ORPO", 1)):
        res[phase] = run_phase(args, [f"--eval_interval={dense(cfg)}", f"--lam={lam}",
                                      f"--n_samples={n_report}"], os.path.join(d, phase))
    best = tune_dpo(args, cfg, sft, M, grid, n_report, n_tune)
    dev, _, _, ctx = setup_device(cfg.device, cfg.dtype)
    dpo = load_run(best["dir"], dev)
    s = report.sample_and_judge(dpo, data["val"], meta,
                                dataclasses.replace(cfg, n_samples=n_report), dev, ctx)
    res["DPO"] = best["summary"], res["SFT"][2], s
    print(f"== methods: SFT then DPO at beta {best['beta']:g}, lr {best['lr']:g}, on the "
          f"{n_report} report prompts ==")
    models = {p: load_run(os.path.join(d, p), dev) for p in ("SFT", "ORPO")}
    why = [dict(model=name, **stopping(m, smp, cfg, data["val"], dev, ctx)) for name, m, smp in (
        ("untrained (ORPO's start)", fresh(cfg)[0], res["ORPO"][1]), ("ORPO", models["ORPO"], res["ORPO"][2]),
        ("SFT (DPO's start)", models["SFT"], res["SFT"][2]),
        (f"SFT then DPO (b={best['beta']:g}, lr={best['lr']:g})", dpo, s))]
    rows = cost_and_outcome(res, best)
    write_csv(os.path.join(d, "methods.csv"), rows)
    write_csv(os.path.join(d, "why.csv"), why)
    print_methods(rows, why)
    plot_methods(d, rows, why, run_title("methods", preset, cfg))


# figures.py's own options: sft-vs-orpo's seeds; methods' DPO iterations, its grid of (beta,
# lr), the held-out prompts each grid point answers (0: no tuning, one run at --beta, --dpo_lr)
OPTIONS = dict(seeds=1, dpo_iters=0, dpo_lr=1e-4, dpo_betas="0.01,0.03,0.1",
               dpo_lrs="3e-5,1e-4,3e-4", tune_samples=200)


def make(name, args, preset, cfg, opts):
    """Check figures.py's own options, then make the figure."""
    if opts["seeds"] < 1 or opts["dpo_iters"] < 0 or opts["dpo_lr"] <= 0:
        die("--seeds must be >= 1, --dpo_iters >= 0 (0: max_iters / 2), --dpo_lr > 0")
    try:
        betas, lrs = ([float(v) for v in opts[k].split(",")] for k in ("dpo_betas", "dpo_lrs"))
    except ValueError:
        die(f"--dpo_betas and --dpo_lrs are comma-separated numbers, got {opts['dpo_betas']!r} "
            f"and {opts['dpo_lrs']!r}")
    if min(betas + lrs) <= 0 or opts["tune_samples"] < 0:
        die("--dpo_betas and --dpo_lrs must be > 0, --tune_samples >= 0 (0: one DPO run, at "
            "--beta and --dpo_lr)")
    grid = [(b, lr) for b in betas for lr in lrs] if opts["tune_samples"] else [(cfg.beta, opts["dpo_lr"])]
    if dense(cfg) != cfg.eval_interval:
        print(f"evals every {dense(cfg)} iterations, not --eval_interval={cfg.eval_interval}: about "
              f"30 points a curve over {cfg.max_iters} iterations; a smaller --eval_interval gives more")
    if name == "sft-vs-orpo":
        sft_vs_orpo(cfg, preset, opts["seeds"])
    elif name == "methods":
        own, rest = tuple(f"--{k}" for k in OPTIONS), []
        for a, before in zip(args, [""] + args):  # orpo.py's own overrides, both spellings
            if not a.startswith(own) and not (before.startswith(own) and "=" not in before):
                rest.append(a)
        methods(rest, cfg, preset, opts, grid)
    else:
        figure(name, cfg, preset)


def main():
    sys.stdout.reconfigure(line_buffering=True)
    args = sys.argv[1:]
    if args[:1] in (["-h"], ["--help"]):
        parse_args(args, orpo.Config, orpo.PRESETS, OPTIONS,  # prints the keys and exits
                   usage=f"NAME [--config NAME] [--key=value ...]; NAME: {', '.join(FIGURES)};")
    if not args or args[0] not in FIGURES:
        die(f"the first argument names the figure: one of {', '.join(FIGURES)}")
    name, args = args[0], args[1:]
    preset, cfg, opts = parse_args(args, orpo.Config, orpo.PRESETS, OPTIONS)
    if hasattr(orpo, "holes_left"):  # the assignment's handout: every figure trains, so its
        orpo.holes_left(cfg)         # holes of exercises 1-3 are named before any work
    try:
        make(name, args, preset, cfg, opts)
    except KeyboardInterrupt:
        die(f"interrupted; safe on disk in {os.path.join(cfg.out_dir, name)}: each finished run's "
            f"ckpt.pt, log.jsonl and summary.json, the unfinished one's ckpt.pt as of its last "
            f"eval; the tables and the PNG are written only at the end", 130)


if __name__ == "__main__":
    main()
