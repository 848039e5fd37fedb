"""What must happen before torch loads, so each script imports this module first: the
threads' settings (OpenMP reads its environment once, as torch loads), and a one-line
Ctrl-C while torch imports (a second or more, and a 46-line traceback otherwise).

The thread count. torch starts one OpenMP thread per physical core, and between its small ops
the threads spin, waiting for each other. Where another program keeps a core busy, a spinning
thread holds a core the thread it waits for needs, and a step runs at half the speed of one
thread. Busy, OMP_WAIT_POLICY=PASSIVE and one thread both keep the speed; idle, PASSIVE costs a
third of it, at every op, and one thread 25-45% (BENCHMARKS.md, "A busy machine"). So the count
follows the load (Threads): one thread per core no other program uses, at least one, changed
between steps with a line that says so. A thread count can change fp32 results in the last bit
(a matmul's order of sums): to fix the numbers, set OMP_NUM_THREADS, a count never changed.
"""
import atexit
import os
import signal
import sys
import time


kept = None  # what a run has kept, for Ctrl-C's line wherever it lands (checkpoint.RunDir sets it)


def one_line_exit(kind, value, tb, hook=sys.excepthook):
    """What no script caught, said in one line: Ctrl-C (while torch imports, say), exit
    status 130; output piped to a reader that stopped (`| head`): nothing more, exit 141."""
    if issubclass(kind, KeyboardInterrupt):
        print(f"error: interrupted; {kept()}" if kept else "interrupted", file=sys.stderr, flush=True)
        os._exit(130)  # 128 + SIGINT, as a shell reports a program that Ctrl-C ended
    if issubclass(kind, BrokenPipeError):
        os._exit(141)  # 128 + SIGPIPE, as for any program whose reader went away
    return hook(kind, value, tb)


sys.excepthook = one_line_exit
# Once the script is done, Python frees torch for half a second, with Ctrl-C's default
# action back: a keystroke then would end the finished program by a signal, unexplained.
atexit.register(signal.signal, signal.SIGINT, signal.SIG_IGN)


def cpu_times():
    """(now, the machine's busy CPU seconds, this process's CPU seconds); None without /proc."""
    try:
        with open("/proc/stat") as f:
            t = [int(x) for x in f.readline().split()[1:]]  # user nice system idle iowait ...
    except (OSError, ValueError):
        return None
    mine = os.times()
    return time.time(), (sum(t) - t[3] - t[4]) / os.sysconf("SC_CLK_TCK"), mine[0] + mine[1]


class Threads:
    """check(), at most every `every` s: torch's threads, one per core that other programs left
    free since the last look (the machine's busy time less this process's); a change, printed."""

    def __init__(self, every=2.0, times=cpu_times):
        self.every, self.times, self.last = every, times, times()
        self.fixed = "OMP_NUM_THREADS" in os.environ or self.last is None
        self.cores, self.cpus = None, os.cpu_count() or 1  # cores: torch's count, at the first check

    def check(self):
        now = None if self.fixed else self.times()
        if now is None or now[0] - self.last[0] < self.every:
            return None
        (dt, busy, mine), self.last = (a - b for a, b in zip(now, self.last)), now
        others = min(self.cpus, max(0.0, (busy - mine) / dt))  # CPUs' worth of their work
        import torch  # loaded by now: this module only ever runs before it
        self.cores = self.cores or torch.get_num_threads()  # before any change: one per physical core
        old, n = torch.get_num_threads(), max(1, round(self.cores * (1 - others / self.cpus)))
        if n == old:
            return None
        torch.set_num_threads(n)
        note = (f"note: {n} thread(s), not {old}: other programs used {others:.1f} of the "
                f"{self.cpus} CPUs over the last {dt:.0f} s")
        print(note)
        return note


THREADS = Threads()  # measured from here on: by the first check, the load while the run began
