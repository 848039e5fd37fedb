"""Failing safely: every error a user can cause is one line and an exit status, never a
traceback; every file a later run relies on is whole or absent, never half-written or a mix
of two runs; one process at a time writes a folder. The other modules import from here;
this file imports nothing of the project's.
"""
import atexit
import contextlib
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
    """An exception's message on one line (its type's name when it has none), cut to limit;
    typed: after its type's name, as `OSError: ...`, where the type says what went wrong."""
    msg = (" ".join(str(e).split()) or type(e).__name__)[:limit]
    return f"{type(e).__name__}: {msg}" if typed else msg


@contextlib.contextmanager
def atomic_write(path):
    """Write path whole or not at all: the block writes the temporary file it is given, in
    path's folder, which then replaces path in one rename. On any exception, Ctrl-C included,
    the temporary file is removed and path is as it was. A rename never truncates the old
    file, so a reader that has it open or memory-mapped keeps reading the old contents."""
    tmp = path + ".tmp"
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as e:  # a full disk is one line for every writer; other errors are theirs
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        kept = "the old file is unchanged" if os.path.exists(path) else "nothing was written"
        die(f"could not write {path}: the disk is full; {kept}")
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)


class lock:
    """Hold folder (created if need be) for this process: `with lock(d):`, or `held =
    lock(d)` for the life of the process. A second process gets ValueError naming the folder
    and the holder's pid and command, which the folder's .lock file keeps. The kernel drops
    an flock when its process dies, however it dies; a holder that ends cleanly empties the
    file, so a pid found in a free lock is one that was killed, and that is said."""

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

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


def replace_files(tmp, folder, last, old=(), mark=None):
    """Move every file of the folder tmp into folder, then remove tmp. `last` is the file
    whose presence says the set is whole (meta.json, config.json): it goes first, with the
    files `old` of the previous set and those about to be replaced, and comes back last, so
    a kill in between leaves a folder that does not load, never old files beside new ones.
    `mark`, a file that says the set is this project's, goes after all and comes back
    before all, so a folder that holds any file of a set holds it too. Renames in one file
    system do not fail for want of space."""
    new = sorted(os.listdir(tmp))
    first = [mark] if mark in new else []
    for name in dict.fromkeys([last, *old, *new, *first]):
        if name != mark:
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(folder, name))
    for name in first + [n for n in new if n not in (last, mark)] + [last]:
        os.replace(os.path.join(tmp, name), os.path.join(folder, name))
    os.rmdir(tmp)


@contextlib.contextmanager
def staged(folder, last, old=(), mark=None):
    """A fresh folder, folder/.tmp, for the block to write a whole set of files into; they
    then replace folder's (replace_files). On any exception, Ctrl-C included, it is removed
    and folder is as it was. The caller holds folder's lock, so a .tmp found there is a
    killed writer's, and goes."""
    tmp = os.path.join(folder, ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    os.mkdir(tmp)
    try:
        yield tmp
        replace_files(tmp, folder, last, old, mark)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
