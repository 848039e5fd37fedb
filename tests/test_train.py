"""The training loop: it learns, resumes bit for bit, logs what it ran, and refuses bad input
with one line and exit status 2 before any work."""
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import orpo
import prepare_data
from conftest import ROOT, assert_same_losses, cli, losses, run
from machinery import checkpoint, report, synthetic
from machinery import cli as configurator


def test_tiny_run_learns_and_writes_everything(tmp_path, data_dir):
    recs = run(tmp_path, data_dir, max_iters=40, eval_interval=20)
    evals = [r for r in recs if r["kind"] == "eval"]
    assert [e["iter"] for e in evals] == [0, 20, 40]
    assert evals[-1]["l_sft"] < evals[0]["l_sft"] - 0.5  # chosen NLL falls
    assert evals[-1]["acc"] > evals[0]["acc"]            # held-out preference accuracy rises
    assert len(losses(recs)) == 40
    summary = json.load(open(tmp_path / "summary.json"))
    assert summary["iters"] == 40 and 0 <= summary["win_rate"][1] <= 1
    ck = torch.load(tmp_path / "ckpt.pt", weights_only=False)
    assert {"model", "model_args", "optimizer", "scaler", "config", "iter", "epoch", "pos",
            "rng", "seconds"} <= set(ck)


def test_resume_reproduces_the_uninterrupted_run(tmp_path, data_dir):
    kw = dict(max_iters=20, lr_decay_iters=20, eval_interval=10, dropout=0.1)
    full = losses(run(tmp_path / "a", data_dir, **kw))
    run(tmp_path / "b", data_dir, **{**kw, "max_iters": 10})
    resumed = losses(run(tmp_path / "b", data_dir, **kw, init_from="resume"))
    assert len(full) == 20
    assert_same_losses(resumed, full)  # bit for bit: weights, optimizer, lr, data order, RNG


def test_resume_logs_each_iteration_once_and_counts_the_whole_time(tmp_path, data_dir):
    """A run killed after its checkpoint at 10 had logged iterations 11-14: the resumed run
    runs them again and logs them once; its clock starts from the checkpoint's."""
    kw = dict(lr_decay_iters=20, eval_interval=10, log_interval=1)
    recs = run(tmp_path, data_dir, max_iters=10, **kw)
    first = torch.load(tmp_path / "ckpt.pt", weights_only=False)["seconds"]
    with open(tmp_path / "log.jsonl", "a") as f:  # what the killed process had written
        for rec in losses(recs)[:4]:
            f.write(json.dumps(dict(kind="train", iter=rec[0] + 10, loss=0, l_sft=0, l_or=0)) + "\n")
    recs = run(tmp_path, data_dir, max_iters=20, **kw, init_from="resume")
    assert [r[0] for r in losses(recs)] == list(range(1, 21))
    assert [r["iter"] for r in recs if r["kind"] == "eval"] == [0, 10, 20]
    # as the uninterrupted run: the first run's samples after training, at 10, are gone
    assert [r["iter"] for r in recs if r["kind"] == "samples"] == [0, 20]
    recs = run(tmp_path, data_dir, max_iters=20, **kw, init_from="resume")  # nothing to run
    assert [r["iter"] for r in recs if r["kind"] == "samples"] == [0, 20]  # sampled once
    ck = torch.load(tmp_path / "ckpt.pt", weights_only=False)
    assert first > 0 and ck["seconds"] > first  # the clock carried over


def test_a_new_run_in_a_folder_that_holds_a_run_is_refused_and_mixes_nothing(tmp_path, data_dir):
    first = run(tmp_path, data_dir, max_iters=6, log_interval=1, eval_interval=3)
    before = {f: (tmp_path / f).read_bytes() for f in ("ckpt.pt", "log.jsonl", "summary.json")}
    r = cli("orpo.py", "--config=tiny", f"--data_dir={data_dir}", f"--out_dir={tmp_path}", "--lam=0")
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert f"{tmp_path} holds another run ({tmp_path / 'ckpt.pt'} holds iteration 6)" in r.stderr
    assert "--init_from=resume" in r.stderr
    assert {f: (tmp_path / f).read_bytes() for f in before} == before  # the old run, whole
    assert [r["iter"] for r in first if r["kind"] == "train"] == [1, 2, 3, 4, 5, 6]


def test_the_same_command_again_moves_the_first_run_aside_and_says_so(tmp_path, data_dir):
    """The README's first command, run twice: both exit 0; the first run is kept whole in
    out_dir/previous, and one line says so. A log alone (a run killed before it saved
    anything) goes there too; --fresh=true moves a run of other settings."""
    args = ["--config=tiny", f"--data_dir={data_dir}", f"--out_dir={tmp_path}", "--max_iters=2",
            "--n_samples=2", "--eval_pairs=8"]
    assert cli("orpo.py", *args).returncode == 0
    first = {f: (tmp_path / f).read_bytes() for f in ("ckpt.pt", "log.jsonl", "summary.json")}
    r = cli("orpo.py", *args)
    assert r.returncode == 0, r.stderr
    assert f"{tmp_path}: the earlier run there (summary.json, log.jsonl, ckpt.pt) is now in " \
           f"{tmp_path / 'previous'}" in r.stdout
    assert {f: (tmp_path / "previous" / f).read_bytes() for f in first} == first
    assert sorted(os.listdir(tmp_path)) == [".lock", "ckpt.pt", "log.jsonl", "previous", "summary.json"]
    for f in ("ckpt.pt", "summary.json"):  # a run killed before its first save: its log alone
        os.remove(tmp_path / f)
    log = (tmp_path / "log.jsonl").read_bytes()
    assert cli("orpo.py", *args[:-2], "--lam=0.5", "--n_samples=2", "--eval_pairs=8").returncode == 0
    assert (tmp_path / "previous" / "log.jsonl").read_bytes() == log
    assert not (tmp_path / "previous" / "ckpt.pt").exists()  # previous: that run alone
    r = cli("orpo.py", *args)  # other settings than the lam=0.5 run there: refused, then moved
    assert r.returncode == 2 and "or start over with --fresh=true" in r.stderr, r.stderr
    assert cli("orpo.py", *args, "--fresh=true").returncode == 0
    assert json.loads((tmp_path / "previous" / "summary.json").read_text())["lam"] == 0.5


def test_a_move_aside_cut_short_is_finished_by_the_next_run(tmp_path, data_dir):
    """Killed while it moved the earlier run aside: the folder holds no new run's files
    beside the old one's, and the next run with --fresh=true finishes the move."""
    args = ["--config=tiny", f"--data_dir={data_dir}", f"--out_dir={tmp_path}", "--max_iters=2",
            "--n_samples=2", "--eval_pairs=8"]
    assert cli("orpo.py", *args).returncode == 0
    first = {f: (tmp_path / f).read_bytes() for f in ("ckpt.pt", "log.jsonl", "summary.json")}
    hook = ("import os, signal, sys; sys.path.insert(0, {root!r}); import machinery.checkpoint as c\n"
            "n, real = [0], os.replace\n"
            "def once(*a):\n    n[0] += 1\n    if n[0] == 2: os.kill(os.getpid(), signal.SIGKILL)\n"
            "    return real(*a)\n"
            "c.os.replace = once\nimport runpy; sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')")
    r = subprocess.run([sys.executable, "-c", hook.format(root=ROOT), os.path.join(ROOT, "orpo.py"),
                        *args, "--lam=0.5", "--fresh=true"], capture_output=True, text=True, timeout=300)
    assert r.returncode == -signal.SIGKILL, r.stderr
    assert not (tmp_path / "previous").exists()  # the move was cut short: nothing new written
    assert cli("orpo.py", *args, "--lam=0.5", "--fresh=true").returncode == 0
    assert {f: (tmp_path / "previous" / f).read_bytes() for f in first} == first


def test_two_runs_on_one_out_dir_the_second_is_refused_naming_the_first(tmp_path, data_dir):
    first = subprocess.Popen([sys.executable, os.path.join(ROOT, "orpo.py"), "--config=tiny",
                              f"--data_dir={data_dir}", f"--out_dir={tmp_path}", "--max_iters=100000",
                              "--n_samples=2"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(600):  # until the first one holds the folder
            if (tmp_path / ".lock").exists() and (tmp_path / ".lock").read_text():
                break
            time.sleep(0.1)
        r = cli("orpo.py", "--config=tiny", f"--data_dir={data_dir}", f"--out_dir={tmp_path}")
        assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
        assert f"{tmp_path} is in use by pid {first.pid}" in r.stderr
    finally:
        first.kill()
        first.wait()
    r = cli("orpo.py", "--config=tiny", f"--data_dir={data_dir}", f"--out_dir={tmp_path}",
            "--max_iters=2", "--n_samples=2")
    assert f"took over the lock of pid {first.pid}" in r.stderr  # the lock of a killed run


def test_lam_zero_is_plain_sft(tmp_path, data_dir):
    recs = losses(run(tmp_path, data_dir, lam=0.0, max_iters=5))
    assert all(loss == sft for _, loss, sft, _ in recs)


BAD = [  # each: the arguments, and what the one line must say
    (["--nope=1"], "unknown config key 'nope'"),
    (["--lr=fast"], "--lr expects float, got 'fast'"),
    (["--compile=maybe"], "--compile expects true or false"),
    (["--config", "huge"], "unknown config 'huge'"),
    (["stray"], "expected --key=value"),
    (["--batch_size=0"], "--batch_size must be a number >= 1, got 0"),
    (["--eval_interval=0"], "--eval_interval must be a number >= 1"),
    (["--log_interval=0"], "--log_interval must be a number >= 1"),
    (["--grad_accum=0"], "--grad_accum must be a number >= 1"),
    (["--n_head=3", "--n_embd=32"], "--n_embd=32 must be a multiple of --n_head=3"),
    (["--top_k=-1"], "--top_k must be a number >= 0"),
    (["--eval_pairs=0"], "--eval_pairs must be a number >= 1"),
    (["--vocab_size=10"], "--vocab_size=10 is below the synthetic tokenizer's 546"),
    (["--lr=-1"], "--lr must be a number > 0"),
    (["--dropout=1.5"], "--dropout must be a number in [0, 1)"),
    (["--device=bogus"], "--device must be auto, cpu, cuda, cuda:N or mps, got 'bogus'"),
    (["--max_iters=-1"], "--max_iters must be a number >= 0"),
    (["--n_layer=0"], "--n_layer must be a number >= 1"),
    (["--lam=-1"], "--lam must be a number >= 0"),
    (["--init_from=bogus"], "--init_from='bogus': no such file or directory"),
    (["--loss=log"], "--loss must be one of orpo, prob, sum, simpo, dpo, got 'log'"),
    (["--hand_grad=true", "--loss=prob"], "--hand_grad derives ORPO's own gradient"),
    (["--data_dir=no/such/dir"], "no prepared data in no/such/dir"),
    (["--loss=dpo"], "--loss=dpo needs --ref=PATH"),
    (["--loss=dpo", "--ref=nope.pt"], "--ref='nope.pt': no such checkpoint file"),
    (["--beta=0"], "--beta must be a number > 0"),
]
if not torch.cuda.is_available():
    BAD.append((["--device=cuda"], "--device=cuda, but torch sees no CUDA GPU"))


@pytest.mark.parametrize("args, msg", BAD)
def test_bad_input_is_one_line_and_exit_2_before_any_work(tmp_path, args, msg):
    r = cli("orpo.py", "--config", "tiny", *args, cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr
    assert msg in r.stderr
    assert os.listdir(tmp_path) == []  # no data prepared, no out_dir made


def test_compile_without_a_cpp_compiler_is_one_line_before_any_work(tmp_path):
    env = dict(os.environ, CXX=os.path.join(str(tmp_path), "no-such-g++"))  # inductor reads CXX
    r = cli("orpo.py", "--config", "tiny", "--device=cpu", "--compile=true", cwd=tmp_path, env=env)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr
    assert "--compile=true needs a C++ compiler on the CPU" in r.stderr
    assert os.listdir(tmp_path) == []


def test_grad_accum_that_the_processes_cannot_share_is_refused_before_any_work(tmp_path):
    env = dict(os.environ, WORLD_SIZE="2")  # as torchrun --nproc_per_node=2 sets it
    r = cli("orpo.py", "--config", "tiny", "--grad_accum=3", cwd=tmp_path, env=env)
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert "--grad_accum=3 must be a multiple of the 2 processes" in r.stderr
    assert os.listdir(tmp_path) == []


def test_help_lists_keys_defaults_and_presets():
    for flag in ("--help", "-h"):
        r = cli("orpo.py", flag)
        assert r.returncode == 0, r.stderr
        assert "presets: tiny, small, gpt2-125m" in r.stdout and "--lam=1.0" in r.stdout


@pytest.mark.parametrize("script", [["orpo.py"], ["sample.py"], ["prepare_data.py"],
                                    ["-m", "experiments.figures"], ["-m", "experiments.bench"],
                                    ["-m", "experiments.plot"], ["-m", "course.assignment"]])
def test_help_into_a_pipe_that_closed_is_no_traceback(script):
    """`--help | head -1`: the reader may leave before the help is written."""
    read, write = os.pipe()
    os.close(read)  # every write to the pipe now fails, as it does once head has left
    try:
        r = subprocess.run([sys.executable, *script, "--help"], cwd=ROOT, stdout=write,
                           stderr=subprocess.PIPE, text=True, timeout=120)
    finally:
        os.close(write)
    assert r.returncode in (0, 141) and r.stderr == "", r.stderr  # 141: 128 + SIGPIPE


def test_overrides_parse_both_spellings():
    argv = ["--config", "tiny", "--lr=0.5", "--max_iters", "7", "--sft_on_prompt=true"]
    preset, cfg, _ = configurator.parse_args(argv, orpo.Config, orpo.PRESETS)
    assert (preset, cfg.lr, cfg.max_iters, cfg.sft_on_prompt, cfg.n_layer) == ("tiny", 0.5, 7, True, 2)


def test_stale_data_is_never_reused(tmp_path, data_dir):
    """data_dir holds synthetic data: asking for another dataset or file there is an error
    that says how to prepare again."""
    r = cli("orpo.py", "--config", "tiny", f"--data_dir={data_dir}", "--dataset=hh-rlhf",
            f"--out_dir={tmp_path / 'o'}")
    assert r.returncode == 2 and f"{data_dir} holds the data named synthetic, not hh-rlhf " \
        "(--dataset=synthetic reads it); prepare it again" in r.stderr
    f = tmp_path / "pairs.jsonl"
    f.write_text(json.dumps({"prompt": "a", "chosen": " b", "rejected": " c"}) + "\n")
    r = cli("orpo.py", "--config", "tiny", f"--data_dir={data_dir}", f"--data_file={f}",
            f"--out_dir={tmp_path / 'o'}")
    assert r.returncode == 2 and "prepare it again into a new --data_dir" in r.stderr
    r = cli("orpo.py", "--config", "tiny", f"--data_dir={data_dir}", "--block_size=8",
            f"--out_dir={tmp_path / 'o'}")
    assert r.returncode == 2 and "more than 9; prepare it again" in r.stderr and "--max_len 9" in r.stderr
    assert not (tmp_path / "o").exists()


def test_mismatched_and_corrupt_checkpoints_are_clear_errors(tmp_path, data_dir):
    run(tmp_path, data_dir, max_iters=2, eval_interval=2)
    base = ["--config", "tiny", f"--out_dir={tmp_path}", f"--data_dir={data_dir}", "--init_from=resume",
            "--max_iters=2"]
    r = cli("orpo.py", *base, "--n_embd=64")
    assert r.returncode == 2 and "has n_embd=32, but the run asks for n_embd=64" in r.stderr
    ck = torch.load(tmp_path / "ckpt.pt", weights_only=False)
    del ck["model"]["h.1.ln_2.weight"]
    torch.save(ck, tmp_path / "ckpt.pt")
    r = cli("orpo.py", *base)
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert "the weights do not fit the model" in r.stderr and "h.1.ln_2.weight" in r.stderr
    (tmp_path / "ckpt.pt").write_bytes(b"not a checkpoint")
    r = cli("orpo.py", *base)
    assert r.returncode == 2 and "is not a readable checkpoint" in r.stderr


def test_nan_loss_stops_naming_iteration_and_term(tmp_path, data_dir, capsys):
    with pytest.raises(SystemExit) as e:
        run(tmp_path, data_dir, lam=float("nan"), max_iters=3)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "iteration 1: non-finite loss=nan" in err and "no checkpoint was written yet" in err
    assert not (tmp_path / "ckpt.pt").exists()  # nothing saved over a good checkpoint


def test_full_disk_is_one_line_and_keeps_the_last_checkpoint(tmp_path, monkeypatch, capsys):
    path = str(tmp_path / "ckpt.pt")
    checkpoint.save_checkpoint(path, x=1)

    def full(obj, f):  # torch.save on a full disk: part of a file, then an error
        open(f, "wb").write(b"partial")
        raise RuntimeError("[enforce fail at inline_container.cc:626] . unexpected pos 64 vs 0: "
                           "basic_ios::clear: iostream error")
    monkeypatch.setattr(torch, "save", full)
    disk = shutil.disk_usage(tmp_path)  # and the disk, as full as torch.save found it
    monkeypatch.setattr(shutil, "disk_usage", lambda p: disk._replace(used=disk.total, free=0))
    with pytest.raises(SystemExit) as e:
        checkpoint.save_checkpoint(path, x=2)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err == f"error: could not write {path}: the disk is full; the old file is unchanged\n"
    assert os.listdir(tmp_path) == ["ckpt.pt"]  # the partial .tmp is gone
    monkeypatch.undo()
    assert torch.load(path)["x"] == 1


def test_ctrl_c_stops_with_one_line(tmp_path, data_dir):
    p = subprocess.Popen([sys.executable, os.path.join(ROOT, "orpo.py"), "--config", "tiny",
                          f"--data_dir={data_dir}", f"--out_dir={tmp_path}", "--max_iters=100000",
                          "--eval_interval=5", "--n_samples=2"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         # a shell's background job ignores SIGINT, and a child inherits that;
                         # a user's terminal delivers it: restore the default before exec
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    for _ in range(600):  # wait for the first checkpoint
        if (tmp_path / "ckpt.pt").exists():
            break
        time.sleep(0.1)
    time.sleep(0.5)
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 130, err
    assert "Traceback" not in err and err.count("\n") == 1, err
    assert err.startswith("error: interrupted; ") and "ckpt.pt holds iteration" in err
    assert err.endswith(": go on with --init_from=resume\n"), err



def test_ctrl_c_while_sampling_before_training_is_one_line_and_leaves_no_temporary_file(tmp_path, data_dir):
    p = subprocess.Popen([sys.executable, os.path.join(ROOT, "orpo.py"), "--config", "tiny",
                          f"--data_dir={data_dir}", f"--out_dir={tmp_path}", "--n_samples=100000",
                          "--max_new_tokens=64"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    for line in p.stdout:  # the eval at iteration 0 is printed; the sampling has begun
        if line.startswith("eval     0"):
            break
    time.sleep(0.5)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 130 and err == "error: interrupted; no checkpoint was written yet\n", err
    assert sorted(os.listdir(tmp_path)) == [".lock", "log.jsonl"]  # nothing half-written
    assert (tmp_path / ".lock").read_text() == ""  # released
    run(tmp_path, data_dir, max_iters=2, n_samples=2)  # a run that saved nothing is no obstacle

def test_dpo_trains_the_policy_and_never_touches_the_reference(tmp_path, data_dir, monkeypatch):
    run(tmp_path / "sft", data_dir, lam=0.0, max_iters=10, eval_interval=10)
    sft = str(tmp_path / "sft" / "ckpt.pt")
    before = torch.load(sft, weights_only=False)["model"]
    refs = []
    load = orpo.checkpoint.load_reference
    monkeypatch.setattr(orpo.checkpoint, "load_reference", lambda *a: refs.append(load(*a)) or refs[-1])
    recs = run(tmp_path / "dpo", data_dir, loss="dpo", ref=sft, init_from=sft, lr=1e-4,
               max_iters=10, eval_interval=10)
    after = refs[0].state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # bit-identical reference
    assert all(p.grad is None and not p.requires_grad for p in refs[0].parameters())
    policy = torch.load(tmp_path / "dpo" / "ckpt.pt", weights_only=False)["model"]
    assert not torch.equal(policy["h.0.attn.c_attn.weight"], before["h.0.attn.c_attn.weight"])
    first = losses(recs)[0][1]
    assert abs(first - math.log(2)) < 1e-6  # step 1: policy = reference, so L = log 2
    summary = json.load(open(tmp_path / "dpo" / "summary.json"))
    assert summary["loss"] == "dpo" and summary["iters"] == 10 and summary["peak_mem_mb"] > 0


def test_dpo_reference_errors(tmp_path, data_dir):
    run(tmp_path / "sft", data_dir, lam=0.0, max_iters=2, eval_interval=2)
    sft = str(tmp_path / "sft" / "ckpt.pt")
    base = ["--config", "tiny", f"--data_dir={data_dir}", f"--out_dir={tmp_path / 'dpo'}",
            "--loss=dpo"]
    r = cli("orpo.py", *base, f"--ref={sft}", "--n_embd=64")
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert "has n_embd=32, but the policy has n_embd=64" in r.stderr
    ck = torch.load(sft, weights_only=False)
    ck["meta"]["vocab_size"] = 600
    torch.save(ck, tmp_path / "other.pt")
    r = cli("orpo.py", *base, f"--ref={tmp_path / 'other.pt'}")
    assert r.returncode == 2 and "but its tokenizer has 600 ids (meta['vocab_size'])" in r.stderr
    r = cli("orpo.py", *base, f"--ref={tmp_path / 'none.pt'}")
    assert r.returncode == 2 and "no such checkpoint file" in r.stderr
    assert not (tmp_path / "dpo").exists()


def test_flaw_rates_and_their_errors_match_the_judge_on_handmade_answers():
    p = "user: 2 more like cat and dog\nassistant:"
    answers = [" sure : owl hen .", " ugh : owl hen .", " sure : owl red .", " sure : owl .",
               " sure owl hen", " fine : red blue pink ."]
    s = [dict(score=synthetic.judge(p, a), win=0.0, flaws=synthetic.flaws(p, a),
              chosen_flaws=synthetic.flaws(p, " sure : owl hen .")) for a in answers]
    j = synthetic.judged(s, s)
    rates = {f: m for f, (m, _) in j["flaw_rates"]["after"].items()}
    assert rates == dict(off_topic=2 / 6, rude=2 / 6, wrong_count=2 / 6, malformed=1 / 6)
    m, se = j["flaw_rates"]["after"]["malformed"]
    assert abs(se - math.sqrt(m * (1 - m) / 6)) < 1e-12  # the binomial standard error
    assert j["flaw_rates"]["chosen"]["off_topic"] == (0.0, 0.0)
    assert [synthetic.judge(p, a) == 1.0 for a in answers] == [not any(x["flaws"].values()) for x in s]


def test_the_tests_keep_hugging_face_caches_under_tmp_path(tmp_path_factory):
    """datasets' loaders (tests/test_data.py) and the hub cache write under pytest's base
    temp folder, never to ~/.cache/huggingface."""
    base = str(tmp_path_factory.getbasetemp())
    assert os.environ["HF_HOME"].startswith(base)
    assert os.environ["HF_DATASETS_CACHE"].startswith(base)


def test_summary_counts_the_pairs_it_evaluated(tmp_path, data_dir, capsys):
    run(tmp_path, data_dir, max_iters=2, eval_interval=2, eval_pairs=10**6, n_samples=2)
    n_val = len(np.load(os.path.join(data_dir, "val.index.npy")))
    assert f"held-out pairs ({n_val}):" in capsys.readouterr().out


@pytest.mark.parametrize("lam, rejected, note", [
    (1.0, -7.0, "ORPO pushed it down"),                    # ORPO, and the rejected fell
    (0.0, -5.0, "with the chosen, as in the paper's Fig. 3"),  # SFT, and the rejected rose
])
def test_a_note_is_printed_only_where_the_numbers_bear_it_out(capsys, lam, rejected, note):
    start = dict(iter=0, ell_w=-6.0, ell_l=-6.0, log_or=0.0, acc=0.5, l_sft=6.0, l_or=0.7)
    cfg = orpo.Config(lam=lam)
    for end_l, printed in ((rejected, True), (-12.0 - rejected, False)):  # as said, then against
        end = dict(start, iter=10, ell_w=-2.0, ell_l=end_l)
        report.summarize(cfg, "tiny", orpo.LOSSES["orpo"], [start, end], None, None, 1.0, 2.0, 10)
        out = capsys.readouterr().out
        assert (note in out) == printed, out
        assert ("rose" if end_l > -6.0 else "fell") in out.splitlines()[3]
    end = dict(start, iter=10, ell_w=-9.0, ell_l=-9.0)  # everything fell: no claim of a rise
    report.summarize(orpo.Config(loss="simpo"), "tiny", orpo.LOSSES["simpo"], [start, end], None, None, 1.0, 2.0, 10)
    out = capsys.readouterr().out
    assert "SimPO" in out and "ORPO" not in out and "rose" not in out and "Fig. 3" not in out
