import json
import os
import subprocess
import sys

import pytest
import torch

import orpo
import prepare_data
from conftest import ROOT, losses, run


def cli(*args, cwd=ROOT):
    return subprocess.run([sys.executable, os.path.join(ROOT, "orpo.py"), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=300)


def test_tiny_run_learns_and_writes_everything(tmp_path, data_dir):
    recs = run(tmp_path, data_dir, max_iters=40, eval_interval=20)
    evals = [r for r in recs if r["kind"] == "eval"]
    assert [e["iter"] for e in evals] == [0, 20, 40]
    assert evals[-1]["sft"] < evals[0]["sft"] - 0.5   # chosen NLL falls
    assert evals[-1]["acc"] > evals[0]["acc"]         # held-out preference accuracy rises
    assert len(losses(recs)) == 40
    summary = json.load(open(tmp_path / "summary.json"))
    assert summary["iters"] == 40 and 0 <= summary["win_rate"][1] <= 1
    ck = torch.load(tmp_path / "ckpt.pt", weights_only=False)
    assert {"model", "optimizer", "scaler", "config", "iter", "epoch", "pos", "rng"} <= set(ck)


def test_resume_reproduces_the_uninterrupted_run(tmp_path, data_dir):
    kw = dict(max_iters=20, lr_decay_iters=20, eval_interval=10, dropout=0.1)
    orpo._PEAK.clear()  # each run as in a new process: it measures the MFU peak again
    full = losses(run(tmp_path / "a", data_dir, **kw))
    orpo._PEAK.clear()
    run(tmp_path / "b", data_dir, **{**kw, "max_iters": 10})
    orpo._PEAK.clear()
    resumed = losses(run(tmp_path / "b", data_dir, **kw, init_from="resume"))
    assert len(full) == 20 and len(resumed) == 20  # b's log: 10 before the stop, 10 after
    assert resumed == full  # bit for bit: weights, optimizer, lr, data order and RNG restored


def test_a_new_run_in_the_same_out_dir_starts_a_fresh_log(tmp_path, data_dir):
    run(tmp_path, data_dir, max_iters=6, log_interval=1)
    recs = run(tmp_path, data_dir, lam=0.0, max_iters=4, log_interval=1)
    assert [r["iter"] for r in recs if r["kind"] == "train"] == [1, 2, 3, 4]
    assert all(r["loss"] == r["sft"] for r in recs if r["kind"] == "train")  # the lam=0 run's


def test_lam_zero_is_plain_sft(tmp_path, data_dir):
    recs = losses(run(tmp_path, data_dir, lam=0.0, max_iters=5))
    assert all(loss == sft for _, loss, sft, _ in recs)


@pytest.mark.parametrize("args, msg", [
    (["--nope=1"], "unknown config key 'nope'"),
    (["--lr=fast"], "--lr expects float, got 'fast'"),
    (["--compile=maybe"], "--compile expects bool"),
    (["--config", "huge"], "unknown config 'huge'"),
    (["stray"], "expected --key=value"),
])
def test_bad_overrides_exit_2_with_a_clear_message(args, msg):
    r = cli(*args)
    assert r.returncode == 2, r.stderr
    assert msg in r.stderr


def test_overrides_parse_both_spellings():
    preset, cfg = orpo.parse_args(["--config", "tiny", "--lr=0.5", "--max_iters", "7",
                                   "--sft_on_prompt=true"])
    assert (preset, cfg.lr, cfg.max_iters, cfg.sft_on_prompt, cfg.n_layer) == ("tiny", 0.5, 7, True, 2)


def test_bad_rows_are_counted_named_and_the_rest_kept(tmp_path, capsys):
    enc = prepare_data.get_encoding("synthetic")
    good = {"prompt": "user: 2 more like cat and dog\nassistant:", "chosen": " sure : owl hen .",
            "rejected": " ugh : owl hen ."}
    rows = [good, {"prompt": "p", "chosen": "c"}, ["not", "a", "dict"], dict(good, chosen=3),
            dict(good, rejected=good["chosen"]), dict(good, chosen="  "), good]
    counts = prepare_data.write_split(rows, enc, str(tmp_path), "train", 64, 32, "rows.jsonl")
    assert counts["read"] == 7 and counts["kept"] == 2
    assert counts["dropped"] == {"malformed": 3, "empty_response": 1, "identical": 1}
    assert counts["kept"] + sum(counts["dropped"].values()) == counts["read"]
    err = capsys.readouterr().err
    assert "rows.jsonl row 1: missing key 'rejected'" in err
    assert "rows.jsonl row 2: expected an object" in err
    assert "rows.jsonl row 3: 'chosen' is int" in err


def test_truncation_keeps_prompt_end_and_response_start(tmp_path):
    enc = prepare_data.get_encoding("synthetic")
    row = {"prompt": " cat" * 20, "chosen": " dog" * 20, "rejected": " owl" * 3}
    counts = prepare_data.write_split([row], enc, str(tmp_path), "train", 16, 6, "t")
    assert counts["truncated"] == 1
    import numpy as np
    tokens, (off, p, c, r) = np.load(tmp_path / "train.tokens.npy"), np.load(tmp_path / "train.index.npy")[0]
    assert (p, c, r) == (6, 10, 4)  # prompt keeps 6, each response at most 16 - 6
    assert enc.decode(tokens[off + p:off + p + c].tolist()) == " dog" * 10


def test_mismatched_and_corrupt_checkpoints_are_clear_errors(tmp_path, data_dir):
    run(tmp_path, data_dir, max_iters=2, eval_interval=2)
    r = cli("--config", "tiny", f"--out_dir={tmp_path}", f"--data_dir={data_dir}",
            "--init_from=resume", "--n_embd=64")
    assert r.returncode == 2 and "has n_embd=32, but the run asks for n_embd=64" in r.stderr
    (tmp_path / "ckpt.pt").write_bytes(b"not a checkpoint")
    r = cli("--config", "tiny", f"--out_dir={tmp_path}", f"--data_dir={data_dir}",
            "--init_from=resume")
    assert r.returncode == 2 and "is not a readable checkpoint" in r.stderr
    r = cli(f"--out_dir={tmp_path / 'none'}", "--prompt=hi")
    assert r.returncode == 2 and "no checkpoint at" in r.stderr


def test_nan_loss_stops_naming_iteration_and_term(tmp_path, data_dir, capsys):
    with pytest.raises(SystemExit) as e:
        run(tmp_path, data_dir, lam=float("nan"), max_iters=3)
    assert e.value.code == 2
    assert "iteration 1: non-finite loss=nan" in capsys.readouterr().err
    assert not (tmp_path / "ckpt.pt").exists()  # nothing saved over a good checkpoint


def test_sample_from_a_checkpoint_for_a_typed_prompt(tmp_path, data_dir):
    run(tmp_path, data_dir, max_iters=2, eval_interval=2)
    r = cli(f"--out_dir={tmp_path}", "--prompt=user: 3 more like cat and dog\\nassistant:",
            "--n_samples=2", "--max_new_tokens=4")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 2 and all(l.startswith("'user: 3 more like cat and dog\\nassistant:' ->")
                                   for l in lines)
    assert "judge" in lines[0]
