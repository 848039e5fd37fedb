"""Sample from a trained checkpoint for a prompt you type, or export it as a Hugging Face
GPT-2 directory (config.json and the weights) for the usual evaluation tools.

    python sample.py --out_dir=out-small --prompt="user: 3 more like cat and dog\\nassistant:"
    python sample.py --out_dir=out-small --export=hf-small
"""
from machinery import boot  # first: it sets what torch reads as it loads
import contextlib
import json
import os
import sys

import torch

import orpo
import prepare_data
from machinery import checkpoint, gpt2, report, synthetic
from machinery.cli import parse_args, setup_device
from machinery.safe import die, lock, one_line, staged

MARK = "orpo_export.json"  # in an export: which checkpoint, and the files written


def export(model, meta, ck_path, d):
    """Write model as a Hugging Face GPT-2 folder d: a new or empty one, or over an earlier
    export (the plain files in d that its MARK lists: not `../x`, `/abs/x` or a link out of d),
    which it replaces whole (safe.staged): one that fails or is stopped leaves the earlier."""
    if os.path.exists(d) and not os.path.isdir(d):
        die(f"--export={d} is a file, not a folder")
    found, old = sorted(set(os.listdir(d)) - {".lock"}) if os.path.isdir(d) else [], []
    if found and MARK not in found:
        die(f"--export={d} holds files that no export wrote ({', '.join(found[:3])}"
            f"{', ...' if len(found) > 3 else ''}); give a new or empty folder")
    try:
        if found:
            with open(os.path.join(d, MARK)) as f:
                old = json.load(f)["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        die(f"--export={d}: its {MARK} is not readable ({one_line(e, typed=True)}); give a new folder")
    for n in old if isinstance(old, list) else [old]:
        if not isinstance(n, str) or n in ("", ".", "..") or os.path.basename(n) != n or \
                os.path.islink(os.path.join(d, n)) or os.path.isdir(os.path.join(d, n)):
            die(f"--export={d}: its {MARK} names {n!r}, not a file of the export; nothing was "
                f"touched: give a new folder")
    try:
        with lock(d), staged(d, old) as tmp:
            gpt2.export_hf(model, tmp, eot=meta["eot"])
            files = sorted(set(os.listdir(tmp)) - {".lock"} | {MARK})
            with open(os.path.join(tmp, MARK), "w") as f:
                json.dump({"checkpoint": os.path.abspath(ck_path), "files": files}, f, indent=1)
    except (Exception, KeyboardInterrupt) as e:  # a full disk (OSError, SafetensorError), Ctrl-C
        had = "the export from before" if os.path.isfile(os.path.join(d, "config.json")) else "no export"
        if isinstance(e, KeyboardInterrupt):
            die(f"interrupted; {d} holds {had}", status=130)
        die(f"could not export to {d} ({one_line(e, typed=True)}); {d} holds {had}")
    print(f"wrote {', '.join(n for n in sorted(os.listdir(d)) if n[0] != '.')} in {d}")


def main():
    _, cfg, opts = parse_args(
        sys.argv[1:], orpo.Config, orpo.PRESETS, dict(prompt="", export=""), rules=orpo.RULES,
        usage="[--config NAME] --prompt=TEXT | --export=DIR [--key=value ...]",
        keys=("out_dir", "temperature", "top_k", "max_new_tokens", "n_samples", "seed", "device",
              "dtype"),
        notes=dict(prompt="the text to answer (\\n for a new line)", out_dir="the run to read",
                   n_samples="answers to sample (at most 5 are printed)",
                   export="a folder to write the checkpoint to, in the Hugging Face GPT-2 format"))
    if not opts["prompt"].strip() and not opts["export"]:
        die("give --prompt=TEXT to sample from the checkpoint, or --export=DIR to export it")
    path = os.path.join(cfg.out_dir, "ckpt.pt")
    ck = checkpoint.load_checkpoint(path)
    model, meta = checkpoint.model_from_checkpoint(ck, path), ck["meta"]
    if opts["export"]:
        export(model, meta, path, opts["export"])
        if meta["tokenizer"] != "gpt2":
            print(f"note: this model's tokenizer is the {meta['tokenizer']} task's "
                  f"({meta['vocab_size']} ids), not GPT-2's: GPT2LMHeadModel loads it, but "
                  f"encode its text with prepare_data.get_encoding({meta['tokenizer']!r})")
    if not opts["prompt"].strip():
        return
    dev, _, _, ctx = setup_device(cfg.device, cfg.dtype)
    model.to(dev).eval()
    try:
        enc = prepare_data.get_encoding(meta["tokenizer"])
    except ValueError as e:  # GPT-2's tokenizer neither cached nor downloadable
        die(str(e))
    if enc.n_vocab != meta["vocab_size"]:  # ids it would decode wrongly, or not at all
        die(f"{path}: meta['vocab_size'] is {meta['vocab_size']}, but its tokenizer "
            f"{meta['tokenizer']!r} has {enc.n_vocab} ids")
    text = opts["prompt"].replace("\\n", "\n")
    odd = [w for w in dict.fromkeys(text.split()) if w not in {*synthetic.TOPIC_OF, *synthetic.EXTRA}]
    if meta["tokenizer"] == "synthetic" and odd:  # words the model never saw, read as pieces
        n = {w: len(enc.encode_ordinary(" " + w)) for w in odd}
        print(f"note: not {'a word' if len(odd) == 1 else 'words'} of the synthetic task: " + ", ".join(
            f"{w!r} reads as {k} token{'s' * (k != 1)}" for w, k in n.items()))
    ids = torch.tensor(enc.encode_ordinary(text), device=dev)[None]
    if ids.size(1) >= model.cfg.block_size:
        die(f"--prompt is {ids.size(1)} tokens; the model reads at most "
            f"{model.cfg.block_size - 1} before its answer")
    gen = torch.Generator(device=dev).manual_seed(cfg.seed)
    with ctx:
        out = model.generate(ids.expand(max(1, min(cfg.n_samples, 5)), -1), cfg.max_new_tokens,
                             cfg.temperature, cfg.top_k or None, meta["eot"], gen)
    for row in out[:, ids.size(1):].tolist():
        answer = report.decode(enc, row, meta["eot"])
        line = f"{text!r} ->{answer!r}"
        if meta["tokenizer"] == "synthetic":  # the synthetic task, not a file of pairs
            with contextlib.suppress(ValueError, KeyError, IndexError):  # a prompt outside it: no score
                line += f"   judge {synthetic.judge(text, answer):.2f}"
        print(line)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # an export in progress has cleaned up after itself
        die("interrupted; sample.py writes nothing but an export", status=130)
