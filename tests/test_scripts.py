"""The sibling scripts as a user runs them: sample.py, bench.py, figures.py."""
import csv
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

import figures
import orpo
from conftest import ROOT, cli, run
from machinery import checkpoint, gpt2


def test_sample_from_a_checkpoint_for_a_typed_prompt(tmp_path, data_dir):
    run(tmp_path, data_dir, max_iters=2, eval_interval=2)
    r = cli("sample.py", f"--out_dir={tmp_path}", "--prompt=user: 3 more like cat and dog\\nassistant:",
            "--n_samples=2", "--max_new_tokens=4")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 2 and all(l.startswith("'user: 3 more like cat and dog\\nassistant:' ->")
                                   for l in lines)
    assert "judge" in lines[0]


def test_sample_errors(tmp_path):
    r = cli("sample.py", f"--out_dir={tmp_path}", "--prompt=")
    assert r.returncode == 2 and "give --prompt=TEXT" in r.stderr  # no training started
    r = cli("sample.py", f"--out_dir={tmp_path / 'none'}", "--prompt=hi")
    assert r.returncode == 2 and "no checkpoint at" in r.stderr
    r = cli("sample.py", "--temperature=-1", "--prompt=hi")
    assert r.returncode == 2 and "--temperature must be a number >= 0" in r.stderr
    assert not os.listdir(tmp_path)


def test_export_then_load_gives_the_same_logits(tmp_path, data_dir):
    run(tmp_path, data_dir, max_iters=2, eval_interval=2)
    r = cli("sample.py", f"--out_dir={tmp_path}", f"--export={tmp_path / 'hf'}")
    assert r.returncode == 0, r.stderr
    assert "not GPT-2's" in r.stdout  # the synthetic task's tokenizer, said plainly
    ck = checkpoint.load_checkpoint(str(tmp_path / "ckpt.pt"))
    mine = checkpoint.model_from_checkpoint(ck, "ckpt").eval()
    back = gpt2.from_pretrained(str(tmp_path / "hf"), block_size=mine.cfg.block_size).eval()
    cfg = json.load(open(tmp_path / "hf" / "config.json"))
    assert cfg["vocab_size"] == ck["meta"]["vocab_size"] == 546  # cut back to the tokenizer's
    x = torch.randint(0, 546, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(back(x), mine(x), rtol=0, atol=1e-6)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_bench_prints_one_json_line(dtype):
    """The fraction of the limit is the step's FLOPs over its time at the measured peak:
    above 0 (not rounded away on a fast CPU) and below 1."""
    r = cli("bench.py", "--n_layer=1", "--n_head=2", "--n_embd=32", "--block_size=32",
            "--batch_size=2", "--steps=3", "--vocab_size=256", f"--dtype={dtype}")
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


# figures.py run as a script, with matplotlib made unimportable or left as it is
HIDE = "import sys; sys.modules['matplotlib'] = None; "
# Ctrl-C's handler, as in a terminal: a shell that runs a command in the background ignores SIGINT
CTRL_C = "import signal; signal.signal(signal.SIGINT, signal.default_int_handler); "
SCRIPT = ("import runpy, sys; sys.argv = ['figures.py'] + sys.argv[1:]; "
          "runpy.run_path('figures.py', run_name='__main__')")


def figure(tmp_path, data_dir, name, hide, extra=()):
    args = [name, "--config", "tiny", f"--out_dir={tmp_path}", f"--data_dir={data_dir}",
            "--max_iters=10", "--eval_interval=5", "--n_samples=4", *extra]
    r = subprocess.run([sys.executable, "-c", (HIDE if hide else "") + SCRIPT, *args], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout, tmp_path / name


@pytest.mark.parametrize("name", [n for n in figures.FIGURES if n != "methods"])
def test_figure_writes_numbers_without_matplotlib(tmp_path, data_dir, name):
    out, d = figure(tmp_path, data_dir, name, hide=True, extra=["--seeds=2"] if name == "sft-vs-orpo" else [])
    assert "matplotlib is not installed" in out
    assert not (d / f"{name}.png").exists()
    rows = list(csv.DictReader(open(d / "curves.csv")))
    assert {r["run"] for r in rows} == set(figures.FIGURES[name])
    n = len(figures.FIGURES[name]) * (2 if name == "sft-vs-orpo" else 1)  # two seeds there
    assert [r["iter"] for r in rows] == [str(i) for i in range(11)] * n  # dense: every iteration
    if name in ("ratio", "length"):
        assert len(list(csv.DictReader(open(d / "pairs.csv")))) > 0
    if name == "sft-vs-orpo":  # per seed: flaw rates of both, head-to-head; 4 scores a run
        table = list(csv.DictReader(open(d / "table.csv")))
        assert [t["seed"] for t in table] == ["1337", "1338"]
        assert all(0 <= float(t["h2h_orpo_vs_sft"]) <= 1 and 0 <= float(t["orpo_off_topic"]) <= 1
                   for t in table)
        assert len(list(csv.DictReader(open(d / "scores.csv")))) == 2 * 2 * 4
        assert "ORPO vs SFT, head-to-head" in out and "standard error" in out


def test_methods_figure_costs_and_outcomes(tmp_path, data_dir):
    """SFT, then DPO from it against it as the reference, and ORPO: DPO's phase runs a
    reference forward pass for every policy pass; SFT then DPO adds both phases' costs.
    --tune_samples=0: one DPO setting, no grid."""
    out, d = figure(tmp_path, data_dir, "methods", hide=True, extra=["--dpo_iters=4", "--tune_samples=0"])
    rows = {r["method"]: r for r in csv.DictReader(open(d / "methods.csv"))}
    assert list(rows) == ["SFT", "DPO phase", "SFT then DPO", "ORPO"]
    assert [int(rows[m]["steps"]) for m in rows] == [10, 4, 14, 10]
    assert int(rows["DPO phase"]["ref_passes"]) == int(rows["DPO phase"]["policy_passes"]) == 4 * 16
    assert int(rows["ORPO"]["ref_passes"]) == 0 and float(rows["ORPO"]["h2h_vs_orpo"]) == 0.5
    assert float(rows["SFT then DPO"]["gflop"]) > float(rows["ORPO"]["gflop"])
    assert (rows["DPO phase"]["beta"], rows["DPO phase"]["lr"]) == ("0.1", "0.0001")  # --beta, --dpo_lr
    assert "what each costs" in out and "what comes out" in out and "tuned" not in out
    assert not (d / "grid.csv").exists()


def test_methods_tunes_dpo_on_other_prompts(tmp_path, data_dir):
    """Each (beta, lr) of the grid answers held-out prompts after the reported ones; the one
    with the best win rate is reported. P(end-of-text) where the chosen answer ends, checked
    against a plain softmax over the SFT model's full logits."""
    out, d = figure(tmp_path, data_dir, "methods", hide=True, extra=[
        "--dpo_iters=4", "--tune_samples=6", "--dpo_betas=0.1,1", "--dpo_lrs=1e-4"])
    grid = list(csv.DictReader(open(d / "grid.csv")))
    assert [(g["beta"], g["lr"]) for g in grid] == [("0.1", "0.0001"), ("1.0", "0.0001")]
    best = [g for g in grid if g["chosen"] == "True"]
    assert len(best) == 1 and float(best[0]["win_vs_chosen"]) == max(float(g["win_vs_chosen"]) for g in grid)
    rows = {r["method"]: r for r in csv.DictReader(open(d / "methods.csv"))}
    assert float(rows["SFT then DPO"]["beta"]) == float(best[0]["beta"])
    assert "tuned on 6 held-out prompts (val rows 5-10), not the 4 reported below" in out
    assert out.index("<- chosen") < out.index("what each costs")
    why = {w["model"].split(" (")[0]: w for w in csv.DictReader(open(d / "why.csv"))}
    assert list(why) == ["untrained", "ORPO", "SFT", "SFT then DPO"]
    ck = checkpoint.load_checkpoint(str(d / "SFT" / "ckpt.pt"))
    model = checkpoint.model_from_checkpoint(ck, "ckpt").eval()
    tokens, index = (np.load(os.path.join(data_dir, f"val.{k}.npy")) for k in ("tokens", "index"))
    ps = []
    for off, p, c, _ in index[:32].tolist():  # the tiny preset's 32 eval pairs
        seq = torch.from_numpy(tokens[off:off + p + c].astype("int64"))
        assert int(seq[-1]) == ck["meta"]["eot"]
        with torch.no_grad():
            ps.append(torch.softmax(model(seq[None, :-1])[0, -1].double(), -1)[seq[-1]].item())
    assert abs(float(why["SFT"]["p_eot"]) - sum(ps) / len(ps)) < 1e-5
    assert all(float(w["words_chosen"]) > 0 and 0 <= float(w["at_limit"]) <= 1 for w in why.values())


def test_ctrl_c_in_methods_is_one_line_and_stops_the_phase(tmp_path, data_dir):
    """SIGINT (what Ctrl-C sends) while a phase trains in its own process: one line, exit
    130, and the phase's `python orpo.py` is gone too."""
    args = ["methods", "--config", "tiny", f"--out_dir={tmp_path}", f"--data_dir={data_dir}",
            "--max_iters=100000", "--tune_samples=0"]
    p = subprocess.Popen([sys.executable, "-c", CTRL_C + HIDE + SCRIPT, *args], cwd=ROOT, text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    for line in p.stdout:  # wait until the SFT phase is training
        if line.startswith("iter "):
            break
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 130 and err.count("\n") == 1 and err.startswith("error: interrupted"), err
    assert str(tmp_path / "methods") in err
    left = subprocess.run(["pgrep", "-f", f"out_dir={tmp_path}/methods/SFT"], capture_output=True)
    assert left.stdout == b""


def test_figure_writes_png_with_matplotlib(tmp_path, data_dir):
    pytest.importorskip("matplotlib", reason="pip install -r requirements-extra.txt")
    out, d = figure(tmp_path, data_dir, "ratio", hide=False)
    png = d / "ratio.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert (d / "curves.csv").exists()


def test_figure_name_comes_first():
    r = cli("figures.py", "--config", "tiny")
    assert r.returncode == 2 and "the first argument names the figure" in r.stderr
    r = cli("figures.py", "fig9")
    assert r.returncode == 2 and "sft-vs-orpo" in r.stderr


def test_the_code_reads_forward_and_fits_on_a_screen():
    """Every file reads top to bottom: a top-level name is used only below its definition
    (main() excepted), and no function is over 60 lines; the core and the machinery never
    import the scripts."""
    import ast
    py = lambda d: [os.path.join(d, f) for f in os.listdir(os.path.join(ROOT, d)) if f.endswith(".py")]
    machinery = py("machinery")
    core = ["orpo.py", "model.py", "prepare_data.py"] + machinery  # no scripts
    for name in sorted([f for f in os.listdir(ROOT) if f.endswith(".py")] + machinery + py("tests")):
        tree = ast.parse(open(os.path.join(ROOT, name)).read())
        defined = {}
        for node in tree.body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                defined.setdefault(node.name, node.lineno)
            elif isinstance(node, ast.Assign):
                for t in node.targets:
                    defined.setdefault(getattr(t, "id", None), node.lineno)
        for node in tree.body:
            for n in ast.walk(node):
                if isinstance(n, ast.Name) and n.id != "main" and defined.get(n.id, 0) > node.lineno:
                    pytest.fail(f"{name}:{n.lineno} uses {n.id}, defined further down")
                if isinstance(n, ast.FunctionDef):
                    assert n.end_lineno - n.lineno < 60, f"{name}: {n.name} is over 60 lines"
                if isinstance(n, (ast.Import, ast.ImportFrom)) and name in core:
                    mods = [a.name for a in n.names] if isinstance(n, ast.Import) else [n.module]
                    assert not {"sample", "bench", "figures"} & set(mods), f"{name} imports {mods}"


def test_a_figure_says_the_settings_that_differ_and_its_eval_interval(tmp_path, data_dir):
    cfg = orpo.Config(**{**orpo.PRESETS["tiny"], "max_iters": 10, "n_samples": 4})
    t = figures.run_title("lam", "tiny", cfg)
    assert t.startswith("lam: config tiny, seed 1337\n") and "max_iters=10" in t and "n_samples=4" in t
    assert figures.run_title("lam", "tiny", orpo.Config(**orpo.PRESETS["tiny"])) == "lam: config tiny, seed 1337"
    out, _ = figure(tmp_path, data_dir, "ratio", hide=True)  # --max_iters=10 --eval_interval=5
    assert "evals every 1 iterations, not --eval_interval=5" in out
