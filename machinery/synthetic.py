"""The synthetic task ("more like these"), whose rows prepare_data.py makes offline, and its judge.

A preference task in the paper's sense: the prompt gives two example words of one topic and
asks for n more; the chosen answer opens politely and lists n new words of that topic, but,
as in real data, a fifth of them have one word off topic. The rejected answer keeps the
chosen one's flaws and adds more: it is rude, strays further off topic, or both. SFT
imitates the chosen answers, stray words included; the pairs say that off topic is worse,
and ORPO learns that too. judge() scores any answer, so report.py can measure a win rate, as
the paper does with a reward model.
"""
import math

import numpy as np
import tiktoken

SEED, N_TRAIN, N_VAL = 1337, 20000, 1000  # the task's defaults: prepare_data.py's too

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
    """A small BPE built with tiktoken's own API: the 256 single bytes, then every space-led
    prefix of the task's words, so that each word is one token and any other text still
    encodes. BPE merges the lowest-ranked pair first, so " cat" is built " c", " ca", " cat"."""
    ranks = {bytes([b]): b for b in range(256)}
    words = sorted(set(TOPIC_OF) | set(EXTRA))
    for piece in sorted([(" " + w).encode() for w in words] + [b"user:", b"assistant:"], key=len):
        for i in range(2, len(piece) + 1):
            ranks.setdefault(piece[:i], len(ranks))
    return tiktoken.Encoding("orpo-synthetic", pat_str=r"\n| ?[^\s]+|\s+", mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": len(ranks)})


def make_synthetic(n_train, n_val, seed):
    """Val prompts (pair and count) are not in train: val tests generalisation, not recall."""
    rng = np.random.default_rng(seed)
    one = lambda xs: xs[rng.choice(len(xs))]  # by index: numpy can lose a Ctrl-C converting strs
    keys = [(t, a, b, n) for t, ws in TOPICS.items() for a in ws for b in ws if a != b
            for n in (2, 3, 4)]
    keys, n_val_keys = [keys[i] for i in rng.permutation(len(keys))], len(keys) // 10
    split_keys = {"val": keys[:n_val_keys], "train": keys[n_val_keys:]}
    out = {"train": [], "val": []}
    for split, n_rows in (("train", n_train), ("val", n_val)):
        for k in rng.integers(len(split_keys[split]), size=n_rows):
            t, a, b, n = split_keys[split][k]
            pool = [w for w in TOPICS[t] if w not in (a, b)]
            words = [pool[i] for i in rng.choice(len(pool), size=n, replace=False)]
            others = [w for w in TOPIC_OF if TOPIC_OF[w] != t]
            if rng.random() < 0.2:  # the chosen answer is better, not perfect
                words[int(rng.integers(n))] = one(others)
            on = [i for i, w in enumerate(words) if TOPIC_OF[w] == t]
            rude = rng.random() < 0.5  # the rejected one: rude, further off topic, or both
            n_off = int(rng.integers(0 if rude else 1, len(on) + 1))
            bad = list(words)
            for j in rng.choice(len(on), size=n_off, replace=False):
                bad[on[j]] = one(others)
            if rng.random() < 0.3:  # a wrong count too (lengths differ): one word more or fewer
                bad = bad[:-1] if rng.random() < 0.5 else bad + [one([w for w in pool if w not in words])]
            out[split].append(dict(prompt=f"user: {n} more like {a} and {b}\nassistant:",
                                   chosen=f" {one(POLITE)} : {' '.join(words)} .",
                                   rejected=f" {one(RUDE if rude else POLITE)} : {' '.join(bad)} ."))
    return out


def read_answer(prompt, response):
    """What judge() and flaws() check, parsed once so that they cannot disagree: (asked count,
    opener or None, has the form ' opener : words .', listed words, how many are on topic).
    A prompt that is not a whole synthetic one (cut short, or typed) is a ValueError."""
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


FLAWS = ("off_topic", "rude", "wrong_count", "malformed")  # flaws()'s four checks


def flaws(prompt, response):
    """judge()'s four checks in FLAWS' order; rude: no POLITE opener, as judge() scores it."""
    n, opener, formed, words, on = read_answer(prompt, response)
    return {"off_topic": on < len(words),    # a listed word of another topic
            "rude": opener not in POLITE,
            "wrong_count": len(words) != n,  # not the asked number of words
            "malformed": not formed}         # not of the form ' opener : words .'


def judge(prompt, response):
    """A response's score in [0, 1], the mean of the four checks the pairs teach: 1 exactly when
    flaws() finds none; a chosen response scores 1, or a little less when a word is off topic."""
    n, opener, formed, words, on = read_answer(prompt, response)
    return ((opener in POLITE) + formed + (len(words) == n) + on / max(len(words), n)) / 4


def win(score, other):
    return 1.0 if score > other else 0.5 if score == other else 0.0


def verdict(prompt, sample, chosen):
    """A sample against the chosen answer, judged as the paper counts reward-model wins."""
    score, ref = judge(prompt, sample), judge(prompt, chosen)
    return dict(score=score, flaws=flaws(prompt, sample), chosen_flaws=flaws(prompt, chosen),
                win=win(score, ref))


def mean_se(xs, ddof=0):
    """The mean of xs and its standard error, std / sqrt(n): for a run's 0/1 verdicts (ddof 0)
    the binomial sqrt(p (1 - p) / n); over a few seeds ddof=1 (with 3, ddof 0 would understate
    the error by sqrt(3/2)). One value has no spread: its error is 0."""
    x = np.asarray(xs, dtype=float)
    return float(x.mean()), float(x.std(ddof=ddof) / math.sqrt(len(x))) if len(x) > ddof else 0.0


def judged(s0, s1):
    """(mean, standard error) of each verdict, before (s0) and after (s1) training."""
    sets = dict(before=[s["flaws"] for s in s0], after=[s["flaws"] for s in s1],
                chosen=[s["chosen_flaws"] for s in s1])
    return dict(win_rate=[mean_se([s["win"] for s in ss]) for ss in (s0, s1)],
                judge_score=[mean_se([s["score"] for s in ss]) for ss in (s0, s1)],
                flaw_rates={k: {f: mean_se([x[f] for x in v]) for f in FLAWS} for k, v in sets.items()})
