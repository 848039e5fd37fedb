"""Speed: time orpo.py's training step on random pairs that fill block_size (half prompt,
half response); print one JSON line: tokens/s, the limit the machine's matmuls set, the
fraction of it reached (`mfu`), and peak memory.

    python -m experiments.bench --n_layer=6 --n_head=6 --n_embd=384 --block_size=256 \\
        --batch_size=8 --vocab_size=50304 --dtype=bfloat16
    ... --gemms=true   # also the rate of each matmul shape of the step
    ... --sweep=true   # block_size 256-1024 x batch_size 4, 8, fp32 and bf16, a process each
    ... --attn=plain   # or sdpa: attention one way, not model.py's choice
    ... --decode=256   # sampling instead: ms per new token, with the KV cache and without

The limit: on a CUDA GPU, the vendor's dense bf16 peak (GPU_PEAK); on a CPU, the fastest
of the step's matmul shapes and layouts (step_gemms), measured here and now in the run's
dtype, over rounds until two agree within 5% (`peak_shape` names it). `limit_tokens_per_s`
is the step's FLOPs (GPT.flops) at that peak; `mfu` = tokens_per_s / limit_tokens_per_s.
`matmul_ms`: the step's matmuls alone at their shapes' rates, a floor; `other_ms`: the rest
of the step. `first_step_s`: the first warm-up step (with --compile=true, the compile too).
"""
from machinery import boot  # first: it sets what torch reads as it loads; Ctrl-C: one line
import dataclasses
import json
import math
import os
import subprocess
import sys
import time

import numpy as np
import torch

import orpo
from machinery import checkpoint, report
from machinery.cli import parse_args, setup_device
from machinery.safe import die
from model import GPT

GPU_PEAK = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12,
            "L4": 121e12, "4090": 165e12, "3090": 71e12}  # dense bf16 FLOP/s, vendor specs

def step_gemms(model, n_seq, T, n_scored, dtype, chunk=1024):
    """[(name, a, b, count)]: the matmuls a @ b of one step, in the layouts autograd runs
    them (a transposed view runs a kernel of its own), and how often: a Linear's X W^T, dY W
    and dY^T X; attention's Q K^T and P V per (sequence, head), forward and backward (SDPA's
    blocks do this work); the output layer's vocabulary slices at the n_scored positions:
    the logits (forward, and again backward), P W and P^T H."""
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g).to(dtype)
    c, N, L, out = model.cfg, n_seq * T, model.cfg.n_layer, []
    block = model.h[0]
    for name, lin in (("c_attn", block.attn.c_attn), ("attn.c_proj", block.attn.c_proj),
                      ("c_fc", block.mlp.c_fc), ("mlp.c_proj", block.mlp.c_proj)):
        o, i = lin.weight.shape
        w, x, dy = r(o, i), r(N, i), r(N, o)
        out += [(f"{name} fwd [{N},{i}]@[{i},{o}]", x, w.t(), L),
                (f"{name} dX [{N},{o}]@[{o},{i}]", dy, w, L), (f"{name} dW [{o},{N}]@[{N},{i}]", dy.t(), x, L)]
    bh, hs = n_seq * c.n_head, c.n_embd // c.n_head
    q, p = r(bh, T, hs), r(bh, T, T)
    out += [(f"attn QK^T [{bh}x{T},{hs}]@[{hs},{T}]", q, q.transpose(1, 2), 2 * L),
            (f"attn PV [{bh}x{T},{T}]@[{T},{hs}]", p, q, 4 * L)]
    h, w, p = r(n_scored, c.n_embd), r(chunk, c.n_embd), r(n_scored, chunk)
    k = model.n_vocab / chunk  # the last slice is shorter: counted as its fraction
    return out + [(f"lm_head logits [{n_scored},{c.n_embd}]@[{c.n_embd},{chunk}]", h, w.t(), 2 * k),
                  (f"lm_head dH [{n_scored},{chunk}]@[{chunk},{c.n_embd}]", p, w, k),
                  (f"lm_head dW [{chunk},{n_scored}]@[{n_scored},{c.n_embd}]", p.t(), h, k)]

def gemm_flops(a, b):
    """The FLOPs of a @ b, batched or not: a multiply and an add per term."""
    return 2 * math.prod(a.shape[:-1]) * a.size(-1) * b.size(-1)

def measure_gemms(gemms, rounds=6, min_s=0.05):
    """{name: FLOP/s}: each matmul's fastest call (after one that builds its kernel; 3 calls
    and min_s seconds at least), the best over rounds until two rounds' peaks agree in 5%."""
    rates, last = {}, None
    for _ in range(rounds):
        for name, a, b, _ in gemms:
            a @ b
            best, spent, n = float("inf"), 0.0, 0
            while spent < min_s or n < 3:
                t = time.perf_counter()
                a @ b
                dt = time.perf_counter() - t
                best, spent, n = min(best, dt), spent + dt, n + 1
            rates[name] = max(rates.get(name, 0.0), gemm_flops(a, b) / best)
        if last and max(rates.values()) <= 1.05 * last:
            break
        last = max(rates.values())
    return rates

def run_steps(cfg, steps, attn):
    """Seconds of each orpo.train_step on B random pairs (a prompt of T/2 tokens and two
    responses that fill the block: T + 1 tokens, as make_batch shifts by one): two warm-up
    steps (a compiled model compiles in the first), then `steps`; the model and the batch."""
    dev, dev_type, dtype, amp = setup_device(cfg.device, cfg.dtype)
    torch.manual_seed(cfg.seed)
    B, T, V = cfg.batch_size, cfg.block_size, cfg.vocab_size or 50304
    raw = GPT(dataclasses.replace(checkpoint.model_config(cfg, dict(vocab_size=V)), attn=attn)).to(dev)
    opt = raw.configure_optimizer(cfg.weight_decay, cfg.lr, (cfg.beta1, cfg.beta2), dev_type, dtype)
    scaler = torch.amp.GradScaler(dev_type, enabled=dtype == "float16")
    p, n = T // 2, T + 1 - T // 2
    index = np.array([(i * (p + 2 * n), p, n, n) for i in range(B)], np.int64)
    tokens = np.random.default_rng(cfg.seed).integers(0, V, B * (p + 2 * n)).astype(np.int64)
    batches = [orpo.make_batch((tokens, index), np.arange(B), dev)] * cfg.grad_accum
    model, loss_fn, times = torch.compile(raw) if cfg.compile else raw, orpo.objective(cfg, amp), []
    for _ in range(steps + 2):
        t = time.perf_counter()
        orpo.train_step(model, opt, scaler, batches, loss_fn, cfg.lr, cfg.grad_clip)  # synced
        times.append(time.perf_counter() - t)
    return times, raw, index, dev_type, dtype

def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            name = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    except (OSError, StopIteration):
        name = "unknown"
    return f"{name} ({torch.backends.cpu.get_cpu_capability()})"

def bench(cfg, steps, show_gemms, attn):
    """Time the step, find the limit, print one JSON line (after each shape's rate, if asked)."""
    times, raw, index, dev_type, dtype = run_steps(cfg, steps, attn)
    real, n_scored = report.batch_tokens(index, np.arange(cfg.batch_size), cfg.sft_on_prompt)
    toks, flops = real * cfg.grad_accum, raw.flops(real, n_scored, cfg.block_size) * cfg.grad_accum
    s, matmul_ms = float(np.median(times[2:])), None
    if dev_type == "cuda":
        name = torch.cuda.get_device_name()
        peak, shape = next((v for k, v in GPU_PEAK.items() if k in name), float("nan")), "spec"
    else:
        gemms = step_gemms(raw, 2 * cfg.batch_size, cfg.block_size, n_scored, getattr(torch, dtype))
        rates = measure_gemms(gemms)
        shape = max(rates, key=rates.get)
        peak, work = rates[shape], [(name, gemm_flops(a, b) * k / rates[name], k) for name, a, b, k in gemms]
        matmul_ms = round(sum(t for _, t, _ in work) * 1e3, 1)
        for name, t, k in work if show_gemms else []:  # (name, seconds in the step, count)
            print(f"{name:44s} {rates[name] / 1e9:7.1f} GFLOP/s  x{k:<7.4g} {t * 1e3:8.1f} ms")
    print(json.dumps(dict(
        device=dev_type, cpu=cpu_name(), dtype=dtype, threads=torch.get_num_threads(),
        block_size=cfg.block_size, batch_size=cfg.batch_size, sft_on_prompt=cfg.sft_on_prompt,
        compile=cfg.compile, params=raw.num_params(), tokens_per_step=toks, logit_positions=n_scored,
        steps=steps, ms_per_step=round(s * 1e3, 1), tokens_per_s=round(toks / s, 1),
        peak_gflops=round(peak / 1e9, 1), peak_shape=shape, limit_tokens_per_s=round(toks * peak / flops, 1),
        mfu=float(f"{flops / s / peak:.4g}"), matmul_ms=matmul_ms,
        other_ms=None if matmul_ms is None else round(s * 1e3 - matmul_ms, 1),
        first_step_s=round(times[0], 1), attn=attn, peak_mem_mb=round(report.peak_mem_mb(dev_type)))))

def decode(cfg, n_new, prompt_len=16):
    """Time model.generate on random weights: ms per new token (a hook on ln_f, where each
    token's pass ends), with the KV cache and without; a JSON line each."""
    dev, _, dtype, amp = setup_device(cfg.device, cfg.dtype)
    torch.manual_seed(cfg.seed)
    raw = GPT(checkpoint.model_config(cfg, dict(vocab_size=cfg.vocab_size or 50257))).to(dev).eval()
    stamps = []
    raw.ln_f.register_forward_hook(lambda *_: stamps.append(time.perf_counter()))
    idx = torch.randint(0, raw.n_vocab, (1, prompt_len), device=dev)
    for cache in (True, False):
        stamps.clear()
        with amp:
            raw.generate(idx, n_new, temperature=0, cache=cache)
        ms = np.diff(stamps) * 1e3  # ms[i]: new token i + 2 (the first has no start)
        at = {n: round(float(np.median(ms[max(0, n - 6):n - 2])), 2)  # 4 tokens up to n
              for n in (16, 64, 128, 256, 512, 1024) if 6 <= n <= n_new}
        print(json.dumps(dict(cache=cache, cpu=cpu_name(), dtype=dtype, threads=torch.get_num_threads(),
                              params=raw.num_params(), prompt=prompt_len, new_tokens=n_new,
                              ms_per_token_at=at, total_s=round(stamps[-1] - stamps[0], 2))))

def sweep(argv, steps):
    """Each point its own process, so that its peak memory is its own (a failed one: its error)."""
    keep = [a for a in argv if not a.startswith(("--sweep", "--block_size", "--batch_size", "--dtype",
                                                 "--gemms", "--steps"))]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for dtype, T, B in ((d, T, B) for d in ("float32", "bfloat16") for T in (256, 512, 1024) for B in (4, 8)):
        res = subprocess.run([sys.executable, "-m", "experiments.bench", *keep, f"--block_size={T}",
                              f"--batch_size={B}", f"--dtype={dtype}", f"--steps={steps}"],
                             capture_output=True, text=True, cwd=root)
        print(res.stdout.strip().splitlines()[-1] if res.returncode == 0 else json.dumps(dict(
            block_size=T, batch_size=B, dtype=dtype, error=res.stderr.strip().splitlines()[-1:])), flush=True)

def main():
    _, cfg, opts = parse_args(
        sys.argv[1:], orpo.Config, orpo.PRESETS,
        dict(steps=10, sweep=False, gemms=False, attn="auto", decode=0),
        keys=("n_layer", "n_head", "n_embd", "block_size", "dropout", "bias", "vocab_size", "lam",
              "sft_on_prompt", "hand_grad", "batch_size", "grad_accum", "lr", "weight_decay", "beta1",
              "beta2", "grad_clip", "device", "dtype", "compile", "seed"),
        notes=dict(steps="timed optimizer steps (after two warm-up steps); the median is printed",
                   sweep="time block_size 256-1024 x batch_size 4, 8 in fp32 and bf16",
                   gemms="also print the rate of each matmul shape of the step",
                   attn="auto, sdpa or plain: how attention is computed",
                   decode="N > 0: time sampling N new tokens instead (ms per token)"))
    if opts["steps"] < 1:
        die(f"--steps must be an integer >= 1, got {opts['steps']}")
    if opts["attn"] not in ("auto", "sdpa", "plain"):
        die(f"--attn must be auto, sdpa or plain, got {opts['attn']!r}")
    if opts["decode"]:
        decode(cfg, opts["decode"])
    elif opts["sweep"]:  # --attn goes on to each point's process
        sweep(sys.argv[1:], opts["steps"])
    else:
        bench(cfg, opts["steps"], opts["gemms"], opts["attn"])

if __name__ == "__main__":
    main()
