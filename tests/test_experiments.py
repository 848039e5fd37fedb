"""experiments/ as a user runs it: the figures (runs of orpo.py, their CSVs and PNGs), the
picture of any run, and the benchmark."""
import csv
import json
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

import orpo
from conftest import ROOT
from experiments import figures, plot
from machinery import checkpoint, report

# A module of experiments/ run as a user runs it (python -m ...), from the repo root, with
# matplotlib made unimportable (hide) or left as it is
HIDE = "import sys; sys.modules['matplotlib'] = None; "
# Ctrl-C's handler, as in a terminal: a shell that runs a command in the background ignores SIGINT
CTRL_C = "import signal; signal.signal(signal.SIGINT, signal.default_int_handler); "
MODULE = "import runpy, sys; sys.argv[0] = '{0}'; runpy.run_module('{0}', run_name='__main__', alter_sys=True)"
TINY = ["--config", "tiny", "--max_iters=6", "--eval_interval=5", "--eval_pairs=16", "--n_samples=4",
        "--max_new_tokens=8"]
METHODS = ["--dpo_iters=4", "--tune_samples=6", "--dpo_betas=0.1,1", "--dpo_lrs=1e-4"]


def module(name, *args, hide=False, prefix="", popen=False):
    cmd = [sys.executable, "-c", prefix + (HIDE if hide else "") + MODULE.format(f"experiments.{name}"), *args]
    if popen:
        return subprocess.Popen(cmd, cwd=ROOT, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)


def rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def made(tmp_path_factory, data_dir):
    """Four figures made once, on the tiny preset (6 iterations, 16 eval pairs, 4 sampled
    answers), with matplotlib as it is: {name: (stdout, the figure's folder)}."""
    out, made = tmp_path_factory.mktemp("figures"), {}
    for name, extra in (("sft-vs-orpo", ["--seeds=2"]), ("length", []), ("ratio", []), ("methods", METHODS)):
        r = module("figures", name, *TINY, f"--out_dir={out}", f"--data_dir={data_dir}", *extra)
        assert r.returncode == 0, r.stderr[-2000:]
        made[name] = r.stdout, out / name
    return made


@pytest.mark.parametrize("name", ["sft-vs-orpo", "length", "ratio"])
def test_a_figure_writes_each_runs_curve_at_every_iteration(made, name):
    """Its runs, every seed's, each evaluated at every iteration (6 // 30 rounds up to 1),
    and the held-out end of each, as the runs' own summaries have it."""
    out, d = made[name]
    runs, seeds = figures.FIGURES[name][0], 2 if name == "sft-vs-orpo" else 1
    curves = rows(d / "curves.csv")
    assert [(r["run"], r["iter"]) for r in curves] == [
        (run, str(i)) for _ in range(seeds) for run in runs for i in range(7)]
    for end in rows(d / "end.csv"):
        run = f"{end['run']}_seed{end['seed']}".replace(" ", "_")
        summary = json.load(open(d / run / "summary.json"))
        assert float(end["logp_rejected"]) == summary["end"]["ell_l"] and summary["iters"] == 6
    assert "evals every 1 iterations, not --eval_interval=5" in out


def test_sft_vs_orpo_says_what_the_judge_says_per_seed_and_over_seeds(made):
    out, d = made["sft-vs-orpo"]
    seeds = rows(d / "seeds.csv")
    assert [s["seed"] for s in seeds] == ["1337", "1338", "mean"]
    assert all(0 <= float(s["orpo_vs_sft"]) <= 1 for s in seeds)
    assert abs(float(seeds[2]["orpo_vs_sft"]) - (float(seeds[0]["orpo_vs_sft"]) + float(seeds[1]["orpo_vs_sft"])) / 2) < 1e-12
    flaws = {f["model"]: f for f in rows(d / "flaws.csv")}
    assert list(flaws) == ["SFT", "ORPO", "chosen answers"]
    rates = [json.load(open(d / f"SFT_seed{s}" / "summary.json"))["flaw_rates"]["after"]["rude"] for s in (1337, 1338)]
    assert abs(float(flaws["SFT"]["rude"]) - np.mean(rates)) < 1e-12
    assert f"{d}/seeds.csv" in out and f"{d}/flaws.csv" in out


def test_length_ranks_pairs_by_mean_and_by_sum(made):
    """The untrained model's and each run's accuracy by mean and by summed log P, by the
    sign of the length difference, over the 16 eval pairs."""
    by = {r["run"]: r for r in rows(made["length"][1] / "by_length.csv")}
    assert list(by) == ["untrained", "mean log P", "summed log P"]
    for r in by.values():
        assert sum(int(r[f"n_{w}"]) for w in ("shorter", "same", "longer")) == 16
        assert all(0 <= float(r[f"{w}_by_{k}"]) <= 1 for w in ("shorter", "same", "longer") for k in ("mean", "sum"))
        assert r["same_by_mean"] == r["same_by_sum"]  # equal lengths: the sum ranks as the mean


def test_ratio_draws_uniform_log_ratios(made):
    spread = rows(made["ratio"][1] / "spread.csv")[0]
    assert abs(float(spread["std_log_odds_ratio"]) - 2.56) < 0.02  # Fig. 6's wider contrast
    assert abs(float(spread["std_log_prob_ratio"]) - 1.41) < 0.02
    hist = rows(made["ratio"][1] / "uniform.csv")
    assert sum(int(h["count"]) for h in hist if h["run"] == "log odds ratio") > 95_000  # |log OR| < 10


def test_methods_costs_from_the_runs_batches(made, data_dir):
    """Steps and passes from the summaries; the FLOPs replayed independently here, from
    make_batch's own tensors (their width) and GPT.flops; DPO's reference adds a third."""
    out, d = made["methods"]
    cost = {r["method"]: r for r in rows(d / "costs.csv")}
    assert list(cost) == ["SFT", "DPO phase", "SFT then DPO", "ORPO"]
    assert [int(cost[m]["steps"]) for m in cost] == [6, 4, 10, 6]
    assert int(cost["DPO phase"]["ref_passes"]) == int(cost["DPO phase"]["policy_passes"]) == 4 * 16
    assert int(cost["ORPO"]["ref_passes"]) == 0 and int(cost["SFT then DPO"]["policy_passes"]) == 10 * 16
    cfg = orpo.Config(**orpo.PRESETS["tiny"])
    ck = checkpoint.load_checkpoint(str(d / "SFT" / "ckpt.pt"))
    model = checkpoint.model_from_checkpoint(ck, "ckpt")
    split = tuple(np.load(os.path.join(data_dir, f"train.{k}.npy")) for k in ("tokens", "index"))
    steps, flops = orpo.step_rows(split[1], cfg, 0, 0, 0, 1), []
    for _ in range(6):
        (r,), _, _ = next(steps)
        real, n_scored = report.batch_tokens(split[1], r, False)
        flops.append(model.flops(real, n_scored, orpo.make_batch(split, r, "cpu")[0].size(1)))
    assert abs(float(cost["SFT"]["gflop"]) - sum(flops) / 1e9) < 1e-3 and cost["ORPO"]["gflop"] == cost["SFT"]["gflop"]
    assert abs(float(cost["DPO phase"]["gflop"]) - sum(flops[:4]) * 4 / 3 / 1e9) < 1e-3
    summary = json.load(open(d / "SFT" / "summary.json"))
    assert float(cost["SFT"]["train_s"]) == round(summary["seconds"], 1) and int(cost["SFT"]["peak_mb"]) > 0


def test_methods_tunes_dpo_on_other_prompts_and_says_what_comes_out(made, data_dir):
    """Each (beta, lr) answers the held-out prompts after the 4 reported; the best win rate
    is the one reported. P(end-of-text) where the chosen answer ends, checked against a
    plain softmax over the SFT model's full logits."""
    out, d = made["methods"]
    grid = rows(d / "grid.csv")
    assert [(g["beta"], g["lr"]) for g in grid] == [("0.1", "0.0001"), ("1.0", "0.0001")]
    best = [g for g in grid if g["chosen"] == "True"]
    assert len(best) == 1 and float(best[0]["win_vs_chosen"]) == max(float(g["win_vs_chosen"]) for g in grid)
    assert "tuned on 6 held-out prompts (val rows 5-10), not the 4 reported" in out
    assert out.index("tuned on") < out.index(f"{d}/costs.csv")
    result = {r["method"]: r for r in rows(d / "outcomes.csv")}
    assert list(result) == ["SFT", "SFT then DPO", "ORPO"] and float(result["ORPO"]["h2h_vs_orpo"]) == 0.5
    ck = checkpoint.load_checkpoint(str(d / "SFT" / "ckpt.pt"))
    model = checkpoint.model_from_checkpoint(ck, "ckpt").eval()
    tokens, index = (np.load(os.path.join(data_dir, f"val.{k}.npy")) for k in ("tokens", "index"))
    ps = []
    for off, p, c, _ in index[:16].tolist():  # the 16 eval pairs
        seq = torch.from_numpy(tokens[off:off + p + c].astype("int64"))
        assert int(seq[-1]) == ck["meta"]["eot"]
        with torch.no_grad():
            ps.append(torch.softmax(model(seq[None, :-1])[0, -1].double(), -1)[seq[-1]].item())
    assert abs(float(result["SFT"]["p_eot"]) - sum(ps) / len(ps)) < 1e-5
    assert all(float(r["words_chosen"]) > 0 and 0 <= float(r["at_limit"]) <= 1 for r in result.values())


def test_each_run_says_which_of_how_many_and_the_time_left(made):
    out = made["methods"][0]
    assert "== run 1 of 4: SFT --lam=0 --n_samples=4 ==" in out
    for k in (2, 3, 4):
        line = next(l for l in out.splitlines() if l.startswith(f"== run {k} of 4: "))
        assert line.endswith(" s left ==") and "about " in line


def test_a_png_has_no_empty_panel(made, tmp_path):
    """Every figure's PNG, and the picture of runs: each panel draws something, and the
    panels fill the grid they sit in."""
    pytest.importorskip("matplotlib", reason="pip install -r requirements-extra.txt")
    d = made["ratio"][1]
    pngs = [(figures.draw(name, made[name][1]), n) for name, n in
            (("sft-vs-orpo", 3), ("length", 3), ("ratio", 3), ("methods", 6))]
    pngs.append((plot.runs([str(d / "odds_ratio_seed1337"), str(d / "prob_ratio_seed1337")],
                           str(tmp_path / "runs.png")), 6))
    for fig, n in pngs:
        assert len(fig.axes) == n and all(ax.has_data() for ax in fig.axes)
        rows_, cols = fig.axes[0].get_subplotspec().get_gridspec().get_geometry()
        assert rows_ * cols == n
    png = made["ratio"][1] / "ratio.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_replot_draws_again_from_the_csvs_without_training(made, tmp_path):
    """--replot=true reads the figure's CSVs alone: with the runs' folders gone, it draws
    the PNG again; without matplotlib, a line says how to get it. Nothing to draw: one line."""
    d = tmp_path / "ratio"
    shutil.copytree(made["ratio"][1], d, ignore=shutil.ignore_patterns("*_seed*", "ratio.png"))
    r = module("figures", "ratio", "--replot=true", f"--out_dir={tmp_path}", hide=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("\n") == 1 and "matplotlib is not installed" in r.stdout and "pip install" in r.stdout
    pytest.importorskip("matplotlib")
    r = module("figures", "ratio", "--replot=true", f"--out_dir={tmp_path}")
    assert r.returncode == 0 and r.stdout == f"wrote {d / 'ratio.png'}\n", r.stderr
    assert sorted(os.listdir(d)) == ["curves.csv", "end.csv", "ratio.png", "spread.csv", "title.txt", "uniform.csv"]
    r = module("figures", "lambda", "--replot=true", f"--out_dir={tmp_path}")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "make the figure first" in r.stderr


def test_plot_draws_any_runs_side_by_side(made, tmp_path):
    d = made["ratio"][1]
    two = [str(d / "odds_ratio_seed1337"), str(d / "prob_ratio_seed1337")]
    r = module("plot", *two, f"--out={tmp_path / 'two.png'}", hide=True)
    assert r.returncode == 0 and r.stdout.count("\n") == 1 and "matplotlib is not installed" in r.stdout
    assert not (tmp_path / "two.png").exists()
    r = module("plot", str(tmp_path))
    assert r.returncode == 2 and r.stderr.startswith("error: ") and r.stderr.count("\n") == 1
    pytest.importorskip("matplotlib")
    r = module("plot", *two, f"--out={tmp_path / 'two.png'}")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "two.png").read_bytes()[:4] == b"\x89PNG"


def test_ctrl_c_in_methods_is_one_line_and_stops_the_run(tmp_path, data_dir):
    """SIGINT (what Ctrl-C sends) while a run trains in its own process: one line, exit 130,
    and the run's `python orpo.py` is gone too."""
    p = module("figures", "methods", "--config", "tiny", f"--out_dir={tmp_path}", f"--data_dir={data_dir}",
               "--max_iters=100000", "--dpo_betas=0.1", "--dpo_lrs=1e-4", prefix=CTRL_C, hide=True, popen=True)
    for line in p.stdout:  # wait until the SFT run is training
        if line.startswith("iter "):
            break
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 130 and err.count("\n") == 1 and err.startswith("error: interrupted"), err
    assert str(tmp_path / "methods") in err
    left = subprocess.run(["pgrep", "-f", f"out_dir={tmp_path}/methods/SFT"], capture_output=True)
    assert left.stdout == b""


def test_the_figure_name_comes_first():
    r = module("figures", "--config", "tiny")
    assert r.returncode == 2 and "the first argument names the figure" in r.stderr
    r = module("figures", "fig9")
    assert r.returncode == 2 and "sft-vs-orpo" in r.stderr


def test_a_figure_says_the_settings_that_differ():
    cfg = orpo.Config(**{**orpo.PRESETS["tiny"], "max_iters": 10, "n_samples": 4})
    t = figures.run_title("lam", "tiny", cfg)
    assert t.startswith("lam: config tiny, seed 1337\n") and "max_iters=10" in t and "n_samples=4" in t
    assert figures.run_title("lam", "tiny", orpo.Config(**orpo.PRESETS["tiny"])) == "lam: config tiny, seed 1337"
    assert figures.run_title("x", "tiny", cfg, seeds=3).startswith("x: config tiny, seeds 1337-1339\n")


@pytest.mark.parametrize("name", ["figures", "bench", "plot"])
def test_help_describes_every_option(name):
    r = module(name, "--help")
    assert r.returncode == 0 and r.stderr == "", r.stderr
    own = {"figures": [k for k in figures.OPTIONS], "bench": ["steps", "sweep", "gemms", "attn", "decode"],
           "plot": ["out"]}[name]
    for key in own:
        line = next(l for l in r.stdout.splitlines() if l.lstrip().startswith(f"--{key}="))
        assert len(line.split(None, 1)) == 2, line  # the option, then what it does
    if name != "plot":
        assert "--lr=" in r.stdout and "the peak learning rate" in r.stdout  # orpo.py's keys too


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_bench_prints_one_json_line(dtype):
    """The fraction of the limit is the step's FLOPs over its time at the measured peak:
    above 0 (not rounded away on a fast CPU) and below 1."""
    r = module("bench", "--n_layer=1", "--n_head=2", "--n_embd=32", "--block_size=32", "--batch_size=2",
               "--steps=3", "--vocab_size=256", f"--dtype={dtype}")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["tokens_per_step"] == 2 * 2 * 32 and out["steps"] == 3 and out["dtype"] == dtype
    assert out["logit_positions"] == 4 * 17  # half prompt: response targets from T/2 - 1
    assert out["tokens_per_s"] > 0 and out["peak_mem_mb"] > 0 and out["peak_shape"]
    assert 0 < out["mfu"] < 1 and out["first_step_s"] >= 0
    if out["matmul_ms"] is not None:  # measured on a CPU; a GPU's limit is its spec sheet's
        assert abs(out["other_ms"] - (out["ms_per_step"] - out["matmul_ms"])) < 0.11  # to 0.1
    ratio = out["tokens_per_s"] / out["limit_tokens_per_s"]
    assert abs(out["mfu"] - ratio) <= 1e-3 * ratio
