"""Failing safely: every error a user can cause is one line and an exit status, never a
traceback. The other modules import die and one_line from here.
"""
import sys


def die(msg, status=2):
    """Bad input: one line and exit status 2, as argparse does; never a traceback."""
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(status)


def one_line(e, limit=200):
    """An exception's message on one line (its type's name when it has none), cut to limit."""
    return (" ".join(str(e).split()) or type(e).__name__)[:limit]
