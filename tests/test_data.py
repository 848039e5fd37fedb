"""prepare_data.py: the real rows in ../shared/data (skipped cleanly where absent), small files
in the hub's exact schemas and bad files, written here; truncation; the synthetic judge."""
import gzip
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import prepare_data
from conftest import ROOT, SHARED
from machinery import readers, synthetic

HH = os.path.join(SHARED, "hh-rlhf-harmless-base", "test.jsonl.gz")
UF = os.path.join(SHARED, "ultrafeedback-sample")
needs_shared = pytest.mark.skipif(not os.path.exists(os.path.join(SHARED, "gpt2-bpe")),
                                  reason="../shared/data (real rows, GPT-2 BPE) is absent")


def cli(tmp_path, *args):
    """prepare_data.py as a command; datasets' cache, if it is used, goes under tmp_path."""
    return subprocess.run([sys.executable, os.path.join(ROOT, "prepare_data.py"), *args],
                          capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, HF_HOME=str(tmp_path / "hf")))


def fails_in_one_line(r, *words):
    """The project's rule for bad input: exit status 2 and one line that says why."""
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("prepare_data: "), r.stderr
    for w in words:
        assert w in lines[0], (w, lines[0])


@pytest.fixture
def offline(monkeypatch):
    """prepare() tokenizes a file with GPT-2's BPE; here with the synthetic one, so that the
    tests of files need no download and no ../shared/data."""
    monkeypatch.setattr(prepare_data, "get_encoding", lambda tok: synthetic.synthetic_encoding())


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
    meta = prepare_data.prepare("hh-rlhf", out, file=HH, max_len=100_000, max_prompt_len=99_999)
    read = sum(s["read"] for s in meta["splits"].values())
    assert read == 2312
    for s in meta["splits"].values():
        assert s["kept"] + sum(s["dropped"].values()) == s["read"]
    assert meta["vocab_size"] == 50257
    assert load(out, "train")[0].dtype == np.uint16  # the smallest type that holds 50257
    with gzip.open(HH, "rt") as f:
        raw = [json.loads(line) for line in f]
    def ok(r):  # the rule, restated: same prompt, two non-empty and different responses
        prompt = r["chosen"][:r["chosen"].rfind("\n\nAssistant:") + 12]
        return (r["rejected"].startswith(prompt) and r["chosen"] != r["rejected"]
                and r["chosen"][len(prompt):].strip() and r["rejected"][len(prompt):].strip())
    expect = [r for r in raw if ok(r)]  # val's rows then train's: the file's order
    usable_lines = [i + 1 for i, r in enumerate(raw) if ok(r)]
    assert meta["splits"]["val"]["read"] == usable_lines[len(expect) // 10 - 1] == 231
    got = list(rows_of(out, "val", gpt2)) + list(rows_of(out, "train", gpt2))
    assert len(got) == len(expect) == meta["splits"]["train"]["kept"] + meta["splits"]["val"]["kept"]
    for (p, c, r), row in zip(got, expect):
        assert p.endswith("\n\nAssistant:")
        assert p + c == row["chosen"] and p + r == row["rejected"]  # detokenizing gives the text back


@needs_shared
def test_hh_truncation_is_counted_and_bounded(tmp_path, gpt2):
    meta = prepare_data.prepare("hh-rlhf", str(tmp_path), file=HH, max_len=129, max_prompt_len=64)
    s = meta["splits"]["train"]
    assert s["truncated"] > 0 and s["kept"] + sum(s["dropped"].values()) == s["read"]
    tokens, index = load(str(tmp_path), "train")
    assert (index[:, 1] <= 64).all() and (index[:, 1] + index[:, 2:].max(1) <= 129).all()
    for off, p, c, r in index:  # each response keeps a token of its own
        assert tokens[off + p] != gpt2.eot_token and tokens[off + p + c] != gpt2.eot_token


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
    rows = readers.read_file(path)
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
def test_json_and_parquet_files_written_by_datasets_are_read(tmp_path, ext):
    import datasets  # an independent writer: its .json is JSON lines, its .parquet has lists of structs
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
    for i, (_, msg) in enumerate(bad, start=2):  # line 1 is the good row
        if msg:
            assert f"f.jsonl row {i}: " in err and msg in err, (i, msg, err)


def test_unrecognised_shape_names_keys_and_shapes(tmp_path):
    path = write_jsonl(tmp_path / "f.jsonl", [{"question": "q", "answer": "a"}])
    r = cli(tmp_path, "--source", "mine", "--file", path, "--out", str(tmp_path / "o"))
    fails_in_one_line(r, "keys ['answer', 'question']", "{prompt, chosen, rejected}")


def test_hub_unreachable_says_so_and_what_works(tmp_path, monkeypatch):
    import datasets

    def offline(*a, **k):
        raise ConnectionError("no network")
    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(ValueError, match="could not load 'hh-rlhf' from the Hugging Face hub.*--file PATH"):
        prepare_data.prepare("hh-rlhf", str(tmp_path))


# --- rows: numbering, counting, truncation ---

def test_bad_rows_are_counted_named_and_the_rest_kept(tmp_path, capsys):
    enc = prepare_data.get_encoding("synthetic")
    good = {"prompt": "user: 2 more like cat and dog\nassistant:", "chosen": " sure : owl hen .",
            "rejected": " ugh : owl hen ."}
    rows = [good, {"prompt": "p", "chosen": "c"}, ["not", "a", "dict"], dict(good, chosen=3),
            dict(good, rejected=good["chosen"]), dict(good, chosen="  "), good]
    counts = prepare_data.write_split(rows, enc, str(tmp_path), "train", 64, 32, "rows.jsonl")
    assert counts["read"] == 7 and counts["kept"] == 2
    assert counts["dropped"] == {"blank": 0, "malformed": 3, "empty_response": 1, "identical": 1,
                                 "too_long": 0}
    assert counts["kept"] + sum(counts["dropped"].values()) == counts["read"]
    err = capsys.readouterr().err  # rows are numbered from 1, as an editor numbers lines
    assert "rows.jsonl row 2: missing key 'rejected'" in err
    assert "rows.jsonl row 3: expected an object" in err
    assert "rows.jsonl row 4: 'chosen' is int" in err


def test_truncation_keeps_prompt_end_and_response_start(tmp_path):
    enc = prepare_data.get_encoding("synthetic")
    row = {"prompt": " cat" * 14 + " fox" * 6, "chosen": " dog" * 10 + " hen" * 10, "rejected": " owl" * 3}
    counts = prepare_data.write_split([row], enc, str(tmp_path), "train", 16, 6, "t")
    assert counts["truncated"] == 1 and counts["kept"] == 1
    tokens, (off, p, c, r) = np.load(tmp_path / "train.tokens.npy"), np.load(tmp_path / "train.index.npy")[0]
    assert (p, c, r) == (6, 10, 4)  # prompt keeps 6, each response at most 16 - 6
    assert enc.decode(tokens[off:off + p].tolist()) == " fox" * 6
    assert enc.decode(tokens[off + p:off + p + c].tolist()) == " dog" * 10  # cut: no end-of-text
    assert enc.decode(tokens[off + p + c:off + p + c + r].tolist()) == " owl" * 3 + "<|endoftext|>"


LONG = {"prompt": " cat" * 20, "chosen": " dog" * 20, "rejected": " owl" * 3}
SAME_START = {"prompt": " cat" * 20, "chosen": " dog owl", "rejected": " dog hen"}
SHORT = {"prompt": " cat", "chosen": " dog", "rejected": " owl"}


@pytest.mark.parametrize("max_len, max_prompt_len, kept, truncated, too_long", [
    (16, 15, 2, 1, 1),   # room for one token of each response: SAME_START's are then the same
    (16, 16, 1, 0, 2),   # no room at all (prepare() refuses these limits; write_split drops)
    (24, 8, 3, 2, 0),
])
def test_kept_rows_fit_max_len_with_a_token_of_each_response(tmp_path, max_len, max_prompt_len,
                                                             kept, truncated, too_long):
    enc = prepare_data.get_encoding("synthetic")
    counts = prepare_data.write_split([LONG, SAME_START, SHORT], enc, str(tmp_path), "train",
                                      max_len, max_prompt_len, "t")
    assert (counts["kept"], counts["truncated"], counts["dropped"]["too_long"]) == (kept, truncated, too_long)
    assert counts["kept"] + sum(counts["dropped"].values()) == counts["read"] == 3
    tokens, index = load(str(tmp_path), "train")
    for off, p, c, r in index:
        assert p <= max_prompt_len and p + max(c, r) <= max_len
        assert tokens[off + p] != enc.eot_token and tokens[off + p + c] != enc.eot_token


def test_a_row_with_no_room_for_its_responses_is_not_kept(tmp_path):
    with pytest.raises(ValueError, match="no usable rows in split 'train'.*'too_long': 1"):
        prepare_data.write_split([LONG], prepare_data.get_encoding("synthetic"), str(tmp_path),
                                 "train", 20, 20, "t")


@pytest.mark.parametrize("args", [["--max_len", "65"], ["--max_len", "65", "--max_prompt_len", "65"],
                                  ["--max_prompt_len", "-1"]])
def test_max_prompt_len_must_leave_room_for_a_response(tmp_path, args):
    out = tmp_path / "o"
    r = cli(tmp_path, *args, "--n_train", "20", "--n_val", "5", "--out", str(out))
    fails_in_one_line(r, "max_prompt_len", "max_len")
    assert not out.exists()  # refused before any work
    with pytest.raises(ValueError, match="max_prompt_len 512 must be at least 1 and below max_len 65"):
        prepare_data.prepare("synthetic", str(out), n_train=20, n_val=5, max_len=65)


def pairs(n):
    """n distinct, usable {prompt, chosen, rejected} rows."""
    return [{"prompt": f"user: 2 more like {w} and cat\nassistant:", "chosen": f" sure : {w} .",
             "rejected": f" ugh : {w} ."} for w in list(synthetic.TOPIC_OF)[:n]]


def test_row_numbers_are_file_lines_and_blank_lines_and_a_bom_are_read(tmp_path, capsys, offline):
    lines = [json.dumps(r).encode() for r in pairs(23)]
    lines[1:1] = [b""]                           # line 2: blank
    lines[12:12] = [b'{"prompt": "x", ']        # line 13: broken JSON
    lines[13:13] = [b"   "]                      # line 14: blank too
    lines[19:19] = [b'{"prompt": "\xff"}']      # line 20: not UTF-8
    lines.append(json.dumps({"prompt": "p", "chosen": "c"}).encode())  # line 28
    path = tmp_path / "f.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + b"\n".join(lines) + b"\n")  # a BOM, as some editors write
    meta = prepare_data.prepare("mine", str(tmp_path / "o"), file=str(path))
    err = capsys.readouterr().err
    assert "row 1:" not in err and "row 2:" not in err and "row 14:" not in err
    assert "f.jsonl row 13: broken JSON" in err and "f.jsonl row 20: not UTF-8" in err
    assert "f.jsonl row 28: missing key 'rejected'" in err
    val, train = meta["splits"]["val"], meta["splits"]["train"]
    assert (val["read"], val["kept"], val["dropped"]["blank"]) == (3, 2, 1)  # 23 usable: 2 held out
    assert (train["read"], train["kept"], train["dropped"]["blank"]) == (25, 21, 1)
    assert train["dropped"]["malformed"] == 3


def test_bad_rows_of_the_val_file_are_named_by_that_file(tmp_path, capsys, offline):
    f = write_jsonl(tmp_path / "f.jsonl", pairs(3))
    v = write_jsonl(tmp_path / "v.jsonl", pairs(2)[:1] + ["[1]"] + pairs(2)[1:])
    prepare_data.prepare("mine", str(tmp_path / "o"), file=f, val_file=v)
    assert "v.jsonl row 2: expected an object, got list" in capsys.readouterr().err


def test_held_out_rows_are_taken_from_usable_rows(tmp_path, capsys, offline):
    rows = pairs(10)
    rows[0] = dict(rows[0], rejected=rows[0]["chosen"])  # identical: dropped
    rows[6] = {"prompt": "p"}
    meta = prepare_data.prepare("mine", str(tmp_path / "o"), file=write_jsonl(tmp_path / "f.jsonl", rows))
    val, train = meta["splits"]["val"], meta["splits"]["train"]
    assert (val["read"], val["kept"], val["dropped"]["identical"]) == (2, 1, 1)
    assert (train["read"], train["kept"], train["dropped"]["malformed"]) == (8, 7, 1)
    assert "f.jsonl row 7: missing key" in capsys.readouterr().err  # still the file's line


# --- files prepare_data cannot read: one line, exit 2, no traceback ---

def truncated_gz(path):
    data = gzip.compress(b"".join(json.dumps(r).encode() + b"\n" for r in pairs(40)))
    path.write_bytes(data[:len(data) // 2])


@pytest.mark.parametrize("name, make, words", [
    ("pairs.csv", lambda p: p.write_text("prompt,chosen,rejected\nq,a,b\n"), [".jsonl, .jsonl.gz"]),
    ("d", lambda p: p.mkdir(), ["is a directory"]),
    ("f.jsonl.gz", lambda p: p.write_bytes(b"not gzip at all\n"), ["cannot read it"]),
    ("f.jsonl.gz", truncated_gz, ["cannot read it"]),
    ("f.jsonl", lambda p: p.write_bytes(b""), ["the file is empty"]),
    ("f.jsonl", lambda p: p.write_bytes(b"\n\n"), ["the file is empty"]),
    ("f.json", lambda p: p.write_bytes(b""), ["the file is empty"]),
    ("f.jsonl", lambda p: p.write_bytes(gzip.compress(b"x" * 1000)), ["no line of it is JSON"]),
    ("f.parquet", lambda p: p.write_bytes(b"not parquet\n"), ["cannot read it as parquet"]),
    ("missing.jsonl", lambda p: None, ["no file at"]),
    ("f.jsonl.gz", lambda p: p.write_bytes(gzip.compress(b'{"a": 1}\n' * 40) + b"junk"),
     ["cannot read it past line 40", "BadGzipFile"]),  # rows, then what is not gzip
    ("f.json", lambda p: p.write_bytes(b'[{"prompt": "q"'), ["cannot read it as json", "line 1"]),
    ("f.json", lambda p: p.write_text("[]", encoding="utf-16"),  # as Windows PowerShell writes
     ["cannot read it as json", "UnicodeDecodeError: 'utf-8'"]),
    ("f.json", lambda p: p.write_bytes(b"[]"), ["no rows to read: it has none"]),
    ("f.json", lambda p: p.write_text(json.dumps({"train": [TRIPLE], "test": [TRIPLE]})),
     ["keys ['test', 'train']"]),  # two lists of rows: which one is not ours to guess
    ("f.parquet", lambda p: p.write_bytes(b""), ["cannot read it as parquet"]),
])
def test_a_file_that_cannot_be_read_is_one_line_exit_2(tmp_path, name, make, words):
    path = tmp_path / name
    make(path)
    r = cli(tmp_path, "--source", "mine", "--file", str(path), "--out", str(tmp_path / "o"))
    fails_in_one_line(r, str(path), *words)
    assert not (tmp_path / "o").exists()


def test_an_unreadable_val_file_is_named(tmp_path):
    f = write_jsonl(tmp_path / "f.jsonl", pairs(3))
    r = cli(tmp_path, "--file", f, "--val_file", str(tmp_path / "v.csv"), "--out", str(tmp_path / "o"))
    fails_in_one_line(r, "no file at", "v.csv")


# --- files as people have them: BOMs, CRLF, .gz oddities, long lines, typed columns ---

def write_rows(path, rows, bom_crlf=False):
    """rows as a file of path's format, written without prepare_data's readers: a .json as an
    array; bom_crlf: with a byte order mark and CRLF line ends, as Windows editors save."""
    path = str(path)
    if path.endswith(".parquet"):
        import pyarrow as pa
        import pyarrow.parquet as pq
        pq.write_table(pa.Table.from_pylist(rows), path)
        return path
    text = json.dumps(rows, indent=1) if path.endswith(".json") else "".join(
        json.dumps(r) + "\n" for r in rows)
    data = (b"\xef\xbb\xbf" + text.replace("\n", "\r\n").encode()) if bom_crlf else text.encode()
    with open(path, "wb") as f:
        f.write(gzip.compress(data) if path.endswith(".gz") else data)
    return path


@pytest.mark.parametrize("ext", [".jsonl", ".jsonl.gz", ".json"])
def test_a_bom_and_crlf_line_ends_read_like_plain_lf(tmp_path, ext):
    rows = pairs(3)
    assert readers.read_file(write_rows(tmp_path / f"lf{ext}", rows)) == rows
    assert readers.read_file(write_rows(tmp_path / f"crlf{ext}", rows, bom_crlf=True)) == rows


def test_json_rows_under_a_key_and_json_lines_named_json_are_read(tmp_path):
    rows = pairs(3)
    for name, text in (("under a key", json.dumps({"data": rows})),
                       ("json lines", "\r\n".join(json.dumps(r) for r in rows)),
                       ("one row", json.dumps(rows[0]))):
        (tmp_path / "f.json").write_text(text)
        assert readers.read_file(str(tmp_path / "f.json")) == rows[:1 if name == "one row" else 3]


def test_a_multi_member_or_zero_padded_gz_is_read_whole(tmp_path):
    lines = [json.dumps(r).encode() + b"\n" for r in pairs(4)]
    path = tmp_path / "f.jsonl.gz"
    path.write_bytes(gzip.compress(b"".join(lines[:2])) + gzip.compress(b"".join(lines[2:])))
    assert readers.read_file(str(path)) == pairs(4)  # as `cat a.gz b.gz > f.gz` makes
    path.write_bytes(gzip.compress(b"".join(lines)) + b"\0" * 512)  # padded to a block
    assert readers.read_file(str(path)) == pairs(4)


def test_a_line_of_200_mb_is_read(tmp_path):
    path = tmp_path / "long.jsonl.gz"
    with gzip.open(path, "wb", compresslevel=1) as f:  # 200 MB on disk would be 200 KB here
        f.write(b'{"prompt": "q", "chosen": "')
        for _ in range(200):
            f.write(b"a" * 2**20)
        f.write(b'", "rejected": "b"}\n' + json.dumps(TRIPLE).encode() + b"\n")
    rows = readers.read_file(str(path))
    assert len(rows) == 2 and len(rows[0]["chosen"]) == 200 * 2**20 and rows[1] == TRIPLE


@pytest.mark.parametrize("ext", readers.FORMATS)
def test_paths_with_spaces_and_non_ascii_letters(tmp_path, offline, ext):
    (tmp_path / "my dätä ü").mkdir()
    path = write_rows(tmp_path / "my dätä ü" / f"pärs 1{ext}", pairs(12))
    meta = prepare_data.prepare("mine", str(tmp_path / "out dïr é"), file=path)
    assert sum(s["kept"] for s in meta["splits"].values()) == 12
    assert os.path.isfile(tmp_path / "out dïr é" / "meta.json")


@pytest.mark.parametrize("ext", [".parquet", ".json"])
def test_a_home_that_cannot_be_written_needs_no_cache_for_a_file(tmp_path, gpt2, ext):
    """HOME lies under a regular file (unwritable even by root) and no HF_HOME is set: reading
    a local file needs no cache, so a good file is prepared."""
    (tmp_path / "home").write_text("")
    env = {k: v for k, v in os.environ.items()
           if k not in ("HF_HOME", "HF_DATASETS_CACHE", "XDG_CACHE_HOME")}
    env["HOME"] = str(tmp_path / "home" / "me")
    path = write_rows(tmp_path / f"pärs{ext}", [UF_ROW] * 10)
    r = subprocess.run([sys.executable, os.path.join(ROOT, "prepare_data.py"), "--file", path,
                        "--out", str(tmp_path / "ö ut")], capture_output=True, text=True,
                       timeout=300, env=env)
    assert r.returncode == 0, r.stderr
    with open(tmp_path / "ö ut" / "meta.json") as f:
        meta = json.load(f)
    assert meta["shape"] == "messages" and sum(s["kept"] for s in meta["splits"].values()) == 10


MSGS = UF_ROW["chosen"]
NONE_USABLE = "no usable rows in split 'train'"


@pytest.mark.parametrize("columns, bad_rows, why, end", [
    ({"prompt": ["q"] * 3, "chosen": [b"y"] * 3, "rejected": ["n"] * 3}, [1, 2, 3],
     "'chosen' is bytes, not a string", NONE_USABLE),
    ({"prompt": ["q"] * 3, "chosen": [1, 2, 3], "rejected": ["n"] * 3}, [1, 2, 3],
     "'chosen' is int, not a string", NONE_USABLE),
    ({"prompt": ["q"] * 3, "chosen": ["y"] * 3, "rejected": [[1, 2]] * 3}, [1, 2, 3],
     "'rejected' is list, not a string", NONE_USABLE),
    ({"prompt": [{"text": "q"}] * 3, "chosen": ["y"] * 3, "rejected": ["n"] * 3}, [1, 2, 3],
     "'prompt' is dict, not a string", NONE_USABLE),
    ({"chosen": [[{"role": "assistant", "content": 1}]] * 3, "rejected": [MSGS] * 3}, [1, 2, 3],
     "a message is not a {role, content} object", NONE_USABLE),
    ({"chosen": [MSGS] * 3, "rejected": ["n"] * 3}, [1, 2, 3],
     "'rejected' is not a non-empty list of messages", NONE_USABLE),
    ({"prompt": ["q"] * 3, "chosen": ["y", None, None], "rejected": ["n"] * 3}, [2, 3],
     "'chosen' is NoneType, not a string", NONE_USABLE),  # row 1, usable, is held out as val
    ({"prompt": [None] * 3, "chosen": ["y"] * 3, "rejected": ["n"] * 3}, [1, 2, 3],
     "'prompt' is NoneType, not a string", NONE_USABLE),
    ({"prompt": ["q"] * 3, "chosen": ["y"] * 3, "rejected": ["n"] * 3}, [], None, "no rows to read"),
])
def test_a_parquet_column_of_the_wrong_type_or_with_nulls_is_named_row_by_row(tmp_path, gpt2, columns,
                                                                              bad_rows, why, end):
    import pyarrow as pa
    import pyarrow.parquet as pq
    table = pa.table(columns)
    path = str(tmp_path / "pairs.parquet")
    pq.write_table(table.slice(0, 0) if end == "no rows to read" else table, path)
    out = tmp_path / "o"  # data prepared before: a failed preparation leaves it as it was
    prepare_data.prepare("synthetic", str(out), n_train=20, n_val=5)
    before = {f: (out / f).read_bytes() for f in os.listdir(out)}
    r = cli(tmp_path, "--source", "mine", "--file", path, "--out", str(out))
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    *named, last = r.stderr.splitlines()
    assert len(named) == len(bad_rows), r.stderr
    for line, i in zip(named, bad_rows):
        assert line.startswith(f"  bad row: {path} row {i}: {why}"), line
    assert last.startswith(f"prepare_data: {path}: {end}"), r.stderr
    assert {f: (out / f).read_bytes() for f in os.listdir(out)} == before


def test_parquet_columns_that_hold_text_are_read_however_typed(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    rows = pairs(3)
    pq.write_table(pa.table({"prompt": pa.array([r["prompt"] for r in rows]).dictionary_encode(),
                             "chosen": pa.array([r["chosen"] for r in rows], pa.large_string()),
                             "rejected": [r["rejected"] for r in rows]}), tmp_path / "f.parquet")
    assert readers.read_file(str(tmp_path / "f.parquet")) == rows  # a categorical, a large_string
    msgs = [dict(UF_ROW, prompt=None), UF_ROW]  # the messages hold the prompt: its column may be null
    assert readers.read_file(write_rows(tmp_path / "m.parquet", msgs)) == msgs


# --- meta.json records what the data was prepared from ---

def test_meta_records_the_files_as_absolute_paths_and_the_limits(tmp_path, monkeypatch, offline):
    monkeypatch.chdir(tmp_path)
    write_jsonl(tmp_path / "f.jsonl", pairs(4))
    write_jsonl(tmp_path / "v.jsonl", pairs(2))
    meta = prepare_data.prepare("mine", "o", file="f.jsonl", val_file="v.jsonl", max_len=40,
                                max_prompt_len=30)
    with open(tmp_path / "o" / "meta.json") as f:
        assert json.load(f) == meta
    assert os.path.isabs(meta["file"]) and os.path.samefile(meta["file"], tmp_path / "f.jsonl")
    assert os.path.isabs(meta["val_file"]) and os.path.samefile(meta["val_file"], tmp_path / "v.jsonl")
    assert (meta["source"], meta["max_len"], meta["max_prompt_len"]) == ("mine", 40, 30)
    meta = prepare_data.prepare("synthetic", "s", n_train=20, n_val=5)
    assert (meta["source"], meta["file"], meta["val_file"]) == ("synthetic", None, None)


# --- the synthetic judge ---

PROMPT = "user: 3 more like cat and dog\nassistant:"  # a prompt of the synthetic task


@pytest.mark.parametrize("answer, want, score", [
    (" sure : fox owl hen .", set(), 1.0),
    (" ugh : fox owl hen .", {"rude"}, 0.75),
    (" hmm : fox owl hen .", {"rude"}, 0.75),              # not polite is rude: judge scores it 0
    (" sure : fox red hen .", {"off_topic"}, (3 + 2 / 3) / 4),
    (" sure : fox owl .", {"wrong_count"}, (2 + 2 / 3) / 4),
    (" sure : fox owl hen ant .", {"wrong_count"}, 3 / 4),
    (" sure fox owl hen", {"malformed"}, 0.75),
    (" whatever : fox red .", {"rude", "off_topic", "wrong_count"}, (1 + 1 / 3) / 4),
    ("", {"rude", "wrong_count", "malformed"}, 0.0),
])
def test_flaws_name_what_judge_checks(answer, want, score):
    got = synthetic.flaws(PROMPT, answer)
    assert set(got) == {"off_topic", "rude", "wrong_count", "malformed"}
    assert {k for k, v in got.items() if v} == want
    assert synthetic.judge(PROMPT, answer) == pytest.approx(score)


def test_flaws_agree_with_judge_on_the_synthetic_pairs():
    for row in synthetic.make_synthetic(300, 0, 0)["train"]:
        found = {k: synthetic.flaws(row["prompt"], row[k]) for k in ("chosen", "rejected")}
        for k, f in found.items():
            assert (synthetic.judge(row["prompt"], row[k]) == 1.0) == (not any(f.values()))
        assert not {k for k, v in found["chosen"].items() if v} - {"off_topic"}  # a stray word at most
        assert any(found["rejected"].values())  # a rejected answer always adds a flaw
