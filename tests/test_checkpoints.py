"""Every checkpoint orpo.py ever wrote still works, and a damaged one is one line. sample.py,
--export, --init_from=PATH and resume on one small checkpoint of each format (tests/fixtures,
whose README says which commit wrote each and how), and on the current one with a field
missing, None or of another type."""
import json
import os
import shutil
import sys

import pytest
import torch

from conftest import ROOT, cli, read_log, run
import sample

FIXTURES = os.path.join(ROOT, "tests", "fixtures")
SHAPE = dict(n_layer=1, n_embd=16, n_head=2, eval_interval=2, n_samples=1, eval_pairs=8)  # the fixtures'
FLAGS = [f"--{k}={v}" for k, v in SHAPE.items()]
PROMPT = "user: 2 more like cat and zebra\\nassistant:"
# each fixture's greedy answer to PROMPT (8 new tokens), as the release that wrote it sampled it
# (the first with orpo.py --prompt, the others with their sample.py); the last three hold the
# same weights
ANSWERS = {"c0b7224": " egg egg egg nos nos nos nos nos", "11a4180": "\ufffd" * 5 + ")))",
           "67ec8a1": "\ufffd" * 5 + ")))", "233f2af": "\ufffd" * 5 + ")))"}
OLDER = ("c0b7224", "11a4180")  # one RNG state and no data id: only their own release resumes them


def fixture(label):
    return os.path.join(FIXTURES, f"ckpt-{label}.pt")


@pytest.mark.parametrize("label", ANSWERS)
def test_sample_and_export_read_every_release(tmp_path, label):
    shutil.copy(fixture(label), tmp_path / "ckpt.pt")
    r = cli("sample.py", f"--out_dir={tmp_path}", f"--prompt={PROMPT}", f"--export={tmp_path / 'hf'}",
            "--temperature=0", "--n_samples=1", "--max_new_tokens=8")
    assert r.returncode == 0, r.stderr
    # a word outside the task's vocabulary is said to be one, and read as pieces as before
    assert "note: not a word of the synthetic task: 'zebra' reads as 6 tokens\n" in r.stdout
    assert f"->{ANSWERS[label]!r}" in r.stdout, r.stdout
    with open(tmp_path / "hf" / "config.json") as f:
        assert json.load(f)["n_layer"] == 1


@pytest.mark.parametrize("label", ANSWERS)
def test_init_from_every_release(tmp_path, data_dir, label):
    r = cli("orpo.py", "--config", "tiny", *FLAGS, "--max_iters=2", f"--init_from={fixture(label)}",
            f"--data_dir={data_dir}", f"--out_dir={tmp_path}")
    assert r.returncode == 0, r.stderr
    start = next(x for x in read_log(tmp_path) if x["kind"] == "eval")
    if label != "c0b7224":  # evaluated on data_dir's pairs (the first prepared 20,000 of its own)
        had = torch.load(fixture(label), weights_only=False)["history"][-1]
        assert start["iter"] == 0 and start["l_sft"] == pytest.approx(had["l_sft"], rel=1e-5)


@pytest.mark.parametrize("label", ANSWERS)
def test_resume_every_release_or_say_which_resumes_it(tmp_path, data_dir, label):
    shutil.copy(fixture(label), tmp_path / "ckpt.pt")
    (tmp_path / "log.jsonl").write_text("")
    r = cli("orpo.py", "--config", "tiny", *FLAGS, "--max_iters=4", "--lr_decay_iters=2",
            "--init_from=resume", f"--data_dir={data_dir}", f"--out_dir={tmp_path}")
    if label in OLDER:
        assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
        assert "is an older release's (no data id, one RNG state), which alone resumes it; sample.py, " \
               "--export and --init_from=" in r.stderr
    else:
        assert r.returncode == 0 and "resumed from" in r.stdout, r.stderr
        assert [x["iter"] for x in read_log(tmp_path) if x["kind"] == "train"] == [3, 4]


GONE = object()  # a field taken out
# (where in the checkpoint, what it becomes, what the line says); (): the checkpoint itself
READ_BY_ALL = [
    (("meta", "tokenizer"), GONE, "meta['tokenizer'] is missing"),
    (("meta", "eot"), "545", "meta['eot'] is a str, not an int"),
    (("meta",), GONE, "meta is missing"),
    (("model_args", "vocab_size"), GONE, "model_args['vocab_size'] is missing"),
    # without n_vocab the model would sample the padding ids 546-575, which decode as nothing
    (("model_args", "n_vocab"), GONE, "model_args has n_vocab=None, vocab_size=576, but its "
                                      "tokenizer has 546 ids"),
    (("model",), list(range(3)), "model is a list, not a dict"),
    ((), [], "the checkpoint is a list, not a dict")]
READ_BY_RESUME = [
    (("config",), None, "config is None"),
    (("history", 0, "acc"), GONE, "history[0]['acc'] is missing"),
    (("history", 1), [], "history[1] is a list, not a dict"),
    (("rng",), None, "rng is None"),
    (("iter",), 2.0, "iter is a float, not an int"),
    (("optimizer",), GONE, "optimizer is missing")]
READERS = ("sample", "export", "init_from", "resume")


def damaged(d, where, value):
    """The current fixture as d/ckpt.pt, with the field `where` made `value`; and a log."""
    ck = x = torch.load(fixture("233f2af"), weights_only=False)
    for k in where[:-1]:
        x = x[k]
    if not where:
        ck = value
    elif value is GONE:
        del x[where[-1]]
    else:
        x[where[-1]] = value
    torch.save(ck, d / "ckpt.pt")
    (d / "log.jsonl").write_text("")


def read(who, d, data_dir, monkeypatch):
    """`who` reads d/ckpt.pt, in this process (what each does in its own is tested above)."""
    if who in ("sample", "export"):
        what = f"--prompt={PROMPT}" if who == "sample" else f"--export={d / 'hf'}"
        monkeypatch.setattr(sys, "argv", ["sample.py", f"--out_dir={d}", what, "--max_new_tokens=4",
                                          "--n_samples=1"])
        sample.main()
    elif who == "init_from":
        run(d / "new", data_dir, init_from=str(d / "ckpt.pt"), max_iters=2, **SHAPE)
    else:
        run(d, data_dir, init_from="resume", max_iters=2, **SHAPE)


@pytest.mark.parametrize("where, value, words, who", [
    pytest.param(*case, who, id=f"{who}: {case[2]}") for case in READ_BY_ALL for who in READERS] + [
    pytest.param(*case, "resume", id=f"resume: {case[2]}") for case in READ_BY_RESUME])
def test_a_damaged_checkpoint_is_one_line_naming_the_field(tmp_path, data_dir, monkeypatch, capsys,
                                                          where, value, words, who):
    damaged(tmp_path, where, value)
    with pytest.raises(SystemExit) as e:
        read(who, tmp_path, data_dir, monkeypatch)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1, err
    assert err.startswith(f"error: {tmp_path / 'ckpt.pt'}: {words}"), err


def test_sample_and_export_need_no_training_state(tmp_path, data_dir, monkeypatch, capsys):
    ck = torch.load(fixture("233f2af"), weights_only=False)
    for k in ("config", "optimizer", "scaler", "rng", "iter", "epoch", "pos", "history", "seconds"):
        ck[k] = None
    torch.save(ck, tmp_path / "ckpt.pt")
    for who in ("sample", "export"):
        read(who, tmp_path, data_dir, monkeypatch)
    out = capsys.readouterr().out
    assert "'user: 2 more like cat and zebra\\nassistant:' ->" in out and "config.json" in out


@pytest.mark.parametrize("where, value, words, args", [
    (("config",), None, "config is None", ["orpo.py", "--config", "tiny", "--init_from=resume", *FLAGS]),
    (("meta", "tokenizer"), GONE, "meta['tokenizer'] is missing", ["sample.py", f"--prompt={PROMPT}"])])
def test_damage_is_one_line_from_the_command_line_too(tmp_path, data_dir, where, value, words, args):
    damaged(tmp_path, where, value)
    data = [f"--data_dir={data_dir}"] if args[0] == "orpo.py" else []
    r = cli(*args, f"--out_dir={tmp_path}", *data)
    assert r.returncode == 2 and r.stderr == f"error: {tmp_path / 'ckpt.pt'}: {words}\n", r.stderr
