"""The classroom figures (--figure) and the loss variants they compare (--ratio, --logp)."""
import csv
import os
import subprocess
import sys

import pytest
import torch

import orpo
from conftest import ROOT

# orpo.py run as a script, with matplotlib made unimportable or left as it is
HIDE = "import sys; sys.modules['matplotlib'] = None; "
SCRIPT = "import runpy, sys; sys.argv = ['orpo.py'] + sys.argv[1:]; runpy.run_path('orpo.py', run_name='__main__')"


def figure(tmp_path, data_dir, name, hide):
    args = ["--config", "tiny", f"--figure={name}", f"--out_dir={tmp_path}", f"--data_dir={data_dir}",
            "--max_iters=10", "--eval_interval=5", "--n_samples=4"]
    r = subprocess.run([sys.executable, "-c", (HIDE if hide else "") + SCRIPT, *args], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout, tmp_path / name


@pytest.mark.parametrize("name", list(orpo.FIGURES))
def test_figure_writes_numbers_without_matplotlib(tmp_path, data_dir, name):
    out, d = figure(tmp_path, data_dir, name, hide=True)
    assert "matplotlib is not installed" in out
    assert not (d / f"{name}.png").exists()
    rows = list(csv.DictReader(open(d / "curves.csv")))
    assert {r["run"] for r in rows} == set(orpo.FIGURES[name])
    assert [r["iter"] for r in rows] == ["0", "5", "10"] * len(orpo.FIGURES[name])
    if name in ("ratio", "length"):
        assert len(list(csv.DictReader(open(d / "pairs.csv")))) > 0


def test_figure_writes_png_with_matplotlib(tmp_path, data_dir):
    pytest.importorskip("matplotlib", reason="pip install -r requirements-extra.txt")
    out, d = figure(tmp_path, data_dir, "ratio", hide=False)
    png = d / "ratio.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert (d / "curves.csv").exists()


def test_probability_ratio_and_summed_logp():
    """--ratio=prob contrasts log P_w - log P_l (Sec. 7.1); --logp=sum drops Eq. 3's 1/m."""
    tok = torch.log(torch.tensor([0.5, 0.5, 0.2, 0.1, 0.1, 0.9], dtype=torch.float64))
    resp = torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.float64)  # B=1: chosen, rejected
    need = torch.tensor([[1, 1, 0], [1, 1, 1]]).bool()
    tok = tok[:5]
    _, mean = orpo.response_logps(tok, resp, need)
    _, total = orpo.response_logps(tok, resp, need, mean=False)
    torch.testing.assert_close(total, mean * resp.sum(1))
    torch.testing.assert_close(total, torch.log(torch.tensor([0.25, 0.2 * 0.1 * 0.1], dtype=torch.float64)))
    _, odds = orpo.orpo_loss(None, mean, None, 1.0, False)
    _, prob = orpo.orpo_loss(None, mean, None, 1.0, False, ratio="prob")
    torch.testing.assert_close(prob["log_or"], mean[0] - mean[1])
    P = mean.exp()
    torch.testing.assert_close(odds["log_or"], torch.log(P[0] / (1 - P[0]) / (P[1] / (1 - P[1]))))


def test_variant_flags_are_checked():
    for bad in (["--ratio=log"], ["--logp=median"], ["--figure=fig9"], ["--hand_grad=true", "--ratio=prob"]):
        r = subprocess.run([sys.executable, os.path.join(ROOT, "orpo.py"), "--config", "tiny", *bad],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 2 and "error: --" in r.stderr, (bad, r.stderr)
