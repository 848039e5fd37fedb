"""The command line, as nanoGPT's configurator.py without its exec (parse_args; `--key value`
works as `--key=value`), and the device (setup_device); bad input is one line naming the key, exit 2."""
import contextlib
import dataclasses
import inspect
import os
import sys

import torch

from machinery.gpt2 import GPT2_NAMES
from machinery.safe import die, one_line


at_least = lambda lo: (lambda v: v >= lo, f"a number >= {lo}")
below_one = (lambda v: 0 <= v < 1, "a number in [0, 1)")
positive = (lambda v: v > 0, "a number > 0")
one_of = lambda *ok: (lambda v: v in ok, "one of " + ", ".join(ok))
RULES = {  # key: (test, what it accepts)
    "n_layer": at_least(1), "n_head": at_least(1), "n_embd": at_least(1),
    "block_size": at_least(2), "dropout": below_one,
    "vocab_size": (lambda v: 0 <= v <= 2**24, "0 (the tokenizer's) or at most 2**24"),
    "lam": at_least(0), "beta": positive, "batch_size": at_least(1),
    "grad_accum": at_least(1), "max_iters": at_least(0), "lr_decay_iters": at_least(0),
    "lr": positive, "min_lr": at_least(0), "warmup_iters": at_least(0),
    "weight_decay": at_least(0), "beta1": below_one, "beta2": below_one, "grad_clip": at_least(0),
    "eval_interval": at_least(1), "eval_pairs": at_least(1), "log_interval": at_least(1),
    "n_samples": at_least(0), "temperature": at_least(0), "top_k": at_least(0),
    "max_new_tokens": at_least(1), "dtype": one_of("auto", "float32", "bfloat16", "float16"),
    "seed": (lambda v: 0 <= v < 2**62, "an integer in [0, 2**62)"), "out_dir": (lambda v: v.strip() != "", "a folder's name"),
}


def auto_device():
    return "cuda" if torch.cuda.is_available() else (
        "mps" if torch.backends.mps.is_available() else "cpu")


def native_bf16_cpu():
    """Whether this CPU multiplies bf16 in hardware (AMX or AVX-512 BF16); elsewhere bf16 is
    emulated, and slower than fp32."""
    return any(getattr(torch.cpu, f, lambda: False)()
               for f in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"))


def check(cfg, rules):
    """Values that make no sense, alone or together: one line naming the key."""
    for key, (ok, what) in rules.items():
        if not ok(getattr(cfg, key)):
            die(f"--{key} must be {what}, got {getattr(cfg, key)!r}")
    if cfg.n_embd % cfg.n_head:
        die(f"--n_embd={cfg.n_embd} must be a multiple of --n_head={cfg.n_head}")
    if cfg.min_lr > cfg.lr:
        die(f"--min_lr={cfg.min_lr} must be at most --lr={cfg.lr}")
    if cfg.hand_grad and cfg.loss != "orpo":
        die(f"--hand_grad derives ORPO's own gradient: it needs --loss=orpo, not {cfg.loss}")
    if cfg.ref and not os.path.isfile(cfg.ref):
        die(f"--ref={cfg.ref!r}: no such checkpoint file")
    known = ("scratch", "resume") + GPT2_NAMES
    if cfg.init_from not in known and not os.path.exists(cfg.init_from):
        die(f"--init_from={cfg.init_from!r}: no such file or directory; accepts {', '.join(known)}, "
            f"an orpo checkpoint (.pt), or a GPT-2 weights file or directory")
    if os.path.exists(cfg.out_dir) and not os.path.isdir(cfg.out_dir):
        die(f"--out_dir={cfg.out_dir!r} is a file, not a folder")
    dev = cfg.device
    if dev not in ("auto", "cpu", "mps") and not (dev == "cuda" or dev.startswith("cuda:")):
        die(f"--device must be auto, cpu, cuda, cuda:N or mps, got {dev!r}")
    if dev.startswith("cuda") and not torch.cuda.is_available():
        die(f"--device={dev}, but torch sees no CUDA GPU here; use --device=cpu (or auto)")
    if dev == "mps" and not torch.backends.mps.is_available():
        die("--device=mps, but torch sees no Apple GPU here; use --device=cpu (or auto)")
    # inductor writes C++ for the CPU: with no compiler it fails at the first step. (This finds
    # the compiler, $CXX or g++; one that is there but cannot build fails there still.)
    if cfg.compile and (auto_device() if dev == "auto" else dev) == "cpu":
        try:
            from torch._inductor.cpp_builder import get_cpp_compiler
            get_cpp_compiler()
        except ImportError:  # another torch lays it out otherwise: let torch.compile say
            pass
        except Exception as e:
            die(f"--compile=true needs a C++ compiler on the CPU ({one_line(e)}); "
                "install one (gcc), or leave --compile off")


def settings(cfg):
    """A run's settings as summary.json keeps them, for a later run in its folder to compare:
    every key but those that say where and how the folder is used."""
    return {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("out_dir", "fresh")}


def setup_device(device, dtype):
    """(device, device type, dtype name, autocast context) for --device and --dtype."""
    device = auto_device() if device == "auto" else device
    dev_type = device.split(":")[0]
    if dtype == "auto":
        dtype = ("bfloat16" if torch.cuda.is_bf16_supported() else "float16") if dev_type == "cuda" \
            else "bfloat16" if dev_type == "cpu" and native_bf16_cpu() else "float32"
    ctx = (contextlib.nullcontext() if dtype == "float32"
           else torch.autocast(device_type=dev_type, dtype=getattr(torch, dtype)))
    if dev_type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    return device, dev_type, dtype, ctx


def parse_value(key, val, default):
    typ = type(default)
    if typ is bool:
        if val.lower() not in ("true", "false", "1", "0"):
            die(f"--{key} expects true or false, got {val!r}")
        return val.lower() in ("true", "1")
    try:
        return typ(val)
    except ValueError:
        die(f"--{key} expects {typ.__name__}, got {val!r}")


def parse_args(argv, config, presets, extra=None, usage="[--config NAME] [--key=value ...]",
               keys=None, notes=None, rules=None):
    """--config NAME (default: small), then overrides of the config's fields that the script
    reads (`keys`; None: all), checked against RULES and its `rules`, and of its own options
    `extra` ({key: default}, described by `notes`). Returns (preset, cfg, opts)."""
    extra, args, pairs = dict(extra or {}), [a for a in argv if a not in ("-h", "--help")], []
    while args:
        a = args.pop(0)
        if not a.startswith("--"):
            die(f"expected --key=value, got {a!r}")
        key, eq, val = a[2:].partition("=")
        if not eq:
            if not args:
                die(f"--{key} needs a value")
            val = args.pop(0)
        pairs.append((key, val))
    preset = dict(pairs).get("config", "small")
    if preset not in presets:
        die(f"unknown config {preset!r}; presets: {', '.join(presets)}")
    fields = [f for f in dataclasses.fields(config) if keys is None or f.name in keys]
    cfg, opts, known, rules = config(**presets[preset]), dict(extra), {f.name for f in fields}, dict(RULES, **(rules or {}))
    if {"-h", "--help"} & set(argv):  # each key: its value, what it accepts, what it does
        said = dict(notes or {})  # what it does: the script's notes, else the field's comment
        for line in inspect.getsource(config).splitlines():
            name, colon, rest = line.strip().partition(":")
            if colon and "#" in rest and name.isidentifier():
                said.setdefault(name, rest.split("#", 1)[1].strip())
        spec = getattr(sys.modules["__main__"], "__spec__", None)  # run as `python -m package.module`
        script = f"-m {spec.name}" if spec and spec.name else os.path.basename(sys.argv[0])
        lines = [f"usage: python {script} {usage}   presets: {', '.join(presets)}"
                 f" (values shown: --config {preset})"]
        lines += [f"  --{f.name}={getattr(cfg, f.name)!r}  ({rules.get(f.name, (0, f.type.__name__))[1]})"
                  f"  {said.get(f.name, '')}".rstrip() for f in fields]
        lines += [f"  --{k}={v!r}  {said.get(k, '')}".rstrip() for k, v in extra.items()]
        print("\n".join(lines), flush=True)  # `--help | head`: boot's one_line_exit, exit 141
        sys.exit(0)
    for key, val in pairs:
        if key in opts:
            opts[key] = parse_value(key, val, extra[key])
        elif key in known:
            setattr(cfg, key, parse_value(key, val, getattr(cfg, key)))
        elif key != "config":
            die(f"unknown config key {key!r}; `--help` lists the keys")
    check(cfg, rules)
    return preset, cfg, opts
