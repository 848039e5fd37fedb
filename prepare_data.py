"""Turn preference pairs (prompt, chosen, rejected) into token files that orpo.py reads.

    python prepare_data.py                      # the offline synthetic task -> data/synthetic

Output, in --out:
    {train,val}.tokens.npy   every row's prompt, chosen and rejected tokens, back to back
    {train,val}.index.npy    (rows, 4) int64: offset, prompt_len, chosen_len, rejected_len
    meta.json                tokenizer, vocab size, special ids, and the row counts
Both responses end with the end-of-text token. np.load(..., mmap_mode="r") reads them lazily.

The synthetic task ("more like these") is a preference task in the paper's sense. The prompt
gives two example words of one topic and asks for n more; the chosen answer lists n new
on-topic words and mostly opens politely; the rejected answer shares the prompt and the
template but has the chosen one's flaws and more: it is rude, or strays off topic, or both.
Since 15% of chosen answers are rude, SFT learns to be rude 15% of the time; the pairs say
that rude is worse, and ORPO can learn that too. judge() scores any answer, so orpo.py can measure a
win rate on sampled generations, as the paper does with a reward model.
"""
import argparse
import json
import os
import sys

import numpy as np
import tiktoken

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
            # Like real preference data, the chosen answer is better, not perfect: now and
            # then it is rude. The rejected answer has the chosen one's flaws and more.
            chosen_rude = rng.random() < 0.15
            bad = list(words)
            n_off = int(rng.integers(int(chosen_rude), n + 1))  # words that stray off topic
            others = [w for w in TOPIC_OF if TOPIC_OF[w] != t]
            for i in rng.choice(n, size=n_off, replace=False):
                bad[i] = str(rng.choice(others))
            rude = chosen_rude or n_off == 0 or rng.random() < 0.5  # at least one new flaw
            rows.append({
                "prompt": synthetic_prompt((a, b), n),
                "chosen": f" {rng.choice(RUDE if chosen_rude else POLITE)} : {' '.join(words)} .",
                "rejected": f" {rng.choice(RUDE if rude else POLITE)} : {' '.join(bad)} .",
            })
        out[split] = rows
    return out


def judge(prompt, response):
    """Score a response to a synthetic prompt in [0, 1]: the mean of four checks, the things
    the preference pairs teach: a polite opener; the form ' opener : words .'; the asked-for
    count; the fraction of listed words on the prompt's topic. A chosen response scores 1,
    or 0.75 when it is rude."""
    head, _, tail = prompt.partition(" more like ")
    n = int(head.split()[-1])
    topic = TOPIC_OF[tail.split("\n")[0].split(" and ")[0]]
    toks = response.split()
    polite = float(bool(toks) and toks[0] in POLITE)
    formed = float(len(toks) >= 3 and toks[1] == ":" and toks[-1] == ".")
    words = toks[2:-1] if formed else toks[1:]
    count = float(len(words) == n)
    on_topic = sum(TOPIC_OF.get(w) == topic for w in words) / max(len(words), n)
    return (polite + formed + count + on_topic) / 4


# ----------------------------------------------------------------------------------------
# Tokenize and write

def get_encoding(tok):
    """The tokenizer named by meta['tokenizer']."""
    return synthetic_encoding() if tok == "synthetic" else tiktoken.get_encoding(tok)


def check_row(row, i, name):
    """Return (prompt, chosen, rejected) strings, or raise ValueError naming the row."""
    if not isinstance(row, dict):
        raise ValueError(f"{name} row {i}: expected an object, got {type(row).__name__}")
    for key in ("prompt", "chosen", "rejected"):
        if key not in row:
            raise ValueError(f"{name} row {i}: missing key {key!r} (has {sorted(row)})")
        if not isinstance(row[key], str):
            raise ValueError(f"{name} row {i}: {key!r} is {type(row[key]).__name__}, not a string")
    return row["prompt"], row["chosen"], row["rejected"]


def write_split(rows, enc, out_dir, split, max_len, max_prompt_len, name):
    """Tokenize rows and write {split}.tokens.npy and {split}.index.npy. Returns the counts.
    Rows that are malformed, have an empty response or identical responses are dropped and
    counted; long rows are truncated (the prompt keeps its end, each response its start)."""
    eot = enc.eot_token
    counts = {"read": 0, "kept": 0, "truncated": 0,
              "dropped": {"malformed": 0, "empty_response": 0, "identical": 0}}
    errors, chunks, index, offset = [], [], [], 0
    for i, row in enumerate(rows):
        counts["read"] += 1
        try:
            prompt, chosen, rejected = check_row(row, i, name)
        except ValueError as e:
            counts["dropped"]["malformed"] += 1
            errors.append(str(e))
            continue
        if not chosen.strip() or not rejected.strip():
            counts["dropped"]["empty_response"] += 1
            continue
        if chosen == rejected:
            counts["dropped"]["identical"] += 1
            continue
        p = enc.encode_ordinary(prompt)
        c, r = enc.encode_ordinary(chosen) + [eot], enc.encode_ordinary(rejected) + [eot]
        if len(p) > max_prompt_len or len(p) + max(len(c), len(r)) > max_len:
            counts["truncated"] += 1
            p = p[len(p) - min(len(p), max_prompt_len):]
            c, r = c[:max_len - len(p)], r[:max_len - len(p)]
        chunks.append(np.array(p + c + r, dtype=np.int64))
        index.append((offset, len(p), len(c), len(r)))
        offset += len(p) + len(c) + len(r)
        counts["kept"] += 1
    if counts["kept"] == 0:
        raise ValueError(f"{name}: no usable rows in split {split!r} ({counts})")
    dtype = np.uint16 if enc.n_vocab <= 2**16 else np.uint32  # smallest type for the vocab
    np.save(os.path.join(out_dir, f"{split}.tokens.npy"), np.concatenate(chunks).astype(dtype))
    np.save(os.path.join(out_dir, f"{split}.index.npy"), np.array(index, dtype=np.int64))
    for e in errors[:10]:
        print("  bad row:", e, file=sys.stderr)
    if len(errors) > 10:
        print(f"  ... and {len(errors) - 10} more bad rows", file=sys.stderr)
    return counts


def prepare(source="synthetic", out=None, seed=1337, n_train=20000, n_val=500,
            max_len=1024, max_prompt_len=512):
    out = out or os.path.join("data", source)
    os.makedirs(out, exist_ok=True)
    if source != "synthetic":
        raise ValueError(f"unknown source {source!r}; known: synthetic")
    splits, tok = make_synthetic(n_train, n_val, seed), "synthetic"
    enc = get_encoding(tok)
    meta = {"source": source, "tokenizer": tok, "vocab_size": enc.n_vocab, "eot": enc.eot_token,
            "max_len": max_len, "max_prompt_len": max_prompt_len, "seed": seed, "splits": {}}
    for split, rows in splits.items():
        meta["splits"][split] = write_split(rows, enc, out, split, max_len, max_prompt_len, source)
    tmp = os.path.join(out, "meta.json.tmp")
    with open(tmp, "w") as f:
        json.dump(meta, f, indent=1)
    os.replace(tmp, os.path.join(out, "meta.json"))  # meta last: its presence means "complete"
    for split, c in meta["splits"].items():
        print(f"{out}/{split}: read {c['read']}, kept {c['kept']}, truncated {c['truncated']}, "
              f"dropped {c['dropped']}")
    return meta


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--source", default="synthetic")
    ap.add_argument("--out", default=None, help="output folder (default data/SOURCE)")
    ap.add_argument("--seed", type=int, default=1337)
    ap.add_argument("--n_train", type=int, default=20000)
    ap.add_argument("--n_val", type=int, default=500)
    ap.add_argument("--max_len", type=int, default=1024)
    ap.add_argument("--max_prompt_len", type=int, default=512)
    a = ap.parse_args()
    try:
        prepare(a.source, a.out, a.seed, a.n_train, a.n_val, a.max_len, a.max_prompt_len)
    except ValueError as e:
        sys.exit(f"prepare_data: {e}")
