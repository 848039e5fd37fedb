"""machinery/boot.py: the thread count as the load goes, that a user's own is kept, and
Ctrl-C while torch imports as one line and exit status 130."""
import os
import signal
import subprocess
import sys

from machinery import boot

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_threads_follow_the_load_while_the_run_goes(monkeypatch, capsys):
    """Between steps, one thread per core that other programs left free, from what they took
    since the last look: a reader that waits costs nothing; a busy program gets its core,
    and when it ends the threads come back; each change is a line; a user's count stays."""
    import torch
    monkeypatch.delenv("OMP_NUM_THREADS")
    clock = [(0.0, 0.0, 0.0)]  # (now, machine busy CPU s, this process's CPU s)
    th = boot.Threads(every=2.0, times=lambda: clock[-1])
    th.cpus = 2
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)  # torch's own count, read at the first check: 2 cores
        clock.append((1.0, 2.0, 2.0))
        assert th.check() is None  # too soon to say
        clock.append((4.0, 8.0, 7.9))  # 4 s: this run used both CPUs, a reader ~nothing
        assert th.check() is None and torch.get_num_threads() == 2 and th.cores == 2
        clock.append((8.0, 16.0, 11.9))  # another program took 1 CPU of the 2
        note = th.check()
        assert torch.get_num_threads() == 1 and note.startswith("note: 1 thread(s), not 2: other "
                                                                 "programs used 1.0 of the 2 CPUs")
        assert capsys.readouterr().out == note + "\n"  # the run's line
        clock.append((12.0, 20.0, 15.8))  # it ended: this run alone again
        assert th.check().startswith("note: 2 thread(s), not 1") and torch.get_num_threads() == 2
        monkeypatch.setenv("OMP_NUM_THREADS", "2")
        fixed = boot.Threads(every=0.0, times=lambda: clock[-1])
        clock.append((20.0, 36.0, 16.0))
        assert fixed.check() is None and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def run(code, **env):
    """code in a fresh Python whose SIGINT starts as the system's default, as at a terminal
    (a shell's background job starts with SIGINT ignored, and Python keeps it so)."""
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=120,
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def test_ctrl_c_while_torch_imports_is_one_line_exit_130():
    """SIGINT sent by the process to itself after boot and before `import torch`: no timing
    to race, the interrupt lands at the import as a Ctrl-C in the first second would."""
    r = run("from machinery import boot\nimport os, signal\nos.kill(os.getpid(), signal.SIGINT)\n"
            "import torch\nprint('not interrupted')")
    assert r.returncode == 128 + signal.SIGINT, r
    assert r.stdout == "" and r.stderr.strip() == "interrupted"


def test_other_errors_keep_their_traceback():
    r = run("from machinery import boot\nraise RuntimeError('boom')")
    assert r.returncode == 1 and "Traceback" in r.stderr and "RuntimeError: boom" in r.stderr


def test_a_closed_pipe_ends_quietly():
    p = subprocess.run(f"{sys.executable} -c 'from machinery import boot\nwhile True: print(1)' | head -1",
                       shell=True, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.stdout == "1\n" and p.stderr == "", p.stderr
