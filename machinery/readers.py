"""Preference rows, raw, in the source's own shape, from a local .jsonl(.gz), .json or .parquet
file or from the Hugging Face hub (`datasets`); what cannot be read is a one-line ValueError."""
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
    except (OSError, EOFError, zlib.error) as e:  # unreadable, or a corrupt, cut or junk-tailed .gz
        raise ValueError(f"{path}: cannot read it" + (f" past line {len(rows)}" if rows else "")
                         + f" ({one_line(e, typed=True)})") from e
    return rows


def read_json(path):
    """A .json file's rows: an array of row objects, or an object holding one such array (as
    {"data": [...]}). JSON lines under a .json name, as `datasets` writes them, read as .jsonl."""
    try:
        with open(path, "rb") as f:
            text = f.read().decode("utf-8-sig")
        data = json.loads(text) if text.strip() else []
    except (OSError, ValueError, RecursionError) as e:  # ValueError: not UTF-8, or not JSON
        if isinstance(e, json.JSONDecodeError) and e.msg == "Extra data":  # a row, then more:
            return read_jsonl(path)  # JSON lines
        raise ValueError(f"{path}: cannot read it as json ({one_line(e, typed=True)})") from e
    if isinstance(data, dict) and len(data) == 1:  # rows under one key, as {"data": [...]}
        data = [*data.values()][0]
    return data if isinstance(data, list) else [data]


def read_parquet(path):
    """A .parquet file's rows. Read on this thread alone: a process that exits soon after a
    threaded read (no usable rows, say) aborts in Arrow's thread pool ("terminate called
    without an active exception": 16 exits of 20 here; none read this way)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    try:
        with open(path, "rb") as f:
            table = pq.read_table(f, use_threads=False)  # see the docstring
    except (OSError, pa.ArrowException) as e:  # not parquet, cut short, or unreadable
        raise ValueError(f"{path}: cannot read it as parquet ({one_line(e, typed=True)})") from e
    return table.to_pylist()  # a dictionary-encoded column gives str, a list of structs dicts


def read_file(path):
    """A local file's raw rows, numbered from 1 by position (a .jsonl's by line)."""
    rows = (read_jsonl if path.endswith((".jsonl", ".jsonl.gz")) else
            read_json if path.endswith(".json") else read_parquet)(path)
    if all(isinstance(r, BrokenLine) for r in rows):  # none, or blank and broken lines only
        why = ("no line of it is JSON (is it a .jsonl file?)" if any(r is not BLANK for r in rows)
               else "the file is empty" if rows or not os.path.getsize(path) else "it has none")
        raise ValueError(f"{path}: no rows to read: {why}")
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
    hub = {"hh-rlhf": ("Anthropic/hh-rlhf", "train", "test"),
           "ultrafeedback": ("HuggingFaceH4/ultrafeedback_binarized", "train_prefs", "test_prefs")}
    if source not in hub:
        raise ValueError(f"unknown source {source!r}; known: synthetic, {', '.join(hub)} (or --file PATH)")
    name, train, val = hub[source]
    try:
        import datasets
        ds = datasets.load_dataset(name, data_dir=subset)
    except Exception as e:  # no network, or the hub refused: say so, and what works instead
        raise ValueError(f"could not load {source!r} from the Hugging Face hub ({one_line(e, typed=True)})"
                         f"; download it and pass --file PATH instead") from e
    return {"train": (ds[train], source, 1), "val": (ds[val], source, 1)}
