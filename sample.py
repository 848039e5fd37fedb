"""Sample from a trained checkpoint for a prompt you type, or export it as a Hugging Face
GPT-2 directory (config.json and the weights) for the usual evaluation tools.

    python sample.py --out_dir=out-small --prompt="user: 3 more like cat and dog\\nassistant:"
    python sample.py --out_dir=out-small --export=hf-small

It takes orpo.py's --config NAME and --key=value overrides: temperature, top_k,
max_new_tokens, n_samples (at most 5 are printed), seed, device, dtype.
"""
import os
import sys

import torch

import orpo
import prepare_data
from configurator import die, parse_args, setup_device


def main():
    _, cfg, opts = parse_args(sys.argv[1:], orpo.Config, orpo.PRESETS, dict(prompt="", export=""))
    if not opts["prompt"].strip() and not opts["export"]:
        die("give --prompt=TEXT to sample from the checkpoint, or --export=DIR to export it")
    path = os.path.join(cfg.out_dir, "ckpt.pt")
    ck = orpo.load_checkpoint(path)
    model, meta = orpo.model_from_checkpoint(ck, path), ck["meta"]
    if opts["export"]:
        try:
            model.export_hf(opts["export"], eot=meta["eot"])
        except (ValueError, OSError) as e:
            die(f"could not export to {opts['export']}: {e}")
        print(f"wrote {', '.join(sorted(os.listdir(opts['export'])))} in {opts['export']}")
        if meta["tokenizer"] != "gpt2":
            print(f"note: this model's tokenizer is the {meta['tokenizer']} task's "
                  f"({meta['vocab_size']} ids), not GPT-2's: GPT2LMHeadModel loads it, but "
                  f"encode its text with prepare_data.get_encoding({meta['tokenizer']!r})")
    if not opts["prompt"].strip():
        return
    dev, _, _, ctx = setup_device(cfg.device, cfg.dtype)
    model.to(dev).eval()
    enc = prepare_data.get_encoding(meta["tokenizer"])
    text = opts["prompt"].replace("\\n", "\n")
    ids = torch.tensor(enc.encode_ordinary(text), device=dev)[None]
    if ids.size(1) >= model.cfg.block_size:
        die(f"--prompt is {ids.size(1)} tokens; the model reads at most "
            f"{model.cfg.block_size - 1} before its answer")
    gen = torch.Generator(device=dev).manual_seed(cfg.seed)
    with ctx:
        out = model.generate(ids.expand(max(1, min(cfg.n_samples, 5)), -1), cfg.max_new_tokens,
                             cfg.temperature, cfg.top_k or None, meta["eot"], gen)
    for row in out[:, ids.size(1):].tolist():
        answer = enc.decode(row[:row.index(meta["eot"])] if meta["eot"] in row else row)
        line = f"{text!r} ->{answer!r}"
        if meta["source"] == "synthetic":
            try:
                line += f"   judge {prepare_data.judge(text, answer):.2f}"
            except (ValueError, KeyError, IndexError):
                pass  # a prompt outside the synthetic task has no judge score
        print(line)


if __name__ == "__main__":
    main()
