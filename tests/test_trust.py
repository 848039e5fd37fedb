"""Nothing lost, nothing mixed: prepared data and exports are whole or absent after a kill,
a full disk or Ctrl-C; one process writes a folder at a time; data made from anything else
than what a run asks is noticed. Kills happen in a subprocess, at a chosen write."""
import errno
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import orpo
import prepare_data
from machinery import readers, report, safe, synthetic
from conftest import ROOT, run

SMALL = dict(n_train=200, n_val=20)


def driver(code, *args, timeout=120, wait=True):
    """Python code in a subprocess that imports the project, e.g. to patch a function so that
    the process kills itself at a chosen point."""
    # Ctrl-C as a terminal delivers it: a background job's children start with SIGINT ignored
    argv = [sys.executable, "-c", "import signal, sys; signal.signal(signal.SIGINT, "
            f"signal.default_int_handler); sys.path.insert(0, {ROOT!r})\n{code}", *args]
    if not wait:
        return subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
    return subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


# At the n-th call of module.fn, before it acts, the process sends itself a signal.
HOOK = """
import os, signal, {module}
n, real = [0], {module}.{fn}
def hooked(*a, **k):
    n[0] += 1
    if n[0] == {at}:
        os.kill(os.getpid(), signal.{sig})
    return real(*a, **k)
{module}.{fn} = hooked
"""
PREPARE = "import prepare_data; prepare_data.prepare('synthetic', sys.argv[1], seed=2, " \
          "n_train=200, n_val=20)"
CLI = "import runpy; sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')"


def snapshot(d):
    """The data in d as load() gives it, as plain values, or the error it raises."""
    try:
        meta, splits = prepare_data.load(d, "synthetic")
    except ValueError as e:
        return str(e)
    return meta["splits"], {s: (t.tolist(), i.tolist()) for s, (t, i) in splits.items()}


def old_data(tmp_path):
    d = str(tmp_path / "d")
    prepare_data.prepare("synthetic", d, seed=1, **SMALL)
    return d, snapshot(d)


@pytest.mark.parametrize("module, fn, at", [("numpy", "save", 2), ("numpy", "save", 4),
                                            ("machinery.safe", "exchange", 1),
                                            ("shutil", "rmtree", 2)])
def test_a_preparation_killed_mid_write_leaves_the_old_data_or_the_new(tmp_path, module, fn, at):
    """Killed before the new version is whole, at the swap, or after it: the folder holds the
    earlier data, whole, or the new data, whole; never none, never a mix."""
    d, before = old_data(tmp_path)
    new = str(tmp_path / "new")
    prepare_data.prepare("synthetic", new, seed=2, **SMALL)
    r = driver(HOOK.format(module=module, fn=fn, at=at, sig="SIGKILL") + PREPARE, d)
    assert r.returncode == -signal.SIGKILL, r.stderr
    after = snapshot(d)
    assert after == (snapshot(new) if fn == "rmtree" else before), after
    prepare_data.prepare("synthetic", d, seed=1, **SMALL)  # the next preparation cleans up
    assert snapshot(d) == before and sorted(os.listdir(d)) == sorted(
        [".lock", "meta.json"] + prepare_data.FILES) and not os.path.exists(d + ".new")


def test_preparing_again_under_a_reader_leaves_its_mapped_files_whole(tmp_path):
    """A trainer maps the token files; preparing the folder again (here: fewer rows, so
    shorter files) must not truncate them under it, which kills it with SIGBUS."""
    d, before = old_data(tmp_path)
    r = driver("import prepare_data\n"
               "meta, splits = prepare_data.load(sys.argv[1], 'synthetic')\n"
               "prepare_data.prepare('synthetic', sys.argv[1], seed=2, n_train=20, n_val=5)\n"
               "print(sum(int(t.sum()) + int(i.sum()) for t, i in splits.values()))", d)
    assert r.returncode == 0, (r.returncode, r.stderr)
    want = sum(sum(t) + sum(map(sum, i)) for t, i in before[1].values())  # the old data's
    assert int(r.stdout.split()[-1]) == want


def test_a_full_disk_while_preparing_is_one_line_and_keeps_the_old_data(tmp_path, monkeypatch):
    d, before = old_data(tmp_path)
    real, calls = np.save, []

    def full(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(*a, **k)
    monkeypatch.setattr(np, "save", full)
    want = re.escape(f"cannot write in {d} (") + r".*No space left on device\)" + re.escape(
        f"; {d} holds the data prepared before, unchanged")
    with pytest.raises(ValueError, match=want):
        prepare_data.prepare("synthetic", d, seed=2, **SMALL)
    assert snapshot(d) == before and ".tmp" not in os.listdir(d)


def test_ctrl_c_while_preparing_is_one_line_exit_130_and_no_temporary_file(tmp_path):
    d, before = old_data(tmp_path)
    r = driver(HOOK.format(module="numpy", fn="save", at=2, sig="SIGINT") + CLI,
               os.path.join(ROOT, "prepare_data.py"), "--out", d, "--n_train", "200")
    assert r.returncode == 130 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip() == f"prepare_data: interrupted; {d} holds the data prepared " \
                               f"before, unchanged"
    assert snapshot(d) == before and ".tmp" not in os.listdir(d)


def test_two_preparers_on_one_folder_the_second_is_refused_a_stale_lock_taken_over(tmp_path):
    d, _ = old_data(tmp_path)
    started = tmp_path / "started"
    hold = f"""
import numpy, pathlib, time
def slow(*a, **k):
    pathlib.Path({str(started)!r}).touch()
    time.sleep(120)
numpy.save = slow
""" + PREPARE
    first = driver(hold, d, wait=False)
    try:
        for _ in range(600):
            if started.exists() or first.poll() is not None:
                break
            time.sleep(0.1)
        assert started.exists(), first.communicate()
        r = subprocess.run([sys.executable, "prepare_data.py", "--out", d], cwd=ROOT,
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
        assert r.stderr.startswith(f"prepare_data: {d} is in use by pid {first.pid} (")
    finally:
        first.kill()
        first.communicate()
    prepare_data.prepare("synthetic", d, seed=1, **SMALL)  # its holder is gone: taken over
    with open(os.path.join(d, ".lock")) as f:
        assert f.read() == ""  # released, so the next one has nothing to report


def test_a_stale_lock_is_taken_over_and_said(tmp_path, capsys):
    d = tmp_path / "d"
    r = driver("import os; from machinery import safe; safe.lock(sys.argv[1]); os._exit(9)", str(d))  # dies holding
    assert r.returncode == 9
    with safe.lock(str(d)):
        err = capsys.readouterr().err
        assert f"{d}: took over the lock of pid " in err and "which is gone" in err
        with open(d / ".lock") as f:
            assert f.read().startswith(f"pid {os.getpid()} (")


@pytest.mark.parametrize("make, words", [
    (lambda p: p.write_text("x"), "is a file"),
    (lambda p: (p.mkdir(), p.chmod(0o500)), "cannot write in"),
])
def test_a_folder_that_cannot_be_locked_is_one_line(tmp_path, make, words):
    p = tmp_path / "x"
    make(p)
    if words == "cannot write in" and os.access(p, os.W_OK):
        pytest.skip("running as root: a read-only folder is writable")
    with pytest.raises(ValueError, match=words):
        safe.lock(str(p))
    r = subprocess.run([sys.executable, "prepare_data.py", "--out", str(p), "--n_train", "50"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and words in r.stderr, r.stderr


def test_atomic_write_leaves_the_old_file_when_interrupted(tmp_path):
    path = str(tmp_path / "f")
    with safe.atomic_write(path) as tmp:
        open(tmp, "w").write("old")
    with pytest.raises(KeyboardInterrupt):
        with safe.atomic_write(path) as tmp:
            open(tmp, "w").write("new, but cut")
            raise KeyboardInterrupt
    assert open(path).read() == "old" and os.listdir(tmp_path) == ["f"]


# --- data made from something else than the run asks for ---

@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setattr(prepare_data, "get_encoding", lambda tok: prepare_data.synthetic_encoding())


def pairs_file(path, words):
    with open(path, "w") as f:
        for w in words:
            f.write(json.dumps({"prompt": f"user: 2 more like {w} and cat\nassistant:",
                                "chosen": f" sure : {w} .", "rejected": f" ugh : {w} ."}) + "\n")
    return str(path)


def test_a_data_file_edited_in_place_is_noticed(tmp_path, capsys, offline):
    f = pairs_file(tmp_path / "f.jsonl", ["dog", "owl", "hen", "fox", "elk"])
    d = str(tmp_path / "data")
    meta, _ = prepare_data.ensure(d, "mine", f, 64, 32)
    assert meta["file_id"]["sha256"] and meta["file_id"]["size"] == os.path.getsize(f)
    capsys.readouterr()
    meta, _ = prepare_data.ensure(d, "mine", f, 64, 32)
    assert capsys.readouterr().out == ""  # prepared once, not twice
    time.sleep(0.01)
    pairs_file(f, ["dog", "owl", "hen", "fox", "ant"])  # the same size, one word changed
    with pytest.raises(ValueError, match=re.escape(f"{d} was prepared from {f} as it was before "
                                                   f"it changed; prepare it again into a new")):
        prepare_data.ensure(d, "mine", f, 64, 32, explicit=True)
    meta2, splits = prepare_data.ensure(d, "mine", f, 64, 32)
    assert f"{d} was prepared from {f} as it was before it changed: preparing" in \
        capsys.readouterr().out
    assert meta2["file_id"]["sha256"] != meta["file_id"]["sha256"]
    enc = prepare_data.synthetic_encoding()
    tokens, index = splits["train"]
    assert " ant " in enc.decode(tokens.tolist())


def test_a_data_file_without_a_dataset_name_is_named_for_itself_not_the_synthetic_task(
        tmp_path, monkeypatch, offline):
    f = pairs_file(tmp_path / "pairs.jsonl", ["dog", "owl", "hen", "fox", "elk"] * 4)
    monkeypatch.chdir(tmp_path)  # data/<name> is relative to where the run starts
    cfg = orpo.Config(**orpo.PRESETS["tiny"], data_file=f)
    meta, _, _ = prepare_data.for_run(cfg)
    assert meta["source"] == "pairs"  # not "synthetic": the synthetic judge never scores it
    assert sorted(os.listdir(tmp_path / "data")) == ["pairs"]  # data/synthetic left alone
    assert [prepare_data.named("synthetic", f) for f in
            ("synthetic.jsonl", "hh-rlhf.jsonl.gz", "a.b.jsonl.gz", ".hidden.json", "d/x.parquet")] \
        == ["synthetic-file", "hh-rlhf-file", "a.b", "hidden", "x"]  # never a task's or hub's name
    assert prepare_data.named("mine", f) == "mine" and prepare_data.named("synthetic", "") == "synthetic"
    # a folder the user names: the same file under another name is the same data; without
    # the file, the name asked for must be the folder's, and the error says which it is
    d = str(tmp_path / "data" / "pairs")
    assert prepare_data.ensure(d, "other", f, 65, 32, explicit=True)[0]["source"] == "pairs"
    with pytest.raises(ValueError, match=re.escape(f"{d} holds the data named pairs (from {f}), "
                                                   "not synthetic (--dataset=pairs reads it)")):
        prepare_data.ensure(d, "synthetic", None, 65, 32, explicit=True)


def test_data_for_other_limits_is_prepared_again_in_the_default_folder(tmp_path, capsys,
                                                                     monkeypatch):
    monkeypatch.setattr(prepare_data, "N_TRAIN", 300)  # what the run asks for, made small
    d = str(tmp_path / "synthetic")
    prepare_data.ensure(d, "synthetic", None, 17, 8)
    meta, splits = prepare_data.ensure(d, "synthetic", None, 65, 32)
    assert f"{d} was prepared with max_len 17, not 65: preparing" in capsys.readouterr().out
    assert (meta["max_len"], meta["max_prompt_len"], meta["n_train"]) == (65, 32, 300)
    tokens, index = splits["val"]
    off, p, c, r = index[0]  # no longer cut: the response ends with end-of-text
    assert tokens[off + p + c - 1] == meta["eot"] and meta["splits"]["val"]["truncated"] == 0
    # a folder the user named keeps its limits; longer pairs than the run reads are refused
    with pytest.raises(ValueError, match="holds a pair of .* tokens, more than 17"):
        prepare_data.ensure(d, "synthetic", None, 17, 8, explicit=True)
    with pytest.raises(ValueError, match="no prepared data in .*nope"):
        prepare_data.ensure(str(tmp_path / "nope"), "synthetic", None, 65, 32, explicit=True)


def test_a_data_file_changed_by_hand_is_refused(tmp_path):
    d, _ = old_data(tmp_path)
    np.save(os.path.join(d, "val.index.npy"), np.zeros((3, 4), dtype=np.int64))
    with pytest.raises(ValueError, match="val.index.npy differ from what meta.json says"):
        prepare_data.load(d, "synthetic")


# --- messages instead of tracebacks ---

def test_prepare_out_an_existing_file_is_one_line(tmp_path):
    (tmp_path / "f").write_text("mine")
    r = subprocess.run([sys.executable, "prepare_data.py", "--out", str(tmp_path / "f"),
                        "--n_train", "50"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr == f"prepare_data: {tmp_path / 'f'} is a file, not a " \
                                             f"folder\n", r.stderr
    assert (tmp_path / "f").read_text() == "mine"


def test_gpt2_tokenizer_neither_cached_nor_downloadable_is_one_line(tmp_path, monkeypatch):
    import requests
    import tiktoken

    def offline(name):
        raise requests.exceptions.ConnectionError("Failed to resolve 'openaipublic.blob.core'")
    monkeypatch.setattr(tiktoken, "get_encoding", offline)
    f = pairs_file(tmp_path / "f.jsonl", ["dog", "owl"])
    with pytest.raises(ValueError, match="cannot load the gpt2 tokenizer .*TIKTOKEN_CACHE_DIR"):
        prepare_data.prepare("mine", str(tmp_path / "o"), file=f)
    assert not (tmp_path / "o").exists()


def test_a_cut_prompt_is_not_judged_and_decode_stops_at_end_of_text():
    with pytest.raises(ValueError, match="not a whole prompt of the synthetic task"):
        synthetic.judge(" dog\nassistant:", " sure : fox owl .")
    with pytest.raises(ValueError, match="not a whole prompt of the synthetic task"):
        synthetic.judge("user: 3 more like zebra and dog\nassistant:", " sure : fox .")
    enc = prepare_data.synthetic_encoding()
    ids = enc.encode_ordinary(" sure : cat .")
    assert report.decode(enc, ids + [enc.eot_token] + ids, enc.eot_token) == " sure : cat ."
    assert report.decode(enc, ids, enc.eot_token) == " sure : cat ."


# --- exports ---

def export(out_dir, dest, hook=""):
    return driver(hook + CLI, os.path.join(ROOT, "sample.py"), f"--out_dir={out_dir}",
                  f"--export={dest}")


def files(d):
    return {n: open(os.path.join(d, n), "rb").read() for n in os.listdir(d) if n[0] != "."}


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """Two trained checkpoints with different weights, o1 and o2, exported to a and b."""
    base = tmp_path_factory.mktemp("runs")
    d = str(base / "data")
    prepare_data.prepare("synthetic", d, n_train=400, n_val=40)
    for seed in (1, 2):
        run(base / f"o{seed}", d, max_iters=1, eval_interval=1, eval_pairs=8, n_samples=1,
            max_new_tokens=4, seed=seed)
    for src, dest in (("o1", "a"), ("o2", "b")):
        assert export(base / src, base / dest).returncode == 0
    return base


def test_an_export_never_overwrites_files_it_did_not_write(tmp_path, two_runs):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.json").write_text('{"mine": 1}')
    r = export(two_runs / "o1", mine)
    assert r.returncode == 2 and r.stderr == f"error: --export={mine} holds files that no " \
                                             f"export wrote (config.json); give a new or " \
                                             f"empty folder\n", r.stderr
    assert os.listdir(mine) == ["config.json"]  # no lock file, no temporary folder left
    assert (mine / "config.json").read_text() == '{"mine": 1}'


# the optional extra (requirements-extra.txt) adds model.safetensors to an export: the hooks
# that need its writer, or its file's rename, are skipped without it
needs_st = pytest.mark.skipif(importlib.util.find_spec("safetensors") is None,
                              reason="safetensors (the optional extra) is not installed")


@pytest.mark.parametrize("hook", [
    pytest.param(HOOK.format(module="safetensors.torch", fn="save_file", at=1, sig="SIGKILL"),
                 marks=needs_st),
    HOOK.format(module="machinery.safe", fn="exchange", at=1, sig="SIGKILL"),
    HOOK.format(module="shutil", fn="rmtree", at=2, sig="SIGKILL"),
])
def test_an_export_killed_mid_write_leaves_the_old_export_or_the_new(tmp_path, two_runs, hook):
    a = tmp_path / "a"
    shutil.copytree(two_runs / "a", a)
    old, new = files(a), files(two_runs / "b")
    assert old != new
    r = export(two_runs / "o2", a, hook)
    assert r.returncode == -signal.SIGKILL, r.stderr
    now = files(a)
    assert now == old or now["orpo_export.json"] != old["orpo_export.json"] and all(
        now[n] == new[n] for n in now if n != "orpo_export.json"), sorted(now)  # whole, old or new
    assert export(two_runs / "o2", a).returncode == 0 and files(a).keys() == new.keys()
    assert not os.path.exists(f"{a}.new")  # a killed writer's folder goes


@pytest.mark.parametrize("name", ["../victim.txt", "ABS", "link"])
def test_a_manifest_that_names_a_file_out_of_the_export_is_refused(tmp_path, two_runs, name):
    """orpo_export.json edited to list a path out of the export, or a link out of it: the
    re-export refuses in one line and touches nothing, inside the folder or out of it."""
    a, victim = tmp_path / "a", tmp_path / "victim.txt"
    shutil.copytree(two_runs / "a", a)
    victim.write_text("mine")
    if name == "link":
        os.symlink(victim, a / "link")
    name = str(victim) if name == "ABS" else name
    mark = json.loads((a / "orpo_export.json").read_text())
    (a / "orpo_export.json").write_text(json.dumps(dict(mark, files=mark["files"] + [name])))
    old = files(a) if name != "link" else None
    r = export(two_runs / "o2", a)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr
    assert f"names {name!r}, not a file of the export; nothing was touched" in r.stderr
    assert victim.read_text() == "mine" and (old is None or files(a) == old)


@needs_st
def test_an_export_that_fails_keeps_the_old_one_in_one_line(tmp_path, two_runs):
    a = tmp_path / "a"
    shutil.copytree(two_runs / "a", a)
    old = files(a)
    full = """
import safetensors.torch
def full(*a, **k):
    raise safetensors.SafetensorError("Error while serializing: IoError(No space left on device)")
safetensors.torch.save_file = full
"""
    r = export(two_runs / "o2", a, full)
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert "No space left on device" in r.stderr and f"{a} holds the export from before" in r.stderr
    assert files(a) == old and ".tmp" not in os.listdir(a)


# ----------------------------------------------------------------------------------------
# One run per folder, resume that changes nothing silently, and what is not what it claims


def tiny(tmp_path, data_dir, *args):
    from conftest import cli
    return cli("orpo.py", "--config=tiny", f"--data_dir={data_dir}", f"--out_dir={tmp_path}",
               "--n_samples=2", "--eval_pairs=8", *args)


def one_line_2(r, *words):
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr
    for w in words:
        assert w in r.stderr, r.stderr


def test_a_second_run_over_a_finished_run_without_a_checkpoint_mixes_nothing(tmp_path, data_dir):
    assert tiny(tmp_path, data_dir, "--max_iters=0").returncode == 0
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.name != ".lock"}
    assert "summary.json" in before and "ckpt.pt" not in before
    second = subprocess.Popen([sys.executable, "orpo.py", "--config=tiny", f"--data_dir={data_dir}",
                               f"--out_dir={tmp_path}", "--max_iters=8", "--lam=0.5"], cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(3)
    second.kill()  # whether it has stopped by now or not
    _, err = second.communicate()
    assert f"{tmp_path} holds another run (its summary.json, log.jsonl): continue it" in err, err
    assert "or start over with --fresh=true" in err
    after = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.name != ".lock"}
    assert after == before  # the first run's files, whole, and none of the second's


def test_resume_refuses_what_would_change_the_run(tmp_path, data_dir):
    assert tiny(tmp_path, data_dir, "--max_iters=4", "--eval_interval=4").returncode == 0
    ck = (tmp_path / "ckpt.pt").read_bytes()
    resume = lambda *a: tiny(tmp_path, data_dir, "--init_from=resume", *a)
    one_line_2(resume("--max_iters=4", "--lam=0.25"), "has lam=1.0, but the run asks for lam=0.25")
    one_line_2(resume("--max_iters=2"), "holds iteration 4, past --max_iters=2")
    one_line_2(resume("--max_iters=8"), "cosine to 4", "cosine to 8", "--lr_decay_iters=4")
    one_line_2(resume("--max_iters=4", "--lr=0.01"), "lr=0.01")
    (tmp_path / "log.jsonl").rename(tmp_path / "away.jsonl")
    one_line_2(resume("--max_iters=4"), "log.jsonl is gone")
    (tmp_path / "away.jsonl").rename(tmp_path / "log.jsonl")
    assert (tmp_path / "ckpt.pt").read_bytes() == ck  # nothing written by a refused resume
    r = resume("--max_iters=8", "--lr_decay_iters=4")  # the same schedule, trained on past it
    assert r.returncode == 0 and "resumed from" in r.stdout, r.stderr


def test_non_finite_weights_are_named_before_any_work(tmp_path, data_dir):
    import torch
    from conftest import cli
    assert tiny(tmp_path, data_dir, "--max_iters=2", "--eval_interval=2").returncode == 0
    ck = torch.load(tmp_path / "ckpt.pt", weights_only=False)
    ck["model"]["h.0.mlp.c_fc.weight"][0, 0] = float("nan")
    torch.save(ck, tmp_path / "ckpt.pt")
    log = (tmp_path / "log.jsonl").read_bytes()
    one_line_2(tiny(tmp_path, data_dir, "--init_from=resume", "--max_iters=2"),
               "h.0.mlp.c_fc.weight holds NaN or inf")
    assert (tmp_path / "log.jsonl").read_bytes() == log
    one_line_2(cli("sample.py", f"--out_dir={tmp_path}", "--prompt=hi"), "are not finite")
    one_line_2(cli("sample.py", f"--out_dir={tmp_path}", f"--export={tmp_path / 'hf'}"), "are not finite")
    assert not (tmp_path / "hf").exists()
    ck["model"]["h.0.mlp.c_fc.weight"][0, 0] = 0.0  # finite again: the next fault is named
    ck["model_args"]["n_wings"] = 2
    torch.save(ck, tmp_path / "ckpt.pt")
    one_line_2(cli("sample.py", f"--out_dir={tmp_path}", "--prompt=hi"), "unknown key 'n_wings'")
    del ck["meta"]["vocab_size"]
    torch.save(ck, tmp_path / "ckpt.pt")
    one_line_2(cli("sample.py", f"--out_dir={tmp_path}", "--prompt=hi"), "vocab_size")


def test_corrupt_tokens_are_named_and_the_check_is_cheap(tmp_path, capsys):
    d = tmp_path / "d"
    prepare_data.prepare("synthetic", str(d), n_train=20_000, n_val=20)
    t0 = time.perf_counter()
    meta, splits = prepare_data.load(str(d), "synthetic")
    tokens = splits["train"][0]
    t1 = time.perf_counter()
    top = int(tokens.max())  # the range check's own work, on 20,000 rows
    t2 = time.perf_counter()
    with capsys.disabled():
        print(f"\n20,000 rows, {len(tokens):,} tokens: load {1e3 * (t1 - t0):.1f} ms, "
              f"the token-range check {1e3 * (t2 - t1):.2f} ms")
    assert top < meta["vocab_size"]
    arr = np.load(d / "train.tokens.npy")
    arr[len(arr) // 2] = meta["vocab_size"] + 7  # in place, at the same size
    st = os.stat(d / "train.tokens.npy")
    np.save(d / "train.tokens.npy", arr)
    with pytest.raises(ValueError, match="differ from what meta.json says"):
        prepare_data.load(str(d), "synthetic")  # its hash
    os.utime(d / "train.tokens.npy", ns=(st.st_atime_ns, st.st_mtime_ns))  # a forged mtime
    meta_path = d / "meta.json"  # and a forged hash: the ids are still checked
    m = json.loads(meta_path.read_text())
    m["files"]["train.tokens.npy"] = prepare_data.fingerprint(str(d / "train.tokens.npy"))
    meta_path.write_text(json.dumps(m))
    with pytest.raises(ValueError, match=r"train.tokens.npy is corrupt \(token id"):
        prepare_data.load(str(d), "synthetic")


@pytest.mark.parametrize("args,words", [
    (["--seed=18446744073709551616"], "--seed must be an integer in [0, 2**62)"),
    (["--vocab_size=100000000000"], "--vocab_size must be"),
    (["--n_embd=65536", "--n_head=1", "--n_layer=64"], "the model does not fit in memory"),
])
def test_out_of_range_values_are_one_line(tmp_path, data_dir, args, words):
    one_line_2(tiny(tmp_path / "o", data_dir, *args), words)


def test_bad_data_options_and_files_are_one_line(tmp_path):
    from conftest import cli
    prep = lambda *a: cli("prepare_data.py", "--out", str(tmp_path / "p"), *a)
    r = prep("--max_len", "64", "--max_prompt_len", "0")
    assert r.returncode == 2 and "max_prompt_len 0 must be at least 1" in r.stderr
    r = prep("--n_train", "-1")
    assert r.returncode == 2 and "n_train -1" in r.stderr and "Traceback" not in r.stderr
    os.mkfifo(tmp_path / "fifo.jsonl")
    os.symlink(tmp_path / "loop.jsonl", tmp_path / "loop.jsonl")
    for name, words in (("fifo.jsonl", "not a regular file"), ("loop.jsonl", "a link to nowhere")):
        r = prep("--file", str(tmp_path / name))
        assert r.returncode == 2 and words in r.stderr and r.stderr.count("\n") == 1, r.stderr
    good = json.dumps(dict(prompt="a", chosen="b", rejected="c"))
    rows = [good] * 30 + ["[" * 100_000 + "]" * 100_000, json.dumps(dict(prompt="", chosen="b", rejected="c"))]
    (tmp_path / "deep.jsonl").write_text("\n".join(rows) + "\n")
    got = readers.read_jsonl(str(tmp_path / "deep.jsonl"))  # line 31 nested, 32 no prompt
    assert len(got) == 32 and got[30] == prepare_data.BrokenLine("broken JSON (nested too deep)")
    assert prepare_data.check(got[31], "triple") == ("malformed", "the prompt is empty")


def test_a_full_disk_in_any_atomic_write_is_one_line(tmp_path, monkeypatch, capsys):
    path = tmp_path / "summary.json"
    path.write_text("old")

    def full(src, dst):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(os, "replace", full)
    with pytest.raises(SystemExit) as e:
        with safe.atomic_write(str(path)) as tmp, open(tmp, "w") as f:
            f.write("new")
    assert e.value.code == 2 and path.read_text() == "old" and not (tmp_path / "summary.json.tmp").exists()
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "the disk is full; the old file is unchanged" in err


def test_a_write_that_fails_with_room_left_is_one_line_with_its_reason(tmp_path, capsys):
    path = tmp_path / "ckpt.pt"
    with pytest.raises(SystemExit) as e:
        with safe.atomic_write(str(path)) as tmp:
            open(tmp, "w").write("part")
            raise RuntimeError("basic_ios::clear: iostream error")  # torch.save's, the disk not full
    assert e.value.code == 2 and os.listdir(tmp_path) == []
    assert capsys.readouterr().err == (f"error: could not write {path}: basic_ios::clear: iostream "
                                       f"error; nothing was written\n")


def test_assignment_make_on_a_full_disk_leaves_no_half_handout(tmp_path, monkeypatch, capsys):
    from course import assignment
    calls, copy = [], shutil.copy2

    def copy_until_full(src, dst):
        calls.append(src)
        if len(calls) > 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return copy(src, dst)
    monkeypatch.setattr(shutil, "copy2", copy_until_full)
    with pytest.raises(SystemExit) as e:
        assignment.make(str(tmp_path / "handout"))
    assert e.value.code == 2 and len(calls) == 4
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "No space left on device; nothing was left there" in err
    assert os.listdir(tmp_path) == []  # neither the handout nor its temporary folder
