"""machinery/boot.py: the thread count it picks, that a user's own is kept, and Ctrl-C while
torch imports as one line and exit status 130."""
import os
import signal
import subprocess
import sys

from machinery import boot

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_threads_follow_the_free_cores():
    assert boot.choose_threads(2, 0) is None  # idle: torch's own choice, today's numbers
    assert boot.choose_threads(2, 1) == 1  # one core busy: one thread, not two spinning
    assert boot.choose_threads(2, 5) == 1  # at least one
    assert boot.choose_threads(8, 3) == 5


def run(code, **env):
    """code in a fresh Python whose SIGINT starts as the system's default, as at a terminal
    (a shell's background job starts with SIGINT ignored, and Python keeps it so)."""
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=120,
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def test_a_thread_count_the_user_set_is_kept():
    r = run("from machinery import boot; import os\n"
            "print(os.environ['OMP_NUM_THREADS'], boot.THREADS)", OMP_NUM_THREADS="7")
    assert r.stdout.split() == ["7", "None"]


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
