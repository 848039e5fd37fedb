"""Turn preference pairs (prompt, chosen, rejected) into token files that orpo.py reads.

Output, in --out:
    {train,val}.tokens.npy   every row's prompt, chosen and rejected tokens, back to back
    {train,val}.index.npy    (rows, 4) int64: offset, prompt_len, chosen_len, rejected_len
    meta.json                what it was prepared from (source, file, val_file, max_len,
                             max_prompt_len), tokenizer, vocab size, special ids, row counts
Both responses end with the end-of-text token, unless truncated.

Rows are numbered as an editor numbers a .jsonl's lines, from 1. Bad rows are named, counted
and dropped; bad files or limits stop with a one-line error (exit 2).
"""
from machinery import boot  # first: a Ctrl-C while numpy and tiktoken import is one line too
import argparse
import hashlib
import json
import os
import sys

import numpy as np
import tiktoken

from machinery.readers import BLANK, FORMATS, BrokenLine, load_source
from machinery.safe import die, lock, one_line, staged
from machinery.synthetic import N_TRAIN, N_VAL, SEED, make_synthetic, synthetic_encoding

OFF, PROMPT, CHOSEN, REJECTED = range(4)  # the columns of {split}.index.npy: offset, lengths

ASSISTANT = "\n\nAssistant:"
ROLES = {"user": "Human", "assistant": "Assistant", "system": "System"}
SHAPES = ("{prompt, chosen, rejected} strings; HH-style {chosen, rejected} whole dialogues; "
          "{chosen, rejected} message lists of {role, content}, with or without a prompt column")


def render(messages):
    """[{role, content}, ...] -> HH's "\\n\\nHuman: {turn}\\n\\nAssistant: {turn}...", no trailing marker."""
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("content"), str) or m.get("role") not in ROLES:
            raise ValueError(f"a message is not a {{role, content}} object with role in "
                             f"{sorted(ROLES)}: {str(m)[:80]!r}")
    return "".join(f"\n\n{ROLES[m['role']]}: {m['content']}" for m in messages)


def detect_shape(row, name):
    if not isinstance(row, dict):
        raise ValueError(f"{name}: rows are {type(row).__name__}, not objects; accepted: {SHAPES}")
    if not {"chosen", "rejected"} <= set(row):
        raise ValueError(f"{name}: unrecognised rows with keys {sorted(row)}; accepted: {SHAPES}")
    return ("messages" if isinstance(row["chosen"], list) else
            "triple" if "prompt" in row else "dialogue")


def to_triple(row, shape):
    """One row of a given shape -> {prompt, chosen, rejected} strings, or ValueError."""
    if isinstance(row, BrokenLine):
        raise ValueError(row.msg)
    if not isinstance(row, dict):
        raise ValueError(f"expected an object, got {type(row).__name__}")
    for key in ("prompt", "chosen", "rejected") if shape == "triple" else ("chosen", "rejected"):
        if key not in row:
            raise ValueError(f"missing key {key!r} (has {sorted(row)})")
        if shape != "messages" and not isinstance(row[key], str):  # render checks messages
            raise ValueError(f"{key!r} is {type(row[key]).__name__}, not a string")
    if shape == "triple":
        return row
    if shape == "dialogue":  # the prompt runs through the last Assistant marker; each response
        # is what follows it, its leading space included, as in HH
        i = row["chosen"].rfind(ASSISTANT)
        if i < 0:
            raise ValueError(f"'chosen' has no {ASSISTANT!r} turn")
        prompt = row["chosen"][:i + len(ASSISTANT)]
        if not row["rejected"].startswith(prompt):
            raise ValueError("'chosen' and 'rejected' differ before the last Assistant turn")
        return {"prompt": prompt, "chosen": row["chosen"][len(prompt):],
                "rejected": row["rejected"][len(prompt):]}
    # messages: the last message of each list is the response; what precedes it (or, when the
    # lists hold the response alone, the prompt column as a user turn) is the prompt
    for key in ("chosen", "rejected"):
        msgs = row[key]
        if not isinstance(msgs, list) or not msgs:
            raise ValueError(f"{key!r} is not a non-empty list of messages")
        if not isinstance(msgs[-1], dict) or msgs[-1].get("role") != "assistant":
            raise ValueError(f"{key!r} does not end with an assistant message")
    chosen, rejected = row["chosen"], row["rejected"]
    render(chosen + rejected)  # checks every message
    head = chosen[:-1]
    if not head:
        if not isinstance(row.get("prompt"), str):
            raise ValueError("the messages hold no prompt turn and there is no 'prompt' string")
        head = [{"role": "user", "content": row["prompt"]}]
    elif rejected[:-1] and rejected[:-1] != head:
        raise ValueError("'chosen' and 'rejected' messages differ before the last turn")
    return {"prompt": render(head) + ASSISTANT, "chosen": " " + chosen[-1]["content"],
            "rejected": " " + rejected[-1]["content"]}


def get_encoding(tok):
    """The tokenizer named by meta['tokenizer']; tiktoken downloads GPT-2's on first use."""
    if tok == "synthetic":
        return synthetic_encoding()
    try:
        return tiktoken.get_encoding(tok)
    except Exception as e:  # requests' ConnectionError, an HTTP error, a bad cached file
        raise ValueError(f"cannot load the {tok} tokenizer ({one_line(e, typed=True)}"
                         f"); run once with network access, or set TIKTOKEN_CACHE_DIR to a "
                         f"folder holding tiktoken's cached {tok} files") from e


def check(row, shape):
    """One raw row -> (None, (prompt, chosen, rejected)) when it is usable, else (why it is dropped,
    what is wrong with a malformed row). Empty or identical responses are dropped, as the paper does."""
    if row is BLANK:
        return "blank", None
    try:
        t = to_triple(row, shape)
    except ValueError as e:
        return "malformed", str(e)
    if not t["prompt"]:  # a response must follow something: nothing to condition it on
        return "malformed", "the prompt is empty"
    if not t["chosen"].strip() or not t["rejected"].strip():
        return "empty_response", None
    if t["chosen"] == t["rejected"]:
        return "identical", None
    return None, (t["prompt"], t["chosen"], t["rejected"])


def write_split(rows, enc, out_dir, split, max_len, max_prompt_len, name, shape="triple",
                first_row=1):
    """rows[0] is row first_row of name. A long row is cut to fit max_len: the prompt keeps its
    last max_prompt_len tokens, each response its first max_len - len(prompt). A cut response
    loses its end-of-text token (the model should not learn to stop there); a row whose cut
    responses are empty or the same is no pair, and is dropped as too_long."""
    counts = {"read": len(rows), "kept": 0, "truncated": 0, "dropped": dict.fromkeys(
        ("blank", "malformed", "empty_response", "identical", "too_long"), 0)}
    triples, dropped = [], counts["dropped"]
    for i, row in enumerate(rows, start=first_row):
        why, t = check(row, shape)
        if why is None:
            triples.append(t)
            continue
        dropped[why] += 1
        if why == "malformed" and dropped[why] <= 10:
            print(f"  bad row: {name} row {i}: {t}", file=sys.stderr)
    if dropped["malformed"] > 10:
        print(f"  ... and {dropped['malformed'] - 10} more bad rows", file=sys.stderr)
    eot, chunks, index, offset, step = enc.eot_token, [], [], 0, 16384
    for lo in range(0, len(triples), step):  # tiktoken encodes a batch on all cores
        if len(triples) > 4 * step:
            print(f"  {split}: tokenizing rows {lo}-{min(lo + step, len(triples))} of "
                  f"{len(triples)}", file=sys.stderr)
        p_, c_, r_ = (enc.encode_ordinary_batch([t[k] for t in triples[lo:lo + step]],
                                                num_threads=os.cpu_count()) for k in range(3))
        for p, c, r in zip(p_, c_, r_):
            c, r = c + [eot], r + [eot]
            if len(p) > max_prompt_len or len(p) + max(len(c), len(r)) > max_len:
                p = p[max(0, len(p) - max_prompt_len):]
                room = max(0, max_len - len(p))
                c, r = c[:room], r[:room]
                if not c or c == r:  # no room for a response, or to tell the two apart
                    dropped["too_long"] += 1
                    continue
                counts["truncated"] += 1
            chunks.append(np.array(p + c + r, dtype=np.int64))
            index.append((offset, len(p), len(c), len(r)))
            offset += len(p) + len(c) + len(r)
    if not index:
        raise ValueError(f"{name}: no usable rows in split {split!r} ({counts})")
    counts["kept"] = len(index)
    dtype = np.uint16 if enc.n_vocab <= 2**16 else np.uint32  # smallest type for the vocab
    np.save(os.path.join(out_dir, f"{split}.tokens.npy"), np.concatenate(chunks).astype(dtype))
    np.save(os.path.join(out_dir, f"{split}.index.npy"), np.array(index, dtype=np.int64))
    return counts


def fingerprint(path, known=None):
    """A file's size, mtime and sha256 (about 2 ms a MB): `known`, if its size and mtime hold."""
    st = os.stat(path)
    fp = {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
    if known and all(known.get(k) == v for k, v in fp.items()):
        return known
    with open(path, "rb") as f:
        return dict(fp, sha256=hashlib.file_digest(f, "sha256").hexdigest())


FILES = [f"{split}.{kind}.npy" for split in ("train", "val") for kind in ("tokens", "index")]
REDO = "prepare it again into a new --data_dir (or delete {})"  # {}: the stale data_dir


def named(source, file):
    """The name data goes by (its folder, meta.json): the source, or a file's name less its
    format (pairs for pairs.jsonl.gz; hh-rlhf-file for hh-rlhf.jsonl: the hub's are taken)."""
    if not (file and source == "synthetic"):
        return source
    name = os.path.basename(file.rstrip("/"))
    ext = next((e for e in FORMATS if name.endswith(e)), "")  # at most one fits
    name = name[:len(name) - len(ext)].lstrip(".") or "file"
    return name + "-file" if name in ("synthetic", "hh-rlhf", "ultrafeedback") else name


def tokenizer(source, file):  # the synthetic task's own rows have their own vocabulary
    return "synthetic" if source == "synthetic" and not file else "gpt2"


def recipe(source, file, val_file, subset, seed, n_train, n_val, max_len, max_prompt_len):
    """What data is made from, as meta.json has it: same recipe and file contents, same data."""
    synth = tokenizer(source, file) == "synthetic"
    return dict(source=source, file=file and os.path.abspath(file),
                val_file=val_file and os.path.abspath(val_file), subset=subset,
                tokenizer=tokenizer(source, file), seed=seed if synth else None,
                n_train=n_train if synth else None, n_val=n_val if synth else None,
                max_len=max_len, max_prompt_len=max_prompt_len)


def holds(out):  # what out holds, read from the disk, to end a failed or stopped preparation's line
    return (f"{out} holds the data prepared before, unchanged" if os.path.isfile(
        os.path.join(out, "meta.json")) else f"{out} holds no prepared data")


def prepare(source, out, seed=SEED, n_train=N_TRAIN, n_val=N_VAL,
            max_len=1024, max_prompt_len=512, file=None, subset=None, val_file=None):
    """The meta.json written with the data; bad input is a one-line ValueError. The files go into
    a new folder that then takes out's place (safe.staged): a preparation that fails or is killed
    leaves the previous data whole, and a trainer that has the old files mapped keeps them."""
    if not 1 <= max_prompt_len < max_len:  # a kept row needs a prompt token and a response's
        raise ValueError(f"max_prompt_len {max_prompt_len} must be at least 1 and below max_len "
                         f"{max_len}, to leave room for the prompt and the responses")
    if min(n_train, n_val) < 1:
        raise ValueError(f"n_train {n_train} and n_val {n_val} must each be at least 1")
    if tokenizer(source, file) == "synthetic":
        splits = {k: (v, source, 1) for k, v in make_synthetic(n_train, n_val, seed).items()}
        shape = "triple"
    else:
        splits = load_source(source, file, subset, val_file)
        shape = detect_shape(next((r for rows, _, _ in splits.values() for r in rows
                                   if not isinstance(r, BrokenLine)), None), file or source)
        if "val" not in splits:  # one file: its top is held out, the fewest rows that hold a
            # tenth of its usable ones (1 to 1000), so that bad rows there cannot leave val empty
            rows, name, _ = splits["train"]
            usable = [i for i, r in enumerate(rows) if check(r, shape)[0] is None]
            cut = usable[min(1000, max(1, len(usable) // 10)) - 1] + 1 if usable else 0
            splits = {"train": (rows[cut:], name, cut + 1), "val": (rows[:cut], name, 1)}
    meta = recipe(source, file, val_file, subset, seed, n_train, n_val, max_len, max_prompt_len)
    enc = get_encoding(meta["tokenizer"])
    meta.update(vocab_size=enc.n_vocab, eot=enc.eot_token, shape=shape, splits={},
                file_id=file and fingerprint(file), val_file_id=val_file and fingerprint(val_file))
    with lock(out):
        try:
            with staged(out, FILES + ["meta.json"]) as tmp:
                for split, (rows, name, first_row) in splits.items():
                    meta["splits"][split] = write_split(rows, enc, tmp, split, max_len,
                                                        max_prompt_len, name, shape, first_row)
                meta["files"] = {f: fingerprint(os.path.join(tmp, f)) for f in FILES}
                meta["id"] = hashlib.sha256(" ".join(
                    meta["files"][f]["sha256"] for f in FILES).encode()).hexdigest()[:16]
                with open(os.path.join(tmp, "meta.json"), "w") as f:
                    json.dump(meta, f, indent=1)
        except OSError as e:  # a full disk, above all
            raise ValueError(f"cannot write in {out} ({one_line(e, typed=True)}); "
                             f"{holds(out)}") from e
    for split, c in meta["splits"].items():
        print(f"{out}/{split}: read {c['read']}, kept {c['kept']}, truncated {c['truncated']}, "
              f"dropped {c['dropped']}")
    return meta


def load(data_dir, source, file=None, max_len=None):
    """meta and {split: (tokens, index)} of data_dir's data, checked against meta.json's hashes and
    what the caller asks for: the source, or the file when given; pairs of at most max_len tokens.
    Stale or unreadable data is a ValueError that says how to prepare again."""
    meta_path, redo = os.path.join(data_dir, "meta.json"), REDO.format(data_dir)
    try:
        with open(meta_path) as f:
            meta = json.load(f)
        _, tok, n_vocab = meta["source"], meta["tokenizer"], meta["vocab_size"]  # or a KeyError
        cut = [f for f, fp in meta["files"].items()  # hashed again if touched since
               if fingerprint(os.path.join(data_dir, f), fp).get("sha256") != fp.get("sha256")]
        splits = {s: (np.load(os.path.join(data_dir, f"{s}.tokens.npy"), mmap_mode="r"),
                      np.load(os.path.join(data_dir, f"{s}.index.npy"))) for s in ("train", "val")}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{data_dir} holds no readable prepared data "
                         f"({one_line(e, typed=True)}); {redo}") from e
    if cut:
        raise ValueError(f"{data_dir}: {', '.join(cut)} differ from what meta.json says; {redo}")
    file, made = file and os.path.abspath(file), meta.get("file")
    if file and made != file:  # a file's rows are the same data under any name
        raise ValueError(f"{data_dir} was prepared from {made or meta['source']}, not {file}; {redo}")
    if not file and meta["source"] != source:
        made = f" (from {made})" if made else ""
        raise ValueError(f"{data_dir} holds the data named {meta['source']}{made}, not {source} "
                         f"(--dataset={meta['source']} reads it); {redo}")
    if get_encoding(tok).n_vocab != n_vocab:
        raise ValueError(f"{meta_path} says vocab_size {n_vocab}, but tokenizer {tok!r} has "
                         f"{get_encoding(tok).n_vocab}: the data is stale; {redo}")
    for s, (tokens, index) in splits.items():  # corrupt tokens: named here, not as an IndexError
        top = int(tokens.max()) if len(tokens) else 0  # about 1 ms a million tokens
        if top >= n_vocab or len(index) and int((index[:, OFF] + index[:, 1:].sum(1)).max()) > len(tokens):
            raise ValueError(f"{data_dir}/{s}.tokens.npy is corrupt (token id {top}, vocabulary "
                             f"{n_vocab}; or shorter than its index); {redo}")
        longest = int((index[:, PROMPT] + index[:, [CHOSEN, REJECTED]].max(1)).max())
        if max_len and longest > max_len:
            raise ValueError(f"{data_dir}/{s} holds a pair of {longest} tokens, more than "
                             f"{max_len}; {redo} with --max_len {max_len}")
    return meta, splits


def stale(data_dir, want, explicit):
    """Why data_dir's data is not what the recipe `want` asks for, or None. In a folder the user
    named (explicit), only a changed file counts (load checks the source and the file): the
    limits and the seed are theirs."""
    try:
        with open(os.path.join(data_dir, "meta.json")) as f:
            meta = json.load(f)
    except FileNotFoundError:
        return "holds no prepared data"
    except (OSError, ValueError) as e:
        return f"holds no readable meta.json ({one_line(e, typed=True)})"
    if not isinstance(meta, dict) or "files" not in meta:
        return "holds data from an older prepare_data.py, which did not record its files"
    k = next((k for k, v in want.items() if meta.get(k) != v and not explicit), None)
    if k:
        return f"was prepared with {k} {meta.get(k)}, not {want[k]}"
    file, fp = want["file"], meta.get("file_id") or {}
    if file and file == meta.get("file") and os.path.isfile(file) and \
            fingerprint(file, fp)["sha256"] != fp.get("sha256"):
        return f"was prepared from {file} as it was before it changed"


def ensure(data_dir, source, file=None, max_len=1024, max_prompt_len=512, explicit=False):
    """load() of data_dir, prepared first if stale(). A folder the user named (explicit) is
    theirs: stale data is refused in one line, absent data is prepared only from a file."""
    want = recipe(source, file, None, None, SEED, N_TRAIN, N_VAL, max_len, max_prompt_len)
    why = stale(data_dir, want, explicit)
    if why and explicit and os.path.isfile(os.path.join(data_dir, "meta.json")):
        raise ValueError(f"{data_dir} {why}; {REDO.format(data_dir)}")
    if why and explicit and not file:  # a typo gets no new data
        raise ValueError(f"no prepared data in {data_dir} (no meta.json); prepare it with "
                         f"`python prepare_data.py --out {data_dir} ...`, or give --data_file "
                         f"to prepare it")
    if why:
        print(f"{data_dir} {why}: preparing {file or source} for pairs of {max_len} tokens")
        prepare(source, data_dir, SEED, N_TRAIN, N_VAL, max_len, max_prompt_len, file)
    return load(data_dir, source, file, max_len)


def for_run(cfg):
    """ensure()'s data for orpo.py's config cfg, and its tokenizer; or a one-line exit."""
    name = named(cfg.dataset, cfg.data_file)  # a file's data: the file's name
    d = cfg.data_dir or os.path.join("data", name)
    tok = tokenizer(name, cfg.data_file)
    try:
        n_vocab = get_encoding(tok).n_vocab if cfg.vocab_size else 0
        if cfg.vocab_size < n_vocab:
            die(f"--vocab_size={cfg.vocab_size} is below the {tok} tokenizer's {n_vocab}")
        meta, data = ensure(d, name, cfg.data_file or None, cfg.block_size + 1,
                            (cfg.block_size + 1) // 2, explicit=bool(cfg.data_dir))
        enc = get_encoding(meta["tokenizer"])
    except ValueError as e:
        die(str(e))
    except KeyboardInterrupt:
        die(f"interrupted while reading the data; {holds(d)}", 130)
    if len(data["train"][1]) < cfg.batch_size:
        die(f"{len(data['train'][1])} training pairs are fewer than --batch_size={cfg.batch_size}")
    return meta, data, enc


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--source", default="synthetic", help="synthetic (offline), hh-rlhf, "
                    "ultrafeedback; with --file: a name (default: the file's)")
    ap.add_argument("--file", help="a local .jsonl(.gz), .json or .parquet file")
    ap.add_argument("--val_file", help="held-out rows (default: --file's top tenth of usable rows)")
    ap.add_argument("--subset", help="hh-rlhf data_dir, e.g. harmless-base")
    ap.add_argument("--out", help="output folder (default data/SOURCE, or data/<file name>)")
    ap.add_argument("--seed", type=int, default=SEED, help="the synthetic rows' seed")
    ap.add_argument("--n_train", type=int, default=N_TRAIN, help="synthetic rows")
    ap.add_argument("--n_val", type=int, default=N_VAL, help="synthetic rows")
    ap.add_argument("--max_len", type=int, default=1024, help="prompt + response tokens")
    ap.add_argument("--max_prompt_len", type=int, default=512, help="below --max_len")
    a = ap.parse_args()  # its flags are prepare()'s arguments
    a.source = named(a.source, a.file)
    a.out = a.out or os.path.join("data", a.source)
    try:
        prepare(**vars(a))
    except ValueError as e:
        print(f"prepare_data: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(f"prepare_data: interrupted; {holds(a.out)}", file=sys.stderr)
        sys.exit(130)
