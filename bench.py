"""Speed: time orpo.py's own training step on random pairs that fill block_size (half
prompt, half response) and print one JSON line: tokens/s, the limit that the machine's
matmuls set, the fraction of that limit reached (`mfu`), and peak memory.

    python bench.py --n_layer=6 --n_head=6 --n_embd=384 --block_size=256 --batch_size=8 \\
        --vocab_size=50304 --dtype=bfloat16
    python bench.py --sweep=true ...   # block_size 256, 512, 1024 x batch_size 4, 8, fp32 and
                                       # bf16, each point in its own process (for its memory)

The limit: on a CUDA GPU, the vendor's dense bf16 peak (GPU_PEAK). On a CPU, measured here
and now at the matmul shapes and layouts the step itself runs, forward and backward, in the
run's dtype, repeated until two rounds agree within 10%; the JSON names the fastest shape.
`limit_tokens_per_s` is the step's FLOPs (model.flops) done at that peak, and
`mfu` = tokens_per_s / limit_tokens_per_s.
"""
import json
import os
import resource
import subprocess
import sys
import time
from types import SimpleNamespace

import numpy as np
import torch

import orpo
from model import GPT

GPU_PEAK = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12,
            "L4": 121e12, "4090": 165e12, "3090": 71e12}  # dense bf16 FLOP/s, vendor specs


def step_gemms(model, N, n_scored, dtype, chunk=1024):
    """{name: (a, b)} for the matmuls a @ b of one step, in the layouts autograd runs them:
    each Linear (out, in) on N rows forward (X W^T), backward (dY W and dY^T X); the output
    layer a vocabulary slice at a time on n_scored rows."""
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g).to(dtype)
    out = {}
    for name, lin in (("c_attn", model.h[0].attn.c_attn), ("attn.c_proj", model.h[0].attn.c_proj),
                      ("c_fc", model.h[0].mlp.c_fc), ("mlp.c_proj", model.h[0].mlp.c_proj)):
        o, i = lin.weight.shape
        w, x, dy = r(o, i), r(N, i), r(N, o)
        out[f"{name} fwd [{N},{i}]@[{i},{o}]"] = (x, w.t())
        out[f"{name} dX [{N},{o}]@[{o},{i}]"] = (dy, w)
        out[f"{name} dW [{o},{N}]@[{N},{i}]"] = (dy.t(), x)
    h, w = r(n_scored, model.cfg.n_embd), r(chunk, model.cfg.n_embd)
    out[f"lm_head fwd [{n_scored},{h.size(1)}]@[{h.size(1)},{chunk}]"] = (h, w.t())
    return out


def measure_peak(gemms, rounds=6):
    """The fastest matmul rate over the step's shapes, FLOP/s, and its shape; repeated until
    two rounds agree within 10% (a CPU's clock and its neighbours move the rate)."""
    last = None
    for _ in range(rounds):
        rates = {}
        for name, (a, b) in gemms.items():
            best = float("inf")
            for _ in range(3):
                t = time.perf_counter()
                a @ b
                best = min(best, time.perf_counter() - t)
            rates[name] = 2 * a.size(0) * a.size(1) * b.size(1) / best
        name = max(rates, key=rates.get)
        if last and abs(rates[name] - last) <= 0.1 * last:
            return rates[name], name, rates
        last = rates[name]
    return last, name, rates


def bench(cfg, steps):
    """Time `steps` optimizer steps (after two warm-up steps) through orpo.train_step."""
    dev, dev_type, dtype, ctx = orpo.setup_device(cfg.device, cfg.dtype)
    torch.manual_seed(cfg.seed)
    T, B, V = cfg.block_size, cfg.batch_size, cfg.vocab_size or 50304
    raw = GPT(orpo.model_config(cfg, dict(vocab_size=V))).to(dev)
    p = T // 2  # every pair: a prompt of T/2 tokens and two responses that fill the block
    index = np.array([(i * (T + 2), p, T + 1 - p, T + 1 - p) for i in range(B)], np.int64)
    tokens = np.random.default_rng(cfg.seed).integers(0, V, B * (T + 2)).astype(np.int64)
    r = SimpleNamespace(dev=dev, ctx=ctx, rank=0, world=1, raw=raw, train=(tokens, index),
                        model=torch.compile(orpo.Scorer(raw)) if cfg.compile else orpo.Scorer(raw), it=0, epoch=0, pos=0,
                        order=[np.arange(B)] * (steps + 2), path="(none)",
                        opt=raw.configure_optimizer(cfg.weight_decay, cfg.lr, (cfg.beta1, cfg.beta2), dev_type),
                        scaler=torch.amp.GradScaler(dev_type, enabled=dtype == "float16"))
    times = []
    for _ in range(steps + 2):
        t = time.perf_counter()
        _, toks, flops = orpo.train_step(r, cfg)  # its .tolist() waits for the device
        times.append(time.perf_counter() - t)
    s = float(np.median(times[2:]))
    n_scored = orpo.batch_tokens(index, np.arange(B), cfg.sft_on_prompt)[1]
    if dev_type == "cuda":
        name = torch.cuda.get_device_name()
        peak, shape = next((v for k, v in GPU_PEAK.items() if k in name), float("nan")), "spec"
    else:
        gemms = step_gemms(raw, 2 * B * T, n_scored, getattr(torch, dtype))
        peak, shape, _ = measure_peak(gemms)
    mem = torch.cuda.max_memory_allocated() if dev_type == "cuda" else \
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    out = dict(device=dev, cpu=cpu_name(), dtype=dtype, threads=torch.get_num_threads(),
               params=raw.num_params(), tokens_per_step=toks, logit_positions=n_scored,
               steps=steps, ms_per_step=round(s * 1e3, 1), tokens_per_s=round(toks / s, 1),
               peak_gflops=round(peak / 1e9, 1), peak_shape=shape,
               limit_tokens_per_s=round(toks * peak / flops, 1),
               mfu=float(f"{flops / s / peak:.4g}"), peak_mem_mb=round(mem / 2**20))
    print(json.dumps(out))
    return out


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            name = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    except (OSError, StopIteration):
        name = "unknown"
    return f"{name} ({torch.backends.cpu.get_cpu_capability()})"


def sweep(argv, steps):
    """Each point in its own process, so that peak memory is that point's alone."""
    keep = [a for a in argv if not a.startswith(("--sweep", "--block_size", "--batch_size", "--dtype"))]
    for dtype in ("float32", "bfloat16"):
        for T in (256, 512, 1024):
            for B in (4, 8):
                cmd = [sys.executable, __file__, *keep, f"--block_size={T}", f"--batch_size={B}",
                       f"--dtype={dtype}", f"--steps={steps}"]
                res = subprocess.run(cmd, capture_output=True, text=True)
                print(res.stdout.strip().splitlines()[-1] if res.returncode == 0 else
                      json.dumps(dict(block_size=T, batch_size=B, dtype=dtype,
                                      error=res.stderr.strip().splitlines()[-1:])))


def main():
    preset, cfg, opts = orpo.parse_args(sys.argv[1:], dict(steps=10, sweep=False))
    if opts["steps"] < 1:
        orpo.die(f"--steps must be an integer >= 1, got {opts['steps']}")
    if opts["sweep"]:
        sweep(sys.argv[1:], opts["steps"])
    else:
        bench(cfg, opts["steps"])


if __name__ == "__main__":
    main()
