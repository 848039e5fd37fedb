"""Real preference data: the rows in ../shared/data (skipped cleanly where absent), and small
files in the hub's exact schemas, written here."""
import gzip
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import prepare_data
from conftest import SHARED

HH = os.path.join(SHARED, "hh-rlhf-harmless-base", "test.jsonl.gz")
UF = os.path.join(SHARED, "ultrafeedback-sample")
needs_shared = pytest.mark.skipif(not os.path.exists(os.path.join(SHARED, "gpt2-bpe")),
                                  reason="../shared/data (real rows, GPT-2 BPE) is absent")


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    """tiktoken's gpt2 encoding, offline, from the BPE files in ../shared/data."""
    if not os.path.exists(os.path.join(SHARED, "gpt2-bpe")):
        pytest.skip("../shared/data (GPT-2 BPE files) is absent")
    cache = str(tmp_path_factory.mktemp("tiktoken"))
    subprocess.run([sys.executable, os.path.join(SHARED, "seed_tiktoken_cache.py"), cache], check=True)
    os.environ["TIKTOKEN_CACHE_DIR"] = cache
    return prepare_data.get_encoding("gpt2")


def load(out, split):
    return np.load(os.path.join(out, f"{split}.tokens.npy")), np.load(os.path.join(out, f"{split}.index.npy"))


def rows_of(out, split, enc):
    tokens, index = load(out, split)
    for off, p, c, r in index:
        yield (enc.decode(tokens[off:off + p].tolist()), enc.decode(tokens[off + p:off + p + c - 1].tolist()),
               enc.decode(tokens[off + p + c:off + p + c + r - 1].tolist()))


@needs_shared
def test_all_hh_rlhf_rows_prepared_and_round_trip(tmp_path, gpt2):
    out = str(tmp_path)
    meta = prepare_data.prepare("hh-rlhf", out, file=HH, max_len=100_000, max_prompt_len=100_000)
    read = sum(s["read"] for s in meta["splits"].values())
    assert read == 2312
    for s in meta["splits"].values():
        assert s["kept"] + sum(s["dropped"].values()) == s["read"]
    assert meta["splits"]["val"]["read"] == 231 and meta["vocab_size"] == 50257
    assert load(out, "train")[0].dtype == np.uint16  # the smallest type that holds 50257
    with gzip.open(HH, "rt") as f:
        raw = [json.loads(line) for line in f]
    def ok(r):  # the rule, restated: same prompt, two non-empty and different responses
        prompt = r["chosen"][:r["chosen"].rfind("\n\nAssistant:") + 12]
        return (r["rejected"].startswith(prompt) and r["chosen"] != r["rejected"]
                and r["chosen"][len(prompt):].strip() and r["rejected"][len(prompt):].strip())
    kept = [r for r in raw if ok(r)]
    got = list(rows_of(out, "val", gpt2)) + list(rows_of(out, "train", gpt2))
    raw_val, raw_train = raw[:231], raw[231:]
    expect = [r for r in raw_val if r in kept] + [r for r in raw_train if r in kept]
    assert len(got) == len(expect) == meta["splits"]["train"]["kept"] + meta["splits"]["val"]["kept"]
    for (p, c, r), row in zip(got, expect):
        assert p.endswith("\n\nAssistant:")
        assert p + c == row["chosen"] and p + r == row["rejected"]  # detokenizing gives the text back


@needs_shared
def test_hh_truncation_is_counted_and_bounded(tmp_path, gpt2):
    meta = prepare_data.prepare("hh-rlhf", str(tmp_path), file=HH, max_len=129, max_prompt_len=64)
    s = meta["splits"]["train"]
    assert s["truncated"] > 0 and s["kept"] + sum(s["dropped"].values()) == s["read"]
    _, index = load(str(tmp_path), "train")
    assert (index[:, 1] <= 64).all() and (index[:, 1] + index[:, 2:].max(1) <= 129).all()


@needs_shared
def test_ultrafeedback_sample_500_and_500(tmp_path, gpt2):
    meta = prepare_data.prepare("ultrafeedback", str(tmp_path), file=os.path.join(UF, "train_prefs.jsonl"),
                                val_file=os.path.join(UF, "test_prefs.jsonl"))
    assert meta["shape"] == "messages"
    for split in ("train", "val"):
        s = meta["splits"][split]
        assert s["read"] == 500 and s["kept"] + sum(s["dropped"].values()) == 500
    with open(os.path.join(UF, "test_prefs.jsonl")) as f:
        first = json.loads(f.readline())
    p, c, _ = next(rows_of(str(tmp_path), "val", gpt2))
    assert p.startswith("\n\nHuman: " + first["chosen"][0]["content"][:50]) and p.endswith("\n\nAssistant:")


# --- the hub's exact schemas, in files written here (synthetic tokenizer: no downloads) ---

UF_ROW = {"prompt": "Name a fruit.", "prompt_id": "abc123",
          "chosen": [{"role": "user", "content": "Name a fruit."}, {"role": "assistant", "content": "A pear."}],
          "rejected": [{"role": "user", "content": "Name a fruit."}, {"role": "assistant", "content": "No."}],
          "messages": [{"role": "user", "content": "Name a fruit."}, {"role": "assistant", "content": "A pear."}],
          "score_chosen": 8.0, "score_rejected": 2.5}
HH_ROW = {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: A fruit?\n\nAssistant: A pear.",
          "rejected": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: A fruit?\n\nAssistant: No."}
TRIPLE = {"prompt": "Q: a fruit?", "chosen": " pear", "rejected": " no"}


def write_jsonl(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write(r if isinstance(r, str) else json.dumps(r))
            f.write("\n")
    return str(path)


def split_rows(path, **kw):
    """Every row of a file as one train split (synthetic tokenizer): (counts, triples)."""
    rows = prepare_data.read_file(path)
    shape = prepare_data.detect_shape(next(r for r in rows if isinstance(r, dict)), path)
    out = os.path.dirname(path)
    counts = prepare_data.write_split(rows, prepare_data.get_encoding("synthetic"), out, "train",
                                      4096, 2048, path, shape)
    return shape, counts, list(rows_of(out, "train", prepare_data.get_encoding("synthetic")))


@pytest.mark.parametrize("row, shape, want", [
    (UF_ROW, "messages", ("\n\nHuman: Name a fruit.\n\nAssistant:", " A pear.", " No.")),
    ({k: UF_ROW[k] for k in ("chosen", "rejected")}, "messages",
     ("\n\nHuman: Name a fruit.\n\nAssistant:", " A pear.", " No.")),
    ({"prompt": "Name a fruit.", "chosen": UF_ROW["chosen"][1:], "rejected": UF_ROW["rejected"][1:]},
     "messages", ("\n\nHuman: Name a fruit.\n\nAssistant:", " A pear.", " No.")),
    (HH_ROW, "dialogue", ("\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: A fruit?\n\nAssistant:", " A pear.", " No.")),
    (TRIPLE, "triple", ("Q: a fruit?", " pear", " no")),
])
def test_hub_schemas_are_detected_and_converted(tmp_path, row, shape, want):
    got_shape, counts, triples = split_rows(write_jsonl(tmp_path / "f.jsonl", [row, row]))
    assert got_shape == shape and counts["kept"] == 2 and triples[0] == want


@pytest.mark.parametrize("ext", ["json", "parquet"])
def test_json_and_parquet_load_through_datasets(tmp_path, ext):
    import datasets
    path = str(tmp_path / f"f.{ext}")
    ds = datasets.Dataset.from_list([UF_ROW, UF_ROW, UF_ROW])
    ds.to_parquet(path) if ext == "parquet" else ds.to_json(path)
    shape, counts, triples = split_rows(path)
    assert shape == "messages" and counts["kept"] == 3 and triples[0][1] == " A pear."


BAD = [  # (row, what the report says)
    ('{"chosen": "x", ', "broken JSON"),
    ({"chosen": HH_ROW["chosen"]}, "missing key 'rejected'"),
    ({"chosen": 5, "rejected": HH_ROW["rejected"]}, "'chosen' is int"),
    ({"chosen": "no turns here", "rejected": "none"}, "has no '\\n\\nAssistant:' turn"),
    ({"chosen": HH_ROW["chosen"], "rejected": "\n\nHuman: Other\n\nAssistant: No."}, "differ before the last"),
    ({"chosen": HH_ROW["chosen"], "rejected": HH_ROW["chosen"]}, None),             # identical
    ({"chosen": HH_ROW["chosen"] + "  ", "rejected": HH_ROW["rejected"][:-3] + " "}, None),  # empty
    ([1, 2], "expected an object, got list"),
    ("null", "expected an object, got NoneType"),
]
BAD_MSGS = [
    ({"chosen": [], "rejected": UF_ROW["rejected"]}, "not a non-empty list"),
    ({"chosen": UF_ROW["chosen"][:1], "rejected": UF_ROW["rejected"]}, "does not end with an assistant"),
    ({"chosen": [{"role": "user"}, {"role": "assistant", "content": "x"}], "rejected": UF_ROW["rejected"]},
     "not a {role, content} object"),
    ({"chosen": [{"role": "robot", "content": "a"}, {"role": "assistant", "content": "x"}],
      "rejected": UF_ROW["rejected"]}, "not a {role, content} object"),
    ({"chosen": UF_ROW["chosen"][1:], "rejected": UF_ROW["rejected"][1:]}, "no prompt turn"),
    ({"chosen": UF_ROW["chosen"], "rejected": [{"role": "user", "content": "Other"}, UF_ROW["rejected"][1]]},
     "differ before the last turn"),
    ({"chosen": "a string", "rejected": UF_ROW["rejected"]}, "not a non-empty list"),
]


@pytest.mark.parametrize("good, bad", [(HH_ROW, BAD), (UF_ROW, BAD_MSGS)])
def test_bad_rows_are_reported_by_row_and_the_rest_prepared(tmp_path, capsys, good, bad):
    rows = [good] + [b for b, _ in bad] + [good]
    path = write_jsonl(tmp_path / "f.jsonl", rows)
    _, counts, triples = split_rows(path)
    assert counts["read"] == len(rows) and counts["kept"] == 2 and len(triples) == 2
    assert counts["kept"] + sum(counts["dropped"].values()) == counts["read"]
    n_msgs = sum(1 for _, m in bad if m)
    assert counts["dropped"]["malformed"] == n_msgs
    err = capsys.readouterr().err
    for i, (_, msg) in enumerate(bad, start=1):
        if msg:
            assert f"f.jsonl row {i}: " in err and msg in err, (i, msg, err)


def test_unrecognised_shape_names_keys_and_shapes(tmp_path):
    path = write_jsonl(tmp_path / "f.jsonl", [{"question": "q", "answer": "a"}])
    r = subprocess.run([sys.executable, "prepare_data.py", "--source", "mine", "--file", path,
                        "--out", str(tmp_path / "o")], capture_output=True, text=True,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert r.returncode == 2
    assert "keys ['answer', 'question']" in r.stderr and "{prompt, chosen, rejected}" in r.stderr


def test_hub_unreachable_says_so_and_what_works(tmp_path, monkeypatch):
    import datasets

    def offline(*a, **k):
        raise ConnectionError("no network")
    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(ValueError, match="could not load 'hh-rlhf' from the Hugging Face hub.*--file PATH"):
        prepare_data.prepare("hh-rlhf", str(tmp_path))
