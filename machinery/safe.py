"""Failing safely: an error a user can cause is one line, never a traceback; a file a later run
relies on is whole or absent; one process at a time writes a folder. It imports nothing of the project's."""
import atexit
import contextlib
import ctypes
import errno
import os
import shutil
import sys

try:
    import fcntl
except ImportError:  # Windows has no flock: folders are then not guarded against two writers
    fcntl = None


def die(msg, status=2):
    """Bad input: one line and exit status 2, as argparse does; never a traceback."""
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(status)


def one_line(e, limit=200, typed=False):
    """typed: after its type's name, as `OSError: ...`, where the type says what went wrong."""
    msg = (" ".join(str(e).split()) or type(e).__name__)[:limit]
    return f"{type(e).__name__}: {msg}" if typed else msg


@contextlib.contextmanager
def atomic_write(path):
    """Write path whole or not at all: the block writes the temporary file it is given, which
    replaces path in one rename (a reader of the old file keeps it); on any exception, Ctrl-C
    included, it is removed and path is as it was. A write that fails is one line, for every writer."""
    tmp = path + ".tmp"
    try:
        yield tmp
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        # no errno (torch.save's stream errors): full if under a MiB is left, the partial file still there
        full = (e.errno in (errno.ENOSPC, errno.EDQUOT) if getattr(e, "errno", None) is not None
                else shutil.disk_usage(os.path.dirname(os.path.abspath(path))).free < 2**20)
        kept = "the old file is unchanged" if os.path.exists(path) else "nothing was written"
        die(f"could not write {path}: {'the disk is full' if full else one_line(e)}; {kept}")
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)


class lock(contextlib.AbstractContextManager):
    """`with lock(d):`, or `held = lock(d)` for the process's life. The kernel drops an flock
    however its process dies; a clean holder empties the file: a pid in a free lock is a killed one's."""

    def __init__(self, folder):
        if not folder:
            raise ValueError("no folder given (an empty path)")
        if os.path.exists(folder) and not os.path.isdir(folder):
            raise ValueError(f"{folder} is a file, not a folder")
        try:
            os.makedirs(folder, exist_ok=True)
            self.f = open(os.path.join(folder, ".lock"), "a+")
        except OSError as e:  # a file of that name, a read-only folder, ...
            raise ValueError(f"cannot write in {folder} ({one_line(e)})") from e
        try:
            if fcntl:
                fcntl.flock(self.f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.f.seek(0)
            holder = self.f.read().strip() or "another process"
            self.f.close()
            raise ValueError(f"{folder} is in use by {holder}") from None
        self.f.seek(0)
        if stale := self.f.read().strip():
            print(f"{folder}: took over the lock of {stale}, which is gone", file=sys.stderr)
        self.f.truncate(0)
        self.f.write(f"pid {os.getpid()} ({' '.join(sys.argv)[:200]})")
        self.f.flush()
        atexit.register(self.release)

    def release(self):
        if not self.f.closed:
            self.f.truncate(0)
            self.f.close()  # closing drops the flock

    def __exit__(self, *exc):
        self.release()


def exchange(a, b):
    """Swap two folders' names in one atomic rename (Linux's renameat2 RENAME_EXCHANGE), so
    that b is at every moment the old folder or the new one, never absent; where the kernel
    or libc lacks it, in three renames (a kill between them leaves b missing, a beside it)."""
    libc = ctypes.CDLL(None, use_errno=True)
    if hasattr(libc, "renameat2"):
        if libc.renameat2(-100, os.fsencode(a), -100, os.fsencode(b), 2) == 0:  # AT_FDCWD
            return
        if ctypes.get_errno() not in (errno.EINVAL, errno.ENOSYS):  # not merely unsupported
            raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()), b)
    os.rename(b, b + ".old")
    os.rename(a, b)
    os.rename(b + ".old", a)


@contextlib.contextmanager
def staged(folder, own):
    """folder.new, for the block to write a whole new version of folder's files into; then the
    two change places (exchange) and the old goes: a kill at any moment leaves folder whole.
    The caller holds folder's lock, and this folder.new's; one found is a killed writer's."""
    foreign = sorted(set(os.listdir(folder)) - set(own) - {".lock"})
    if foreign:
        raise ValueError(f"{folder} holds files that it did not write ({', '.join(foreign[:3])}"
                         f"{', ...' if len(foreign) > 3 else ''}); give a new or empty folder")
    new = folder.rstrip("/") + ".new"
    shutil.rmtree(new, ignore_errors=True)
    held = lock(new)
    try:
        yield new
        exchange(new, folder)
    finally:
        shutil.rmtree(new, ignore_errors=True)
        held.release()
