"""What must happen before torch loads, so each script imports this module first: the
threads' settings (OpenMP reads its environment once, as torch loads), and a one-line
Ctrl-C while torch imports (a second or more, and a 46-line traceback otherwise).

The thread count. torch starts one OpenMP thread per core, and between its small ops the
threads spin, waiting for each other. On a machine where another program keeps a core
busy, a spinning thread holds a core the program needs, the thread it waits for is not
running, and a step runs at half the speed of one thread (BENCHMARKS.md, "A busy machine").
The options, measured there: OMP_WAIT_POLICY=PASSIVE (threads sleep as they wait) keeps
its speed when busy but costs a third of it on an idle machine, at every op; one thread
is as fast as PASSIVE when busy and 25-45% slower idle. So the wait policy stays OpenMP's,
and the count follows the load as the script starts: one thread per core that no other
program is running on, at least one. On an idle machine nothing is set and the run is as
fast, and its numbers the same, as before. A thread count can change the order of a
matmul's sums, and so fp32 results in the last bit: a busy start may give slightly
different losses. To fix the numbers, or to choose yourself, set OMP_NUM_THREADS (and
OMP_WAIT_POLICY if you like): a count you set is never changed.
"""
import os
import sys
import time


def one_line_exit(kind, value, tb, hook=sys.excepthook):
    """What no script caught, said in one line: Ctrl-C (while torch imports, say), exit
    status 130; output piped to a reader that stopped (`| head`): nothing more, exit 141."""
    if issubclass(kind, KeyboardInterrupt):
        print("interrupted", file=sys.stderr, flush=True)
        os._exit(130)  # 128 + SIGINT, as a shell reports a program that Ctrl-C ended
    if issubclass(kind, BrokenPipeError):
        os._exit(141)  # 128 + SIGPIPE, as for any program whose reader went away
    return hook(kind, value, tb)


sys.excepthook = one_line_exit


def busy_threads(samples=5, gap=0.01):
    """Threads of other programs running now: the fewest over a few looks at /proc/loadavg
    (its 4th field, running/total, counts this one too), so that a short job's moment does
    not count. 0 where there is no /proc (macOS, Windows)."""
    try:
        seen = []
        for _ in range(samples):
            with open("/proc/loadavg") as f:
                seen.append(int(f.read().split()[3].split("/")[0]) - 1)
            time.sleep(gap)
        return max(0, min(seen))
    except (OSError, ValueError, IndexError):
        return 0


def choose_threads(n_cores, busy):
    """The OpenMP thread count for n_cores usable cores while `busy` of them run other
    programs' threads: one per free core, at least one; None (torch's own choice) if idle."""
    return None if busy == 0 else max(1, n_cores - busy)


def cores():
    """The physical cores this process may run on (torch's own count: one thread each).
    Two hyperthreads of one core list the same siblings."""
    has = hasattr(os, "sched_getaffinity")
    cpus = os.sched_getaffinity(0) if has else range(os.cpu_count() or 1)
    try:
        return len({open(f"/sys/devices/system/cpu/cpu{c}/topology/thread_siblings_list").read()
                    for c in cpus})
    except OSError:  # no sysfs: count each logical CPU
        return len(cpus)


THREADS = None  # what this module set OMP_NUM_THREADS to, if it did (the log line's hint reads it)
if "OMP_NUM_THREADS" not in os.environ:
    THREADS = choose_threads(cores(), busy_threads())
    if THREADS is not None and THREADS < cores():
        os.environ["OMP_NUM_THREADS"] = str(THREADS)
    else:
        THREADS = None
