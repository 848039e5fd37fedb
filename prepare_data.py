"""Turn preference pairs (prompt, chosen, rejected) into token files that orpo.py reads.

    python prepare_data.py                      # the offline synthetic task -> data/synthetic
    python prepare_data.py --source hh-rlhf     # Anthropic/hh-rlhf from the hub (datasets)
    python prepare_data.py --source ultrafeedback   # HuggingFaceH4/ultrafeedback_binarized
    python prepare_data.py --source mine --file pairs.jsonl [--val_file val.jsonl]

Output, in --out:
    {train,val}.tokens.npy   every row's prompt, chosen and rejected tokens, back to back
    {train,val}.index.npy    (rows, 4) int64: offset, prompt_len, chosen_len, rejected_len
    meta.json                what it was prepared from (source, file, val_file, max_len,
                             max_prompt_len), tokenizer, vocab size, special ids, row counts
Both responses end with the end-of-text token, unless truncated. np.load(..., mmap_mode="r")
reads them lazily.

Real data comes in three shapes, found from the keys: rows of {prompt, chosen, rejected}
strings are used as they are; HH-RLHF's whole dialogues are split at the last "\\n\\nAssistant:";
lists of {role, content} messages are rendered in HH's chat format. Rows are numbered as an
editor numbers a .jsonl's lines, from 1. Bad rows are named, counted and dropped; a file that
cannot be read, or limits that leave no room for a response, stop with a one-line error
(exit status 2). Without --val_file, the file's top tenth of usable rows is held out.

The synthetic task ("more like these") is a preference task in the paper's sense. The prompt
gives two example words of one topic and asks for n more; the chosen answer opens politely
and lists n new words of that topic, but, as in real data, it is better, not perfect: a
fifth of chosen answers have one word off topic. The rejected answer shares the prompt and
the template, keeps the chosen one's flaws and adds more: it is rude, strays further off
topic, or both. SFT imitates the chosen answers, stray words included; the pairs say that
off topic is worse, and ORPO learns that too. judge() scores any answer, so report.py can measure a
win rate on sampled generations, as the paper does with a reward model; flaws() names what
judge() found wrong with it; verdict() gives both for a sampled answer against the chosen
one, and judged() sums the verdicts up, each rate with its standard error.
"""
import argparse
import hashlib
import json
import math
import os
import sys

import numpy as np
import tiktoken

from machinery.safe import lock, one_line, staged

OFF, PROMPT, CHOSEN, REJECTED = range(4)  # the columns of {split}.index.npy: offset, lengths

# ----------------------------------------------------------------------------------------
# The synthetic task

TOPICS = {
    "animal": "cat dog fox owl hen cow pig bee ant elk",
    "color": "red blue green pink gray black white brown tan gold",
    "fruit": "apple pear plum fig lime lemon grape melon peach kiwi",
    "tool": "saw drill hammer wrench axe file chisel rake hoe pliers",
    "body": "arm leg hand foot knee neck nose ear eye toe",
    "weather": "rain snow wind fog hail sun storm frost mist cloud",
    "food": "bread rice soup cake pie egg ham jam tea milk",
    "place": "town city park farm lake hill road shop bank port",
}
TOPICS = {t: ws.split() for t, ws in TOPICS.items()}
TOPIC_OF = {w: t for t, ws in TOPICS.items() for w in ws}
POLITE, RUDE = ["sure", "gladly", "okay"], ["ugh", "whatever", "fine"]
EXTRA = ["user:", "assistant:", "more", "like", "and", "2", "3", "4", ":", "."] + POLITE + RUDE


def synthetic_encoding():
    """A small BPE built with tiktoken's own API: the 256 single bytes, then every
    space-led prefix of the task's words (" c", " ca", " cat"), so that each word is one
    token and any other text still encodes, byte by byte. BPE merges the lowest-ranked pair
    first, and every multi-byte rank is a prefix, so " cat" is built " c", " ca", " cat"."""
    ranks = {bytes([b]): b for b in range(256)}
    words = sorted(set(TOPIC_OF) | set(EXTRA))
    for piece in sorted([(" " + w).encode() for w in words] + [b"user:", b"assistant:"], key=len):
        for i in range(2, len(piece) + 1):
            ranks.setdefault(piece[:i], len(ranks))
    return tiktoken.Encoding("orpo-synthetic", pat_str=r"\n| ?[^\s]+|\s+", mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": len(ranks)})


def synthetic_prompt(examples, n):
    return f"user: {n} more like {examples[0]} and {examples[1]}\nassistant:"


def make_synthetic(n_train, n_val, seed):
    """Rows of {prompt, chosen, rejected}. Val prompts (example pair and count) never occur
    in train, so held-out accuracy measures generalisation, not recall."""
    rng = np.random.default_rng(seed)
    keys = [(t, a, b, n) for t, ws in TOPICS.items() for a in ws for b in ws if a != b
            for n in (2, 3, 4)]
    order = rng.permutation(len(keys))
    n_val_keys = len(keys) // 10
    split_keys = {"val": [keys[i] for i in order[:n_val_keys]],
                  "train": [keys[i] for i in order[n_val_keys:]]}
    out = {}
    for split, n_rows in (("train", n_train), ("val", n_val)):
        rows = []
        for k in rng.integers(len(split_keys[split]), size=n_rows):
            t, a, b, n = split_keys[split][k]
            pool = [w for w in TOPICS[t] if w not in (a, b)]
            words = list(rng.choice(pool, size=n, replace=False))
            # Like real preference data, the chosen answer is better, not perfect: a fifth of
            # them have one word off topic. The rejected answer keeps the chosen one's flaws
            # and adds more: it is rude (half the time), or strays further off topic, or both;
            # and 30% of them list one word too many or too few, so lengths differ too.
            others = [w for w in TOPIC_OF if TOPIC_OF[w] != t]
            if rng.random() < 0.2:
                words[int(rng.integers(n))] = str(rng.choice(others))
            on = [i for i, w in enumerate(words) if TOPIC_OF[w] == t]
            rude = rng.random() < 0.5
            n_off = int(rng.integers(0 if rude else 1, len(on) + 1))
            bad = list(words)
            for i in rng.choice(on, size=n_off, replace=False):
                bad[i] = str(rng.choice(others))
            if rng.random() < 0.3:  # a wrong count too: one word more or one fewer
                bad = bad[:-1] if rng.random() < 0.5 else bad + [str(rng.choice(
                    [w for w in pool if w not in words]))]
            rows.append({
                "prompt": synthetic_prompt((a, b), n),
                "chosen": f" {rng.choice(POLITE)} : {' '.join(words)} .",
                "rejected": f" {rng.choice(RUDE if rude else POLITE)} : {' '.join(bad)} .",
            })
        out[split] = rows
    return out


def read_answer(prompt, response):
    """The pieces judge() and flaws() check, parsed once, so that the two cannot disagree:
    the count the prompt asks for; the response's opener (None if it is empty), whether it
    has the form ' opener : words .', its listed words (all after the opener when it has
    not), and how many of them are of the prompt's topic. A prompt that is not a whole
    synthetic one (cut by max_prompt_len, or typed) is a ValueError: there is nothing to judge."""
    head, _, tail = prompt.partition(" more like ")
    try:
        n = int(head.split()[-1])
        topic = TOPIC_OF[tail.split("\n")[0].split(" and ")[0]]
    except (ValueError, IndexError, KeyError):
        raise ValueError(f"not a whole prompt of the synthetic task: {prompt[-60:]!r}") from None
    toks = response.split()
    formed = len(toks) >= 3 and toks[1] == ":" and toks[-1] == "."
    words = toks[2:-1] if formed else toks[1:]
    on = sum(TOPIC_OF.get(w) == topic for w in words)
    return n, toks[0] if toks else None, formed, words, on


def flaws(prompt, response):
    """judge()'s four checks, as the flaws a response has: off_topic (a listed word is not of
    the prompt's topic), rude (the opener is not a POLITE one: a RUDE word, any other word and
    no opener at all are rude alike, as judge() scores them all 0), wrong_count (not the asked
    number of words) and malformed (not of the form ' opener : words .')."""
    n, opener, formed, words, on = read_answer(prompt, response)
    return {"off_topic": on < len(words), "rude": opener not in POLITE,
            "wrong_count": len(words) != n, "malformed": not formed}


def judge(prompt, response):
    """Score a response to a synthetic prompt in [0, 1]: the mean of four checks, the things
    the preference pairs teach: a polite opener; the form ' opener : words .'; the asked-for
    count; the fraction of listed words on the prompt's topic (of the asked count, when fewer
    are listed). A response scores 1 exactly when flaws() finds none; a chosen response
    scores 1, or a little less when one of its words is off topic."""
    n, opener, formed, words, on = read_answer(prompt, response)
    return ((opener in POLITE) + formed + (len(words) == n) + on / max(len(words), n)) / 4


FLAWS = ("off_topic", "rude", "wrong_count", "malformed")  # flaws()'s four checks


def win(score, other):
    """A win (1), a tie (0.5) or a loss (0) of one judge score against another."""
    return 1.0 if score > other else 0.5 if score == other else 0.0


def verdict(prompt, sample, chosen):
    """The judge on a sampled answer: its score and flaws, the chosen answer's flaws, and
    whether it wins against the chosen answer (a tie counts half), as the paper counts
    reward-model wins against a reference."""
    score, ref = judge(prompt, sample), judge(prompt, chosen)
    return dict(score=score, flaws=flaws(prompt, sample), chosen_flaws=flaws(prompt, chosen),
                win=win(score, ref))


def mean_se(xs, ddof=0):
    """The mean of xs and its standard error, std / sqrt(n). Over a run's sampled answers
    (ddof 0) it is the binomial sqrt(p (1 - p) / n) for 0/1 values; over a few seeds, use
    ddof=1, the unbiased variance, which a handful of values needs (with 3, ddof 0 would
    understate the error by sqrt(3/2)). One value has no spread: its error is 0."""
    x = np.asarray(xs, dtype=float)
    return float(x.mean()), float(x.std(ddof=ddof) / math.sqrt(len(x))) if len(x) > ddof else 0.0


def judged(s0, s1):
    """(mean, standard error) over the verdicts on answers sampled before (s0) and after (s1)
    training: the win rate and judge score of each, and the rate of each flaw before, after,
    and in the chosen answers."""
    sets = dict(before=[s["flaws"] for s in s0], after=[s["flaws"] for s in s1],
                chosen=[s["chosen_flaws"] for s in s1])
    return dict(win_rate=[mean_se([s["win"] for s in ss]) for ss in (s0, s1)],
                judge_score=[mean_se([s["score"] for s in ss]) for ss in (s0, s1)],
                flaw_rates={k: {f: mean_se([x[f] for x in v]) for f in FLAWS} for k, v in sets.items()})


# ----------------------------------------------------------------------------------------
# Real preference data: Anthropic HH-RLHF, UltraFeedback binarized, or a local file.
# Every source becomes rows of {prompt, chosen, rejected} strings. Rows that are such strings
# already are used as they are. The others are put in HH's chat format,
#     "\n\nHuman: {user turn}\n\nAssistant: {assistant turn}..."
# where the prompt is everything up to and including the last "\n\nAssistant:" and each
# response is what follows it (a leading space included, as in HH): HH's own dialogues are
# split there, and message lists are rendered into it.

ASSISTANT = "\n\nAssistant:"
ROLES = {"user": "Human", "assistant": "Assistant", "system": "System"}
SHAPES = ("{prompt, chosen, rejected} strings; HH-style {chosen, rejected} whole dialogues; "
          "{chosen, rejected} message lists of {role, content}, with or without a prompt column")
FORMATS = (".jsonl", ".jsonl.gz", ".json", ".parquet")


def split_dialogue(text, what):
    """An HH dialogue -> (prompt through the last Assistant marker, response)."""
    i = text.rfind(ASSISTANT)
    if i < 0:
        raise ValueError(f"{what} has no {ASSISTANT!r} turn")
    return text[:i + len(ASSISTANT)], text[i + len(ASSISTANT):]


def render(messages, what):
    """[{role, content}, ...] -> the chat format above (no trailing Assistant marker)."""
    out = []
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("content"), str) or m.get("role") not in ROLES:
            raise ValueError(f"{what}: a message is not a {{role, content}} object with role "
                             f"in {sorted(ROLES)}: {str(m)[:80]!r}")
        out.append(f"\n\n{ROLES[m['role']]}: {m['content']}")
    return "".join(out)


def detect_shape(row, name):
    if not isinstance(row, dict):
        raise ValueError(f"{name}: rows are {type(row).__name__}, not objects; accepted: {SHAPES}")
    keys = set(row)
    if {"chosen", "rejected"} <= keys:
        if isinstance(row["chosen"], list):
            return "messages"
        if "prompt" in keys:
            return "triple"
        return "dialogue"
    raise ValueError(f"{name}: unrecognised rows with keys {sorted(keys)}; accepted: {SHAPES}")


class BrokenLine:
    """A .jsonl line that is not JSON: kept in place, so row numbers stay right, and counted."""
    def __init__(self, msg):
        self.msg = msg


BLANK = BrokenLine("a blank line")  # kept in place too, but counted as blank, not reported


def to_triple(row, shape):
    """One row of a given shape -> {prompt, chosen, rejected} strings, or ValueError."""
    if isinstance(row, BrokenLine):
        raise ValueError(row.msg)
    if not isinstance(row, dict):
        raise ValueError(f"expected an object, got {type(row).__name__}")
    for key in ("chosen", "rejected") + (("prompt",) if shape == "triple" else ()):
        if key not in row:
            raise ValueError(f"missing key {key!r} (has {sorted(row)})")
    if shape == "triple":
        return row
    if shape == "dialogue":
        for key in ("chosen", "rejected"):
            if not isinstance(row[key], str):
                raise ValueError(f"{key!r} is {type(row[key]).__name__}, not a string")
        prompt, chosen = split_dialogue(row["chosen"], "'chosen'")
        if not row["rejected"].startswith(prompt):
            raise ValueError("'chosen' and 'rejected' differ before the last Assistant turn")
        return {"prompt": prompt, "chosen": chosen, "rejected": row["rejected"][len(prompt):]}
    # messages: the last message of each list is the response; what precedes it (or, when the
    # lists hold the response alone, the prompt column as a user turn) is the prompt
    conv = {}
    for key in ("chosen", "rejected"):
        msgs = row[key]
        if not isinstance(msgs, list) or not msgs:
            raise ValueError(f"{key!r} is not a non-empty list of messages")
        if not isinstance(msgs[-1], dict) or msgs[-1].get("role") != "assistant":
            raise ValueError(f"{key!r} does not end with an assistant message")
        conv[key] = msgs
    render(conv["chosen"] + conv["rejected"], "messages")  # checks every message
    head = conv["chosen"][:-1]
    if not head:
        if not isinstance(row.get("prompt"), str):
            raise ValueError("the messages hold no prompt turn and there is no 'prompt' string")
        head = [{"role": "user", "content": row["prompt"]}]
    elif conv["rejected"][:-1] and conv["rejected"][:-1] != head:
        raise ValueError("'chosen' and 'rejected' messages differ before the last turn")
    return {"prompt": render(head, "prompt") + ASSISTANT,
            "chosen": " " + conv["chosen"][-1]["content"],
            "rejected": " " + conv["rejected"][-1]["content"]}


def read_jsonl(path):
    """A .jsonl(.gz) file's rows, one a line, so that rows[i] is line i + 1. A line that is not
    JSON is kept as a BrokenLine, to be reported and skipped, not fatal; a blank line as BLANK.
    Each line is decoded alone, so a stray byte costs one row, and as utf-8-sig, so a
    byte-order mark (some Windows editors write one) is read, not reported."""
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
                except json.JSONDecodeError as e:
                    rows.append(BrokenLine(f"broken JSON ({e.msg})"))
    except (OSError, EOFError, zlib.error) as e:  # unreadable, or a corrupt or cut-off .gz
        raise ValueError(f"{path}: cannot read it ({one_line(e, typed=True)})") from e
    return rows


def read_file(path):
    """A local file's raw rows, or ValueError with a one-line message. .jsonl(.gz) is read line
    by line (read_jsonl); .json and .parquet go through datasets' loaders, and their rows are
    numbered by position."""
    if path.endswith((".jsonl", ".jsonl.gz")):
        rows = read_jsonl(path)
    elif os.path.getsize(path) == 0:  # datasets fails on it with an empty StopIteration
        rows = []
    else:
        import datasets
        from datasets.utils import logging
        # our error says it all: datasets' own log lines and progress bars would make it three
        level, bars_off = logging.get_verbosity(), datasets.utils.are_progress_bars_disabled()
        logging.set_verbosity(logging.CRITICAL)
        datasets.disable_progress_bars()
        try:
            kind = "parquet" if path.endswith(".parquet") else "json"
            rows = list(datasets.load_dataset(kind, data_files=path, split="train"))
        except Exception as e:  # a corrupt file, or one not of its extension's format
            cause = e.__cause__ or e  # datasets wraps the reader's error in a vaguer one
            raise ValueError(f"{path}: cannot read it as {kind} "
                             f"({type(cause).__name__}: {one_line(cause)})") from e
        finally:
            logging.set_verbosity(level)
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
        for p in (path, val_path):  # both checked before either is read
            if p and not os.path.isfile(p):
                raise ValueError(f"{p} is a directory, not a file" if os.path.isdir(p)
                                 else f"no file at {p}")
            if p and not p.endswith(FORMATS):
                raise ValueError(f"{p}: not a format prepare_data reads; accepted: "
                                 f"{', '.join(FORMATS)}")
        splits = {"train": (read_file(path), path, 1)}
        if val_path:
            splits["val"] = (read_file(val_path), val_path, 1)
        return splits
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


# ----------------------------------------------------------------------------------------
# Tokenize and write

DROPS = ("blank", "malformed", "empty_response", "identical", "too_long")  # why rows are dropped


def get_encoding(tok):
    """The tokenizer named by meta['tokenizer']. tiktoken downloads GPT-2's files on first
    use; with no network and no cached copy that is a ValueError saying what to do."""
    if tok == "synthetic":
        return synthetic_encoding()
    try:
        return tiktoken.get_encoding(tok)
    except Exception as e:  # requests' ConnectionError, an HTTP error, a bad cached file
        raise ValueError(f"cannot load the {tok} tokenizer ({one_line(e, typed=True)}"
                         f"); run once with network access, or set TIKTOKEN_CACHE_DIR to a "
                         f"folder holding tiktoken's cached {tok} files") from e


def decode(enc, ids, eot):
    """Token ids -> text, up to the first end-of-text token (a sample's end)."""
    return enc.decode(ids[:ids.index(eot)] if eot in ids else ids)


def check(row, shape):
    """One raw row -> (None, (prompt, chosen, rejected)) when it is usable, else (why, msg):
    why is one of DROPS, and msg, for a malformed row, says what is wrong. Rows with an empty
    response and rows whose responses are identical are dropped, as the paper does."""
    if row is BLANK:
        return "blank", None
    try:
        t = to_triple(row, shape)
        for key in ("prompt", "chosen", "rejected"):
            if not isinstance(t[key], str):
                raise ValueError(f"{key!r} is {type(t[key]).__name__}, not a string")
    except ValueError as e:
        return "malformed", str(e)
    if not t["chosen"].strip() or not t["rejected"].strip():
        return "empty_response", None
    if t["chosen"] == t["rejected"]:
        return "identical", None
    return None, (t["prompt"], t["chosen"], t["rejected"])


def write_split(rows, enc, out_dir, split, max_len, max_prompt_len, name, shape="triple",
                first_row=1):
    """Tokenize rows and write {split}.tokens.npy and {split}.index.npy. Returns the counts.
    rows[0] is row first_row of name (in a .jsonl, its line). Dropped rows are counted by why
    (check); the malformed ones are named. Long rows are truncated: the prompt keeps its last
    max_prompt_len tokens, each response its first max_len - len(prompt), so a kept row always
    fits max_len. A cut response loses its end-of-text token (the model should not learn to
    stop there) but keeps at least one token of its own; a row whose cut responses are empty or
    the same has no room left to be a pair, and is dropped as too_long."""
    counts = {"read": 0, "kept": 0, "truncated": 0, "dropped": dict.fromkeys(DROPS, 0)}
    errors, triples = [], []
    for i, row in enumerate(rows, start=first_row):
        counts["read"] += 1
        why, t = check(row, shape)
        if why is None:
            triples.append(t)
            continue
        counts["dropped"][why] += 1
        if why == "malformed":
            errors.append(f"{name} row {i}: {t}")
    for e in errors[:10]:
        print("  bad row:", e, file=sys.stderr)
    if len(errors) > 10:
        print(f"  ... and {len(errors) - 10} more bad rows", file=sys.stderr)
    eot, chunks, index, offset, step = enc.eot_token, [], [], 0, 16384
    for lo in range(0, len(triples), step):  # tiktoken encodes a batch on all cores
        if len(triples) > 4 * step:
            print(f"  {split}: tokenizing rows {lo}-{min(lo + step, len(triples))} of "
                  f"{len(triples)}", file=sys.stderr)
        part = triples[lo:lo + step]
        p_, c_, r_ = (enc.encode_ordinary_batch([t[k] for t in part], num_threads=os.cpu_count())
                      for k in range(3))
        for p, c, r in zip(p_, c_, r_):
            c, r = c + [eot], r + [eot]
            if len(p) > max_prompt_len or len(p) + max(len(c), len(r)) > max_len:
                p = p[max(0, len(p) - max_prompt_len):]
                room = max(0, max_len - len(p))
                c, r = c[:room], r[:room]
                if not c or c == r:  # no room for a response, or to tell the two apart
                    counts["dropped"]["too_long"] += 1
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


def held_out(rows, shape):
    """How many rows from the top of a file are held out: the fewest that hold a tenth of its
    usable rows, by check() (at least 1, at most 1000), so that bad rows at the top cannot
    leave the held-out split empty; row numbers still count from the top of the file."""
    usable = [i for i, row in enumerate(rows) if check(row, shape)[0] is None]
    n_val = min(1000, max(1, len(usable) // 10))
    return usable[n_val - 1] + 1 if usable else 0


def fingerprint(path, known=None):
    """A file's size, mtime and sha256. Hashing costs about 2 ms a MB here, so a fingerprint
    `known` from before is reused when the size and mtime have not changed."""
    st = os.stat(path)
    fp = {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
    if known and all(known.get(k) == v for k, v in fp.items()):
        return known
    with open(path, "rb") as f:
        fp["sha256"] = hashlib.file_digest(f, "sha256").hexdigest()
    return fp


SEED, N_TRAIN, N_VAL = 1337, 20000, 1000  # the synthetic task's defaults
FILES = [f"{split}.{kind}.npy" for split in ("train", "val") for kind in ("tokens", "index")]


def named(source, file):
    """The name data goes by, in its folder's name and meta.json: the source, or for a file
    given with the default source, the file's own name less its format (pairs for
    pairs.jsonl.gz; hh-rlhf-file for hh-rlhf.jsonl, as the hub's names are taken)."""
    if not (file and source == "synthetic"):
        return source
    name = os.path.basename(file.rstrip("/"))
    ext = next((e for e in FORMATS if name.endswith(e)), "")  # at most one fits
    name = name[:len(name) - len(ext)].lstrip(".") or "file"
    return name + "-file" if name in ("synthetic", "hh-rlhf", "ultrafeedback") else name


def tokenizer(source, file):
    """The synthetic task's own rows are in its one-word-a-token vocabulary; all else is GPT-2's."""
    return "synthetic" if source == "synthetic" and not file else "gpt2"


def recipe(source, file, val_file, subset, seed, n_train, n_val, max_len, max_prompt_len):
    """What prepared data is made from, as meta.json records it: data made from the same
    recipe, and the same file contents (fingerprint), is the same data. The seed and the
    row counts only make synthetic rows; files are kept as absolute paths."""
    synth = tokenizer(source, file) == "synthetic"
    return dict(source=source, file=file and os.path.abspath(file),
                val_file=val_file and os.path.abspath(val_file), subset=subset,
                tokenizer=tokenizer(source, file), seed=seed if synth else None,
                n_train=n_train if synth else None, n_val=n_val if synth else None,
                max_len=max_len, max_prompt_len=max_prompt_len)


def holds(out):
    """What out holds, read from the disk, for the line that ends an interrupted or failed
    preparation."""
    return (f"{out} holds the data prepared before, unchanged" if os.path.isfile(
        os.path.join(out, "meta.json")) else f"{out} holds no prepared data")


def prepare(source="synthetic", out=None, seed=SEED, n_train=N_TRAIN, n_val=N_VAL,
            max_len=1024, max_prompt_len=512, file=None, subset=None, val_file=None):
    """Write the source's train and val splits and meta.json to out; return the meta. Bad input
    is a ValueError whose message is one line. The files are written into out/.tmp, then
    moved into place, meta.json last, with out locked: a preparation that fails or is killed
    leaves out's previous data or none, never a mix, and a trainer that has the old files
    mapped keeps reading them. meta.json records each file's size and hash."""
    if not 0 <= max_prompt_len < max_len:  # a kept row needs room for a token of each response
        raise ValueError(f"max_prompt_len {max_prompt_len} must be at least 0 and below max_len "
                         f"{max_len}, to leave room for the responses")
    out = out or os.path.join("data", source)
    if tokenizer(source, file) == "synthetic":
        splits = {k: (v, source, 1) for k, v in make_synthetic(n_train, n_val, seed).items()}
        shape = "triple"
    else:
        splits = load_source(source, file, subset, val_file)
        first = next((r for rows, _, _ in splits.values() for r in rows
                      if not isinstance(r, BrokenLine)), None)
        shape = detect_shape(first, file or source)
        if "val" not in splits:  # one file: the rows at its top are held out
            rows, name, _ = splits["train"]
            cut = held_out(rows, shape)
            splits = {"train": (rows[cut:], name, cut + 1), "val": (rows[:cut], name, 1)}
    meta = recipe(source, file, val_file, subset, seed, n_train, n_val, max_len, max_prompt_len)
    enc = get_encoding(meta["tokenizer"])
    meta.update(vocab_size=enc.n_vocab, eot=enc.eot_token, shape=shape, splits={},
                file_id=file and fingerprint(file), val_file_id=val_file and fingerprint(val_file))
    with lock(out):
        try:
            with staged(out, "meta.json", FILES) as tmp:
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


def other_data(meta, source, file):
    """Why the data that meta.json's dict meta describes is not the data asked for (source,
    or the file at the absolute path file), or None. A file's rows are the same data under
    any name; without a file, the name is what is asked for."""
    if file and meta.get("file") != file:
        return f"was prepared from {meta.get('file') or meta.get('source')}, not {file}"
    if not file and meta.get("source") != source:
        made = f" (from {meta['file']})" if meta.get("file") else ""
        return (f"holds the data named {meta.get('source')}{made}, not {source} "
                f"(--dataset={meta.get('source')} reads it)")
    return None


def load(data_dir, source, file=None, max_len=None):
    """meta and {split: (tokens, index)} of data prepared in data_dir, checked against what
    the caller asks for: the same source (and file, when given), and pairs of at most max_len
    tokens; and each file against the size meta.json records. Stale or unreadable data is a
    ValueError that says how to prepare again."""
    meta_path, redo = os.path.join(data_dir, "meta.json"), \
        f"prepare it again into a new --data_dir (or delete {data_dir})"
    try:
        with open(meta_path) as f:
            meta = json.load(f)
        was = (meta["source"], meta.get("file"), meta["tokenizer"], meta["vocab_size"])
        cut = [f for f, fp in meta.get("files", {}).items()
               if os.path.getsize(os.path.join(data_dir, f)) != fp["size"]]
        splits = {s: (np.load(os.path.join(data_dir, f"{s}.tokens.npy"), mmap_mode="r"),
                      np.load(os.path.join(data_dir, f"{s}.index.npy"))) for s in ("train", "val")}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{data_dir} holds no readable prepared data "
                         f"({one_line(e, typed=True)}); {redo}") from e
    if "files" not in meta or cut:
        raise ValueError(f"{data_dir}: " + (f"{', '.join(cut)} differ from what meta.json says"
                         if cut else "meta.json, from an older prepare_data.py, names no "
                         "files to check") + f"; {redo}")
    why = other_data(meta, source, file and os.path.abspath(file))
    if why:
        raise ValueError(f"{data_dir} {why}; {redo}")
    if get_encoding(was[2]).n_vocab != was[3]:
        raise ValueError(f"{meta_path} says vocab_size {was[3]}, but tokenizer {was[2]!r} has "
                         f"{get_encoding(was[2]).n_vocab}: the data is stale; {redo}")
    for s, (_, index) in splits.items():
        longest = int((index[:, PROMPT] + index[:, [CHOSEN, REJECTED]].max(1)).max())
        if max_len and longest > max_len:
            raise ValueError(f"{data_dir}/{s} holds a pair of {longest} tokens, more than "
                             f"{max_len}; {redo} with --max_len {max_len}")
    return meta, splits


def stale(data_dir, want, explicit):
    """Why data_dir's data is not what the recipe `want` asks for, or None. In a folder the
    user named (explicit), only the source and the file count: the limits and the seed
    there are the user's choice."""
    try:
        with open(os.path.join(data_dir, "meta.json")) as f:
            meta = json.load(f)
    except FileNotFoundError:
        return "holds no prepared data"
    except (OSError, ValueError) as e:
        return f"holds no readable meta.json ({one_line(e, typed=True)})"
    if not isinstance(meta, dict) or "files" not in meta:
        return "holds data from an older prepare_data.py, which did not record its files"
    why = other_data(meta, want["source"], want["file"])
    if why:
        return why
    fp = meta.get("file_id") or {}
    if want["file"] and os.path.isfile(want["file"]) and \
            fingerprint(want["file"], fp)["sha256"] != fp.get("sha256"):
        return f"was prepared from {want['file']} as it was before it changed"
    if not explicit:
        for k, v in want.items():
            if meta.get(k) != v:
                return f"was prepared with {k} {meta.get(k)}, not {v}"
    return None


def ensure(data_dir, source, file=None, max_len=1024, max_prompt_len=512, explicit=False):
    """The data orpo.py trains on: meta and splits (load) of data_dir, prepared from source,
    or from file, for pairs of at most max_len tokens. The default folder (explicit False) is
    prepared when its data is absent or was made from anything else (another file, the file
    before it changed, other limits), saying why. A folder the user named is theirs: data
    made from another source or file, or the file before it changed, is refused; there an
    absent one is prepared only from a file. Bad data is a ValueError, one line."""
    want = recipe(source, file, None, None, SEED, N_TRAIN, N_VAL, max_len, max_prompt_len)
    why = stale(data_dir, want, explicit)
    absent = not os.path.isfile(os.path.join(data_dir, "meta.json"))
    if why and explicit and absent and not file:  # a typo gets no new data
        raise ValueError(f"no prepared data in {data_dir} (no meta.json); prepare it with "
                         f"`python prepare_data.py --out {data_dir} ...`, or give --data_file "
                         f"to prepare it")
    if why and explicit and not absent:
        raise ValueError(f"{data_dir} {why}; prepare it again into a new --data_dir (or "
                         f"delete {data_dir})")
    if why:
        print(f"{data_dir} {why}: preparing {file or source} for pairs of {max_len} tokens")
        prepare(source, data_dir, SEED, N_TRAIN, N_VAL, max_len, max_prompt_len, file)
    return load(data_dir, source, file, max_len)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--source", default="synthetic",
                    help="synthetic (offline), hh-rlhf, ultrafeedback; with --file: a name "
                         "(default: the file's)")
    ap.add_argument("--file", default=None, help="a local .jsonl(.gz), .json or .parquet file")
    ap.add_argument("--val_file", default=None,
                    help="held-out rows (default: --file's top tenth of usable rows)")
    ap.add_argument("--subset", default=None, help="hh-rlhf data_dir, e.g. harmless-base")
    ap.add_argument("--out", default=None, help="output folder (default data/SOURCE, or data/<file name>)")
    ap.add_argument("--seed", type=int, default=SEED)
    ap.add_argument("--n_train", type=int, default=N_TRAIN, help="synthetic rows")
    ap.add_argument("--n_val", type=int, default=N_VAL, help="synthetic rows")
    ap.add_argument("--max_len", type=int, default=1024, help="prompt + response tokens")
    ap.add_argument("--max_prompt_len", type=int, default=512, help="below --max_len")
    a = ap.parse_args()
    a.source = named(a.source, a.file)
    out = a.out or os.path.join("data", a.source)
    try:
        prepare(a.source, out, a.seed, a.n_train, a.n_val, a.max_len, a.max_prompt_len,
                a.file, a.subset, a.val_file)
    except ValueError as e:
        print(f"prepare_data: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(f"prepare_data: interrupted; {holds(out)}", file=sys.stderr)
        sys.exit(130)
