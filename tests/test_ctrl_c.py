"""Ctrl-C typed at a keyboard, anywhere: each script runs on a pseudo-terminal, and Ctrl-C is
typed into it, so that the terminal sends SIGINT to the whole foreground process group, as it
does for a user. Every script says one line, exits 130, prints no traceback and leaves no
process of its own running; the next command gives what an uninterrupted one gives."""
import os
import pty
import select
import signal
import sys
import time

import pytest

from conftest import ROOT, cli

RUN = ["--config=tiny", "--n_samples=200", "--max_new_tokens=32", "--max_iters=100000"]


def _session(p):
    try:
        with open(f"/proc/{p}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[4])  # field 6: the session id
    except (OSError, IndexError, ValueError):
        return None


def typed_ctrl_c(argv, after, timeout=180):
    """Run `python argv` on a pseudo-terminal; type Ctrl-C once it has printed `after` (a string)
    or `after` seconds on; return (exit status, what it printed after the Ctrl-C, the process ids
    of its session still alive)."""
    pid, fd = pty.fork()
    if pid == 0:  # the child: a session of its own, with the pseudo-terminal as its terminal
        signal.signal(signal.SIGINT, signal.SIG_DFL)  # as a shell starts it, even if we ignore it
        os.chdir(ROOT)
        os.execv(sys.executable, [sys.executable, *argv])
    out, tail, typed, t0 = b"", b"", False, time.time()
    while time.time() - t0 < timeout:
        due = time.time() - t0 > after if isinstance(after, float) else after.encode() in out
        if not typed and due:
            time.sleep(0.3)
            os.write(fd, b"\x03")  # Ctrl-C, as the keyboard sends it
            typed = True
        if select.select([fd], [], [], 0.5)[0]:
            try:
                chunk = os.read(fd, 4096)
            except OSError:  # the child is gone and the terminal closed
                break
            if not chunk:
                break
            out, tail = out + chunk, tail + chunk if typed else tail
    else:
        os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    left = [p for p in os.listdir("/proc") if p.isdigit() and _session(p) == pid]
    os.close(fd)
    return os.waitstatus_to_exitcode(status), tail.decode(errors="replace"), left


def one_line_130(status, tail, left, *words):
    said = tail.replace("\r", "").split("^C", 1)[-1]  # the terminal echoes the keystroke
    lines = [l for l in said.split("\n") if l.strip()]
    assert status == 130, (status, tail)
    assert "Traceback" not in tail and len(lines) == 1, tail
    assert not left, f"processes left running: {left}"
    for w in words:
        assert w in lines[0], lines[0]


@pytest.mark.parametrize("after, words", [
    ("", ("interrupted",)),                                          # while torch imports
    ("eval     0", ("interrupted;",)),  # sampling before training (or, on a fast machine, after)
    ("eval     5", ("interrupted;", "holds iteration", ": go on with --init_from=resume")),  # training
])
def test_ctrl_c_in_a_run_is_one_line(tmp_path, data_dir, after, words):
    out = tmp_path / "out"
    r = typed_ctrl_c(["orpo.py", *RUN, f"--data_dir={data_dir}", f"--out_dir={out}",
                      "--eval_interval=5", "--log_interval=1"], after)
    one_line_130(*r, *words)
    assert not [f for f in os.listdir(tmp_path) if f.endswith((".tmp", ".new"))]


def test_ctrl_c_in_a_figure_between_runs_is_one_line(tmp_path, data_dir):
    r = typed_ctrl_c(["-m", "experiments.figures", "lambda", "--config=tiny", "--max_iters=4",
                      f"--data_dir={data_dir}", f"--out_dir={tmp_path}", "--n_samples=2"],
                     "run 2 of")
    one_line_130(*r, "interrupted")


@pytest.mark.parametrize("after", ["", 2.0, "tokenizing"])  # importing, making rows, writing
def test_ctrl_c_in_data_preparation_is_one_line_and_keeps_no_half_data(tmp_path, after):
    d = tmp_path / "d"
    one_line_130(*typed_ctrl_c(["prepare_data.py", "--n_train=400000", f"--out={d}"], after),
                 "interrupted")
    assert not os.path.exists(f"{d}.new")


def test_ctrl_c_in_sampling_is_one_line(tmp_path, data_dir):
    out = tmp_path / "run"
    assert cli("orpo.py", "--config=tiny", "--max_iters=2", f"--data_dir={data_dir}",
               f"--out_dir={out}", "--n_samples=0").returncode == 0
    r = typed_ctrl_c(["sample.py", "--config=tiny", f"--out_dir={out}", "--n_samples=5",
                      "--max_new_tokens=100000", "--prompt=zebra"], "note:")  # then it samples
    one_line_130(*r, "interrupted")


def test_ctrl_c_in_the_benchmark_is_one_line():
    r = typed_ctrl_c(["-m", "experiments.bench", "--config=tiny", "--steps=100000"], 8.0)
    one_line_130(*r, "interrupted")


def test_ctrl_c_in_the_assignment_is_one_line_and_leaves_no_half_copy(tmp_path):
    hand = tmp_path / "hand"
    r = typed_ctrl_c(["-m", "course.assignment", "make", str(hand)], 1.2)  # importing or writing
    if r[0] == 0:  # this machine wrote it before the keystroke
        assert (hand / "orpo.py").is_file()
    else:
        one_line_130(*r, "interrupted")
        assert not hand.exists() or not os.listdir(hand)
        r = typed_ctrl_c(["-m", "course.assignment", "make", str(hand)], 600.0)
        assert r[0] == 0 and (hand / "orpo.py").is_file(), r
    src = (hand / "orpo.py").read_text()  # a student's endless loop: the grading waits on it
    (hand / "orpo.py").write_text(src.replace("raise NotImplementedError(", "while True: (", 1))
    one_line_130(*typed_ctrl_c(["-m", "course.assignment", "grade", str(hand)], 3.0),
                 "interrupted")
    assert not (hand / "results.json").exists()


def test_ctrl_c_in_a_ddp_run_while_the_first_worker_prepares_data_is_one_line(tmp_path, gpt2):
    """Every process of --nproc's group gets it; one of them blocked in a collective learns it
    as its peer leaves, where no handler is: boot's hook says the line (init_process_group's
    own hook would hold it in a buffer that the exit never writes)."""
    r = typed_ctrl_c(["orpo.py", "--config=tiny", "--nproc=2", "--grad_accum=2",
                      f"--out_dir={tmp_path / 'out'}", f"--data_dir={tmp_path / 'data'}",
                      "--data_file=course/data/hh-rlhf-sample.jsonl.gz"], "preparing")
    one_line_130(*r, "interrupted;")
