"""experiments/ as a user runs it: the figures (runs of orpo.py, their CSVs and PNGs), the
picture of any runs, and the benchmark. The figures are made once, in one fixture; what needs no training runs here,
in this process."""
import csv
import importlib.util
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

import orpo
from conftest import ROOT
from experiments import bench, figures, plot
from machinery import checkpoint, report

# matplotlib made unimportable: the figures' runs draw nothing (this process draws their panels)
HIDE = "import sys; sys.modules['matplotlib'] = None; "
# Ctrl-C's handler, as in a terminal: a shell that runs a command in the background ignores SIGINT
CTRL_C = "import signal; signal.signal(signal.SIGINT, signal.default_int_handler); "
MODULE = "import runpy, sys; sys.argv[0] = '{0}'; runpy.run_module('{0}', run_name='__main__', alter_sys=True)"
TINY = ["--config", "tiny", "--max_iters=4", "--eval_interval=5", "--eval_pairs=16", "--n_samples=4",
        "--max_new_tokens=8"]
METHODS = ["--dpo_iters=2", "--tune_samples=6", "--dpo_betas=0.1,1", "--dpo_lrs=1e-4"]


def module(name, *args, prefix="", popen=False):
    """python -m experiments.NAME ARGS, from the repo root."""
    cmd = [sys.executable, "-c", prefix + MODULE.format(f"experiments.{name}"), *args]
    if popen:
        return subprocess.Popen(cmd, cwd=ROOT, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)


def rows(path):
    """A figure's CSV: its rows, numbers as numbers."""
    def value(v):
        try:
            return float(v) if any(c in v for c in ".eEn") else int(v)  # nan, inf, 1e-4: floats
        except ValueError:
            return v
    with open(path, newline="") as f:
        return [{k: value(v) for k, v in r.items()} for r in csv.DictReader(f)]


def main(monkeypatch, capsys, mod, *argv):
    """A script's main() in this process: (exit status, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", [mod.__name__, *argv])
    with pytest.raises(SystemExit) as e:
        mod.main()
    out, err = capsys.readouterr()
    return e.value.code, out, err


@pytest.fixture(scope="module")
def made(tmp_path_factory, data_dir):
    """Two figures made once, on the tiny preset (4 iterations, 16 eval pairs, 4 sampled
    answers), without matplotlib: {name: (stdout, the figure's folder)}."""
    out, made = tmp_path_factory.mktemp("figures"), {}
    for name, extra in (("sft-vs-orpo", ["--seeds=2"]), ("methods", METHODS)):
        r = module("figures", name, *TINY, f"--out_dir={out}", f"--data_dir={data_dir}", *extra, prefix=HIDE)
        assert r.returncode == 0, r.stderr[-2000:]
        made[name] = r.stdout, out / name
    return made


def test_a_figure_writes_each_runs_curve_at_every_iteration(made):
    """Its runs, every seed's, each evaluated at every iteration (4 // 30 rounds up to 1),
    and the held-out end of each, as the runs' own summaries have it."""
    out, d = made["sft-vs-orpo"]
    curves = rows(d / "curves.csv")
    assert [(r["run"], r["iter"]) for r in curves] == [
        (run, float(i)) for _ in range(2) for run in ("SFT", "ORPO") for i in range(5)]
    for end in rows(d / "end.csv"):
        summary = json.load(open(d / f"{end['run']}_seed{end['seed']:.0f}" / "summary.json"))
        assert end["logp_rejected"] == summary["end"]["ell_l"] and summary["iters"] == 4
    assert "evals every 1 iterations, not --eval_interval=5" in out


def test_sft_vs_orpo_says_what_the_judge_says_per_seed_and_over_seeds(made):
    out, d = made["sft-vs-orpo"]
    seeds = rows(d / "seeds.csv")
    assert [s["seed"] for s in seeds] == [1337, 1338, "mean"]
    assert all(0 <= s["orpo_vs_sft"] <= 1 for s in seeds)
    assert abs(seeds[2]["orpo_vs_sft"] - (seeds[0]["orpo_vs_sft"] + seeds[1]["orpo_vs_sft"]) / 2) < 1e-12
    flaws = {f["model"]: f for f in rows(d / "flaws.csv")}
    assert list(flaws) == ["SFT", "ORPO", "chosen answers"]
    rates = [json.load(open(d / f"SFT_seed{s}" / "summary.json"))["flaw_rates"]["after"] for s in (1337, 1338)]
    assert abs(flaws["SFT"]["rude"] - np.mean([r["rude"] for r in rates])) < 1e-12
    assert f"{d}/seeds.csv" in out and f"{d}/flaws.csv" in out


def test_length_ranks_pairs_by_mean_and_by_sum():
    """By the sign of the length difference: the share of pairs whose chosen answer each
    of mean and summed log P ranks above the rejected one."""
    pairs = [dict(len_w=2, len_l=4, mean_w=-1.0, mean_l=-0.9),  # shorter: the sum alone right
             dict(len_w=5, len_l=2, mean_w=-1.0, mean_l=-1.2),  # longer: the mean alone right
             dict(len_w=3, len_l=3, mean_w=-0.5, mean_l=-0.7),  # as long: both right
             dict(len_w=3, len_l=3, mean_w=-0.9, mean_l=-0.7)]  # as long: both wrong
    assert figures.by_length(pairs) == dict(n_shorter=1, shorter_by_mean=0, shorter_by_sum=1, n_same=2,
                                            same_by_mean=0.5, same_by_sum=0.5, n_longer=1,
                                            longer_by_mean=1, longer_by_sum=0)


def test_ratio_draws_uniform_log_ratios():
    t = figures.uniform(None, None)
    assert abs(t["spread"][0]["std_log_odds_ratio"] - 2.56) < 0.02  # Fig. 6's wider contrast
    assert abs(t["spread"][0]["std_log_prob_ratio"] - 1.41) < 0.02
    assert sum(h["count"] for h in t["uniform"] if h["run"] == "log odds ratio") > 95_000  # |log OR| < 10


def test_methods_costs_from_the_runs_batches(made, data_dir):
    """Steps and passes from the summaries; the FLOPs replayed independently here, from
    make_batch's own tensors (their width) and GPT.flops; DPO's reference adds a third."""
    out, d = made["methods"]
    cost = {r["method"]: r for r in rows(d / "costs.csv")}
    assert list(cost) == ["SFT", "DPO phase", "SFT then DPO", "ORPO"]
    assert [cost[m]["steps"] for m in cost] == [4, 2, 6, 4]
    assert cost["DPO phase"]["ref_passes"] == cost["DPO phase"]["policy_passes"] == 2 * 16
    assert cost["ORPO"]["ref_passes"] == 0 and cost["SFT then DPO"]["policy_passes"] == 6 * 16
    cfg = orpo.Config(**orpo.PRESETS["tiny"])
    model = checkpoint.model_from_checkpoint(checkpoint.load_checkpoint(str(d / "SFT" / "ckpt.pt")), "ckpt")
    split = tuple(np.load(os.path.join(data_dir, f"train.{k}.npy")) for k in ("tokens", "index"))
    steps, flops = orpo.step_rows(split[1], cfg, 0, 0, 0, 1), []
    for _ in range(4):
        (r,), _, _ = next(steps)
        real, n_scored = report.batch_tokens(split[1], r, False)
        flops.append(model.flops(real, n_scored, orpo.make_batch(split, r, "cpu")[0].size(1)))
    assert abs(cost["SFT"]["gflop"] - sum(flops) / 1e9) < 1e-3
    assert cost["ORPO"]["gflop"] == cost["SFT"]["gflop"]
    assert abs(cost["DPO phase"]["gflop"] - sum(flops[:2]) * 4 / 3 / 1e9) < 1e-3
    summary = json.load(open(d / "SFT" / "summary.json"))
    assert cost["SFT"]["train_s"] == round(summary["seconds"], 1) and cost["SFT"]["peak_mb"] > 0


def test_methods_tunes_dpo_on_other_prompts_and_says_what_comes_out(made, data_dir):
    """Each (beta, lr) answers the held-out prompts after the 4 reported; the best win rate
    is the one reported. P(end-of-text) where the chosen answer ends, checked against a
    plain softmax over the SFT model's full logits."""
    out, d = made["methods"]
    grid = rows(d / "grid.csv")
    assert [(g["beta"], g["lr"]) for g in grid] == [(0.1, 1e-4), (1.0, 1e-4)]
    best = [g for g in grid if g["chosen"] == "True"]
    assert len(best) == 1 and best[0]["win_vs_chosen"] == max(g["win_vs_chosen"] for g in grid)
    assert "tuned on 6 held-out prompts (val rows 5-10), not the 4 reported" in out
    assert out.index("tuned on") < out.index(f"{d}/costs.csv")
    result = {r["method"]: r for r in rows(d / "outcomes.csv")}
    assert list(result) == ["SFT", "SFT then DPO", "ORPO"] and result["ORPO"]["h2h_vs_orpo"] == 0.5
    ck = checkpoint.load_checkpoint(str(d / "SFT" / "ckpt.pt"))
    model = checkpoint.model_from_checkpoint(ck, "ckpt").eval()
    tokens, index = (np.load(os.path.join(data_dir, f"val.{k}.npy")) for k in ("tokens", "index"))
    ps = []
    for off, p, c, _ in index[:16].tolist():  # the 16 eval pairs
        seq = torch.from_numpy(tokens[off:off + p + c].astype("int64"))
        assert int(seq[-1]) == ck["meta"]["eot"]
        with torch.no_grad():
            ps.append(torch.softmax(model(seq[None, :-1])[0, -1].double(), -1)[seq[-1]].item())
    assert abs(result["SFT"]["p_eot"] - sum(ps) / len(ps)) < 1e-5
    assert all(r["words_chosen"] > 0 and 0 <= r["at_limit"] <= 1 for r in result.values())


def test_each_run_says_which_of_how_many_and_the_time_left(made):
    out = made["methods"][0]
    assert "== run 1 of 4: SFT --lam=0 --n_samples=4 ==" in out
    for k in (2, 3, 4):
        line = next(l for l in out.splitlines() if l.startswith(f"== run {k} of 4: "))
        assert line.endswith(" s left ==") and "about " in line


def test_a_figure_made_without_matplotlib_writes_its_tables_and_says_how_to_get_the_png(made):
    """One line: install matplotlib and run the figure again; the numbers are in its folder."""
    tables = {"sft-vs-orpo": ["curves", "end", "seeds", "flaws"], "methods": ["grid", "costs", "outcomes"]}
    for name, (out, d) in made.items():
        line = next(l for l in out.splitlines() if "matplotlib is not installed" in l)
        assert f"no {d / name}.png: `pip install matplotlib` (or -r requirements-extra.txt)" in line
        assert line.endswith(f"run this again; the numbers are in {d}/") and not (d / f"{name}.png").exists()
        assert sorted(p.name for p in d.glob("*.csv")) == sorted(f"{t}.csv" for t in tables[name])


def test_a_png_has_no_empty_panel(made, tmp_path):
    """Each figure's panels, drawn here from its CSVs (the ratio figure's histogram too),
    each draw something and fill the grid they sit in."""
    pytest.importorskip("matplotlib", reason="pip install -r requirements-extra.txt")
    tables = {name: {c[:-4]: rows(d / c) for c in os.listdir(d) if c.endswith(".csv")}
              for name, (_, d) in made.items()}
    pairs = [dict(len_w=w, len_l=l, mean_w=-1.0, mean_l=-1.1) for w, l in ((2, 3), (3, 3), (4, 3))]
    by = [dict(run=m, **figures.by_length(pairs)) for m in ("untrained", "mean log P", "summed log P")]
    tables["length"] = dict(curves=tables["sft-vs-orpo"]["curves"], by_length=by)
    tables["ratio"] = dict(curves=tables["sft-vs-orpo"]["curves"], **figures.uniform(None, None))
    for name, n in (("sft-vs-orpo", 3), ("length", 3), ("methods", 6), ("ratio", 3)):
        fig = plot.draw(str(tmp_path / f"{name}.png"), name, figures.panels(tables[name]), "")
        assert len(fig.axes) == n and all(ax.has_data() for ax in fig.axes)
        r, c = fig.axes[0].get_subplotspec().get_gridspec().get_geometry()
        assert r * c == n
    png = tmp_path / "methods.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_plot_draws_any_runs_side_by_side(made, monkeypatch, capsys, tmp_path):
    """python -m experiments.plot: the runs' six panels of curves in one PNG; a folder that
    holds no run: one line and exit status 2."""
    d = made["sft-vs-orpo"][1]
    two = [str(d / "SFT_seed1337"), str(d / "ORPO_seed1337")]
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # --out= read, and nothing drawn
    monkeypatch.setattr(sys, "argv", ["plot", *two, f"--out={tmp_path / 'two.png'}"])
    plot.main()
    assert f"no {tmp_path / 'two.png'}: `pip install matplotlib`" in capsys.readouterr().out
    monkeypatch.undo()
    if importlib.util.find_spec("matplotlib"):
        monkeypatch.setattr(sys, "argv", ["plot", *two, f"--out={tmp_path / 'two.png'}"])
        fig = plot.main()
        assert len(fig.axes) == 6 and all(ax.has_data() for ax in fig.axes)
        assert (tmp_path / "two.png").read_bytes()[:4] == b"\x89PNG"
    code, _, err = main(monkeypatch, capsys, plot, str(tmp_path))
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1


def test_ctrl_c_in_methods_is_one_line_and_stops_the_run(tmp_path, data_dir):
    """SIGINT (what Ctrl-C sends) while a run trains in its own process: one line, exit 130,
    and the run's `python orpo.py` is gone too."""
    p = module("figures", "methods", "--config", "tiny", f"--out_dir={tmp_path}", f"--data_dir={data_dir}",
               "--max_iters=100000", "--dpo_betas=0.1", "--dpo_lrs=1e-4", prefix=CTRL_C, popen=True)
    for line in p.stdout:  # wait until the SFT run is training
        if line.startswith("iter "):
            break
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 130 and err.count("\n") == 1 and err.startswith("error: interrupted"), err
    assert str(tmp_path / "methods") in err
    left = subprocess.run(["pgrep", "-f", f"out_dir={tmp_path}/methods/SFT"], capture_output=True)
    assert left.stdout == b""


def test_the_figure_name_comes_first(monkeypatch, capsys):
    code, _, err = main(monkeypatch, capsys, figures, "--config", "tiny")
    assert code == 2 and "the first argument names the figure" in err
    code, _, err = main(monkeypatch, capsys, figures, "fig9")
    assert code == 2 and "sft-vs-orpo" in err and err.count("\n") == 1


def test_a_figure_says_the_settings_that_differ():
    cfg = orpo.Config(**{**orpo.PRESETS["tiny"], "max_iters": 10, "n_samples": 4})
    t = figures.run_title("lam", "tiny", cfg)
    assert t.startswith("lam: config tiny, seed 1337\n") and "max_iters=10" in t and "n_samples=4" in t
    assert figures.run_title("lam", "tiny", orpo.Config(**orpo.PRESETS["tiny"])) == "lam: config tiny, seed 1337"
    assert figures.run_title("x", "tiny", cfg, seeds=3).startswith("x: config tiny, seeds 1337-1339\n")


@pytest.mark.parametrize("mod", [figures, bench, plot])
def test_help_describes_every_option(monkeypatch, capsys, mod):
    code, out, err = main(monkeypatch, capsys, mod, "--help")
    assert code == 0 and err == "", err
    own = {figures: list(figures.OPTIONS), bench: ["steps"], plot: ["out"]}[mod]
    for key in own:
        line = next(l for l in out.splitlines() if l.lstrip().startswith(f"--{key}="))
        assert len(line.split(None, 1)) == 2, line  # the option, then what it does
    if mod is not plot:
        assert "--lr=" in out and "the peak learning rate" in out  # orpo.py's keys too


def test_bench_prints_one_json_line():
    """The limit is the step's FLOPs (GPT.flops, counted here) at the rate of one matmul of
    the step's largest class, here the output layer's (a vocabulary of 4,096 outweighs one
    block of width 32); the fraction of it reached is above 0 and below 1."""
    r = module("bench", "--n_layer=1", "--n_head=2", "--n_embd=32", "--block_size=32", "--batch_size=2",
               "--steps=3", "--vocab_size=4096", "--dtype=bfloat16")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["tokens_per_step"] == 2 * 2 * 32 and out["steps"] == 3 and out["dtype"] == "bfloat16"
    assert out["logit_positions"] == 4 * 17  # half prompt: response targets from T/2 - 1
    assert out["peak_shape"] == "lm_head [68,32]@[32,1024]"
    assert out["tokens_per_s"] > 0 and out["peak_mem_mb"] > 0 and out["first_step_s"] >= 0
    block = 12 * 32 * 32 + 13 * 32  # the Linears' weights (3 + 1 + 4 + 4 C^2), biases and LayerNorms
    flops = 6 * block * 128 + 12 * 32 * 32 * 128 + 6 * 32 * 4096 * 68  # blocks, attention, output
    peak = out["limit_tokens_per_s"] * flops / 128 / 1e9  # GFLOP/s, printed to 0.1
    assert abs(peak - out["peak_gflops"]) <= 0.051 + 1e-3 * peak
    assert 0 < out["mfu"] < 1
    ratio = out["tokens_per_s"] / out["limit_tokens_per_s"]
    assert abs(out["mfu"] - ratio) <= 1e-3 * ratio


def test_bench_times_the_blocks_matmul_where_they_outweigh_the_output_layer():
    cfg = orpo.Config(**{**orpo.PRESETS["tiny"], "n_layer": 1, "vocab_size": 256})
    raw = checkpoint.build_model(cfg, dict(vocab_size=256), None)
    rate, shape = bench.cpu_peak(raw, 128, 68, torch.float32, min_s=0.01)
    assert shape == "c_fc [128,32]@[32,128]" and rate > 0
