"""The paper's findings, reproduced by runs of orpo.py's training loop in sequence. Each
figure writes its numbers (CSV) to out_dir/<figure>/, and a PNG when matplotlib is installed.

    python figures.py sft-vs-orpo          # Figs. 3 and 7: SFT lifts the rejected answers too
    python figures.py lambda               # App. E: the weight of L_OR
    python figures.py ratio                # Sec. 7.1: odds ratio against probability ratio
    python figures.py length               # Eq. 3: why log P is a mean, not a sum

The figure's name comes first; orpo.py's --config NAME and --key=value overrides follow.
"""
import dataclasses
import os
import sys

import numpy as np
import torch

import orpo

FIGURES = {
    "sft-vs-orpo": {"SFT (lam=0)": dict(lam=0.0), "ORPO (lam=1)": dict(lam=1.0)},  # Figs. 3, 7
    "lambda": {f"lam={x}": dict(lam=x) for x in (0.0, 0.1, 0.5, 1.0)},              # App. E
    "ratio": {"odds ratio": dict(ratio="odds"), "prob ratio": dict(ratio="prob")},   # Sec. 7.1
    "length": {"mean log P": dict(logp="mean"), "summed log P": dict(logp="sum")},    # Eq. 3
}


def write_csv(path, rows):
    with open(path, "w") as f:
        f.write(",".join(rows[0]) + "\n")
        f.writelines(",".join(str(v) for v in r.values()) + "\n" for r in rows)
    print(f"wrote {path}")


@torch.no_grad()
def pair_logps(model, split, cfg, device, ctx):
    """Per held-out pair: response lengths and mean log-probs, chosen then rejected."""
    model.eval()
    rows, n = [], min(cfg.eval_pairs, len(split[1]))
    for i in range(0, n, cfg.batch_size):
        x, y, resp_mask, _ = orpo.make_batch(split, range(i, min(i + cfg.batch_size, n)), device)
        scored = resp_mask.bool()
        with ctx:
            tok = model.token_logps(x, scored, y[scored])
        _, ell = orpo.response_logps(tok, resp_mask, scored)
        m, B = resp_mask.sum(1), x.size(0) // 2
        rows += [dict(len_w=int(m[b]), len_l=int(m[b + B]), mean_w=float(ell[b]),
                      mean_l=float(ell[b + B])) for b in range(B)]
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


def figure(name, cfg, preset):
    """Run each variant of FIGURES[name] in turn; write the curves and the plot."""
    d = os.path.join(cfg.out_dir, name)
    curves, finals, extra = [], [], []
    if name == "length":  # the untrained model too: its summed log P prefers shorter answers
        r = orpo.setup(cfg)
        extra = [dict(run="untrained", **p) for p in pair_logps(r.raw, r.val, cfg, r.dev, r.ctx)]
    for run, change in FIGURES[name].items():
        rcfg = dataclasses.replace(cfg, out_dir=os.path.join(d, run.replace(" ", "_")), **change)
        print(f"== {name}: run '{run}' ==")
        res = orpo.train(rcfg, preset)
        curves += [dict(run=run, iter=e["iter"], logp_chosen=e["ell_w"], logp_rejected=e["ell_l"],
                        margin=e["margin"], acc=e["acc"]) for e in res.history]
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
    plot(name, d, curves, extra)


def plot(name, d, curves, extra):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib is not installed, so no {name}.png: `pip install matplotlib` "
              f"(or -r requirements-extra.txt); the numbers are in {d}/curves.csv")
        return
    runs = list(dict.fromkeys(c["run"] for c in curves))
    fig, axes = plt.subplots(1, 3 if extra else 2, figsize=(15 if extra else 10, 4))
    for ax, k in zip(axes, ("logp_chosen", "logp_rejected")):
        for run in runs:
            rs = [c for c in curves if c["run"] == run]
            ax.plot([c["iter"] for c in rs], [c[k] for c in rs], label=run)
        ax.set(title=f"held-out mean log P({k.split('_')[1]})", xlabel="iteration")
        ax.legend()
    if name == "ratio":
        axes[2].hist([[r["log_or"] for r in extra], [r["log_pr"] for r in extra]], bins=100,
                     range=(-10, 10), label=["log odds ratio", "log prob ratio"], histtype="step")
        axes[2].set(title="contrast for uniform random P_w, P_l (Fig. 6)")
    if name == "length":
        for run in dict.fromkeys(r["run"] for r in extra):
            rs = [r for r in extra if r["run"] == run]
            axes[2].scatter([r["len_w"] - r["len_l"] for r in rs],
                            [r["mean_w"] - r["mean_l"] for r in rs], s=6, alpha=0.5, label=run)
        axes[2].set(title="per held-out pair", xlabel="len(chosen) - len(rejected)",
                    ylabel="mean log P chosen - rejected")
    if extra:
        axes[2].legend()
    fig.tight_layout()
    fig.savefig(os.path.join(d, f"{name}.png"), dpi=100)
    print(f"wrote {os.path.join(d, name + '.png')}")


def main():
    sys.stdout.reconfigure(line_buffering=True)
    args = sys.argv[1:]
    if not args or args[0] not in FIGURES and args[0] not in ("-h", "--help"):
        orpo.die(f"the first argument names the figure: one of {', '.join(FIGURES)}")
    name = args.pop(0) if args[0] in FIGURES else ""
    preset, cfg, _ = orpo.parse_args(args)
    figure(name, cfg, preset)


if __name__ == "__main__":
    main()
