"""Reading preference rows from where people keep them: a local .jsonl(.gz), .json or
.parquet file, or the Hugging Face hub through `datasets`. Rows come back raw, in the
source's own shape (prepare_data.py finds the shape and tokenizes them); everything that
cannot be read is a one-line ValueError naming the file.
"""
import collections
import json
import os

from machinery.safe import one_line

FORMATS = (".jsonl", ".jsonl.gz", ".json", ".parquet")

# A .jsonl line that is not JSON (msg: why), or BLANK: kept in place, so row numbers stay right
BrokenLine = collections.namedtuple("BrokenLine", "msg")
BLANK = BrokenLine("a blank line")



def read_jsonl(path):
    """A .jsonl(.gz) file's rows, rows[i] line i + 1; a line not JSON is a BrokenLine (reported,
    skipped). Lines are decoded alone (a stray byte costs one row), as utf-8-sig (a BOM reads)."""
    import gzip
    import zlib
    rows = []
    try:
        with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
            for line in f:
                try:
                    text = line.decode("utf-8-sig")
                    rows.append(json.loads(text) if text.strip() else BLANK)
                except UnicodeDecodeError as e:
                    rows.append(BrokenLine(f"not UTF-8 text ({e.reason} at byte {e.start})"))
                except (json.JSONDecodeError, RecursionError) as e:  # or nested too deep
                    rows.append(BrokenLine(f"broken JSON ({getattr(e, 'msg', 'nested too deep')})"))
    except (OSError, EOFError, zlib.error) as e:  # unreadable, or a corrupt or cut-off .gz
        raise ValueError(f"{path}: cannot read it ({one_line(e, typed=True)})") from e
    return rows


def read_file(path):
    """A local file's raw rows, or a one-line ValueError: a .jsonl(.gz) line by line (read_jsonl),
    .json and .parquet through datasets' loaders, which number their rows by position."""
    if path.endswith((".jsonl", ".jsonl.gz")):
        rows = read_jsonl(path)
    elif os.path.getsize(path) == 0:  # datasets fails on it with an empty StopIteration
        rows = []
    else:
        import datasets
        # our error says it all: datasets' own log lines and progress bars would make it three
        level, bars_off = datasets.logging.get_verbosity(), datasets.are_progress_bars_disabled()
        datasets.logging.set_verbosity(datasets.logging.CRITICAL)
        datasets.disable_progress_bars()
        try:
            kind = "parquet" if path.endswith(".parquet") else "json"
            rows = list(datasets.load_dataset(kind, data_files=path, split="train"))
        except Exception as e:  # a corrupt file, or one not of its extension's format
            cause = e.__cause__ or e  # datasets wraps the reader's error in a vaguer one
            raise ValueError(f"{path}: cannot read it as {kind} "
                             f"({type(cause).__name__}: {one_line(cause)})") from e
        finally:
            datasets.logging.set_verbosity(level)
            if not bars_off:
                datasets.enable_progress_bars()
    if all(isinstance(r, BrokenLine) for r in rows):  # BLANK is one too
        raise ValueError(f"{path}: no rows to read: " + ("the file is empty" if all(
            r is BLANK for r in rows) else "no line of it is JSON (is it a .jsonl file?)"))
    return rows


def load_source(source, path=None, subset=None, val_path=None):
    """{split: (rows, name, number of the first row)}; rows are raw rows of the source's
    shape. A file without a val_path comes as 'train' alone: prepare() holds out its top."""
    if path:  # a local file of any accepted shape
        files = {s: p for s, p in (("train", path), ("val", val_path)) if p}
        for p in files.values():  # both checked before either is read
            if not os.path.isfile(p):
                raise ValueError(f"no file at {p}" if not os.path.lexists(p) else f"{p} is " + (
                    "a directory, not a file" if os.path.isdir(p) else "not a regular file "
                    "(a fifo?)" if os.path.exists(p) else "a link to nowhere (or a loop)"))
            if not p.endswith(FORMATS):
                raise ValueError(f"{p}: not a format prepare_data reads; accepted: "
                                 f"{', '.join(FORMATS)}")
        return {s: (read_file(p), p, 1) for s, p in files.items()}
    import datasets
    try:
        if source == "hh-rlhf":
            ds = datasets.load_dataset("Anthropic/hh-rlhf", data_dir=subset)
            return {"train": (ds["train"], source, 1), "val": (ds["test"], source, 1)}
        if source == "ultrafeedback":
            ds = datasets.load_dataset("HuggingFaceH4/ultrafeedback_binarized")
            return {"train": (ds["train_prefs"], source, 1), "val": (ds["test_prefs"], source, 1)}
    except Exception as e:  # no network, or the hub refused: say so, and what works instead
        raise ValueError(f"could not load {source!r} from the Hugging Face hub "
                         f"({one_line(e, typed=True)}); download it and pass --file "
                         f"PATH instead") from e
    raise ValueError(f"unknown source {source!r}; known: synthetic, hh-rlhf, ultrafeedback "
                     f"(or --file PATH)")
