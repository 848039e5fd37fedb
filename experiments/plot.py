"""usage: python -m experiments.plot DIR [DIR ...] [--out=PNG]
  DIR        a run's out_dir, whose log.jsonl is read
  --out=PNG  the picture to write (default: runs.png)

The runs side by side in one PNG: held-out mean log P(chosen) and log P(rejected), margin and
preference accuracy at each eval; train loss, L_SFT and L_OR at each step. It needs
matplotlib. Here too: experiments/figures.py's tables (CSVs) and panels.
"""
from machinery import boot  # first: Ctrl-C, and a reader that left (`| head`), in one line
import csv
import json
import os
import sys

import numpy as np

from machinery.safe import atomic_write, die, one_line

def read_log(d):
    """A run's log.jsonl, its records (machinery/report.py writes them)."""
    path = os.path.join(d, "log.jsonl")
    try:
        with open(path) as f:
            return [json.loads(line) for line in f]
    except (OSError, ValueError) as e:
        die(f"{path}: not a run's log ({one_line(e, typed=True)})")

def write_csv(path, rows):
    """Whole or not at all (safe.atomic_write): an interrupted write leaves no half a table."""
    with atomic_write(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, list(rows[0]))  # quotes a value that holds a comma
        w.writeheader()
        w.writerows(rows)

def show(title, rows):
    """A table in aligned columns, under its title."""
    cols = [[k, *(f"{r[k]:.4g}" if isinstance(r[k], float) else str(r[k]) for r in rows)] for k in rows[0]]
    print(f"== {title} ==")
    for line in zip(*cols):
        print("  " + " ".join(c.rjust(max(map(len, col))) for c, col in zip(line, cols)))

def curves(ax, rows, keys, title, x="iter"):
    """A line per run (rows' "run") and key, solid, dashed, dotted: the key's mean over the
    run's rows (its seeds) at each x; a colour and a marker per run."""
    for j, run in enumerate(dict.fromkeys(r["run"] for r in rows)):
        for i, (k, style) in enumerate(zip(keys, ("-", "--", ":"))):
            at = {}
            for r in (r for r in rows if r["run"] == run):
                at.setdefault(r[x], []).append(r[k])
            every = max(2, len(at) // 10)  # each run's markers at other points: overlaps show
            ax.plot(list(at), [np.mean(v) for v in at.values()], style, color=f"C{j}", alpha=0.8,
                    marker="osD^v*"[j % 6], markevery=(j % every, every), label=None if i else run)
    ax.set(title=title, xlabel="iteration" if x == "iter" else x)

def bars(ax, rows, keys, title, err=False):
    """A group of bars per key, a bar per row (named by its first column), each labelled with
    its value; err: the keys' `key_se` columns as ± 1 standard error."""
    x, w = np.arange(len(keys)), 0.8 / len(rows)
    for j, r in enumerate(rows):
        h = [r[k] for k in keys]
        b = ax.bar(x + (j - (len(rows) - 1) / 2) * w, h, w, label=next(iter(r.values())), color=f"C{j}",
                   capsize=3, yerr=[r[k + "_se"] for k in keys] if err else None)
        ax.bar_label(b, labels=[f"{v:.3g}" for v in h], fontsize=8, padding=2,
                     rotation=90 if len(keys) > 1 else 0)
    ax.set(title=title, xticks=x, xticklabels=[k.replace("_", " ") for k in keys])
    ax.margins(y=0.3)

def draw(png, title, panels, where):
    """One PNG of panels, each (function, its arguments after the axes), three to a row, or
    two where that fills every row; the figure. Without matplotlib: a line that says where
    the numbers are, and None."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib is not installed, so no {png}: `pip install matplotlib` (or -r "
              f"requirements-extra.txt) and run this again; the numbers are in {where}")
        return None
    cols = len(panels) if len(panels) <= 3 else 3 if len(panels) % 3 == 0 else 2
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6.5 * cols, 4.8 * rows), squeeze=False)
    for ax, (panel, *args) in zip(axes.flat, panels):
        panel(ax, *args)
        ax.legend(fontsize=9)
    fig.suptitle(title, fontsize=14)
    fig.tight_layout()
    with atomic_write(png) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    print(f"wrote {png}")
    return fig

def main():
    args = sys.argv[1:]
    if {"-h", "--help"} & set(args):
        print(__doc__.strip())
        sys.exit(0)
    dirs, outs = [a for a in args if not a.startswith("-")], [a[6:] for a in args if a.startswith("--out=")]
    if not dirs or len(dirs) + len(outs) != len(args):
        die(f"expected run folders (their out_dir) and at most --out=PNG, got {args}; --help says more")
    logs = {d.rstrip("/"): read_log(d) for d in dirs}
    rows = lambda kind: [dict(r, run=d) for d, log in logs.items() for r in log if r["kind"] == kind]
    evals, steps = rows("eval"), rows("train")
    return draw(outs[-1] if outs else "runs.png", ", ".join(logs), [
        (curves, evals, ["ell_w", "ell_l"], "held-out mean log P: chosen (solid), rejected (dashed)"),
        (curves, evals, ["margin"], "held-out margin: mean log P chosen - rejected"),
        (curves, evals, ["acc"], "held-out preference accuracy"), (curves, steps, ["loss"], "train loss"),
        (curves, steps, ["l_sft"], "train L_SFT"), (curves, steps, ["l_or"], "train L_OR")],
        "each run's log.jsonl")

if __name__ == "__main__":
    main()
