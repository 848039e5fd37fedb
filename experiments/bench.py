"""Speed: time orpo.py's training step; print one JSON line: tokens/s; the limit, the
step's FLOPs (GPT.flops) at the machine's matmul rate (a GPU's vendor peak, GPU_PEAK; on a CPU,
measured: cpu_peak); the fraction of it reached (`mfu`); peak memory. BENCHMARKS.md says more.

    python -m experiments.bench --n_layer=6 --n_head=6 --n_embd=384 --block_size=256 \\
        --batch_size=8 --vocab_size=50304 --dtype=bfloat16
"""
from machinery import boot  # first: it sets what torch reads as it loads; Ctrl-C: one line
import dataclasses
import json
import sys
import time

import numpy as np
import torch

import orpo
from machinery import checkpoint, report
from machinery.cli import parse_args, setup_device
from machinery.safe import die

GPU_PEAK = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12,
            "L4": 121e12, "4090": 165e12, "3090": 71e12}  # dense bf16 FLOP/s, vendor specs

def cpu_peak(raw, n_tokens, n_scored, dtype, min_s=0.2):
    """(FLOP/s, the shape) of the step's largest class of matmul as autograd runs it (X W^T, a
    transposed view): the output layer's vocabulary slice, or the MLP's widening Linear."""
    C = raw.cfg.n_embd
    blocks = sum(p.numel() for p in raw.h.parameters()) * n_tokens
    out = C * raw.n_vocab * n_scored > blocks  # GPT.flops: the output layer outweighs the blocks
    m, n, name = (n_scored, raw.chunk, "lm_head") if out else (n_tokens, 4 * C, "c_fc")
    g = torch.Generator().manual_seed(0)
    x, w = (torch.randn(k, C, generator=g).to(dtype) for k in (m, n))
    x @ w.t()  # the first call builds the kernel; the fastest of 3 calls and min_s seconds counts
    times = []
    while sum(times) < min_s or len(times) < 3:
        t = time.perf_counter()
        x @ w.t()
        times.append(time.perf_counter() - t)
    return 2 * m * C * n / min(times), f"{name} [{m},{C}]@[{C},{n}]"

def bench(cfg, steps):
    """Time orpo.train_step on B random pairs that fill the block (T + 1 tokens: make_batch
    shifts by one), after two warm-up steps (a compiled model compiles in the first)."""
    dev, dev_type, dtype, amp = setup_device(cfg.device, cfg.dtype)
    torch.manual_seed(cfg.seed)
    B, T, V = cfg.batch_size, cfg.block_size, cfg.vocab_size or 50304
    cfg = dataclasses.replace(cfg, init_from="scratch")  # random weights: a step takes as long
    raw = checkpoint.build_model(cfg, dict(vocab_size=V), None).to(dev)
    opt = raw.configure_optimizer(cfg.weight_decay, cfg.lr, (cfg.beta1, cfg.beta2), dev_type, dtype)
    scaler = torch.amp.GradScaler(dev_type, enabled=dtype == "float16")
    p, n = T // 2, T + 1 - T // 2
    index = np.array([(i * (p + 2 * n), p, n, n) for i in range(B)], np.int64)
    tokens = np.random.default_rng(cfg.seed).integers(0, V, B * (p + 2 * n)).astype(np.int64)
    batches = [orpo.make_batch((tokens, index), np.arange(B), dev)] * cfg.grad_accum
    net, loss_fn, times = torch.compile(raw) if cfg.compile else raw, orpo.objective(cfg, amp), []
    for _ in range(steps + 2):
        t = time.perf_counter()
        orpo.train_step(net, opt, scaler, batches, loss_fn, cfg.lr, cfg.grad_clip)  # synced
        times.append(time.perf_counter() - t)
    real, n_scored = report.batch_tokens(index, np.arange(B), cfg.sft_on_prompt)
    toks, flops = real * cfg.grad_accum, raw.flops(real, n_scored, T) * cfg.grad_accum
    s = float(np.median(times[2:]))
    if dev_type == "cuda":
        name = torch.cuda.get_device_name()
        peak, shape = next((v for k, v in GPU_PEAK.items() if k in name), float("nan")), "spec"
    else:  # the step's matmuls run on 2B rows of T tokens, as make_batch stacks them
        peak, shape = cpu_peak(raw, 2 * B * T, n_scored, getattr(torch, dtype))
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    except (OSError, StopIteration):
        cpu = "unknown"
    print(json.dumps(dict(
        device=dev_type, cpu=f"{cpu} ({torch.backends.cpu.get_cpu_capability()})", dtype=dtype,
        threads=torch.get_num_threads(), block_size=cfg.block_size, batch_size=cfg.batch_size,
        sft_on_prompt=cfg.sft_on_prompt, compile=cfg.compile, params=raw.num_params(), tokens_per_step=toks,
        logit_positions=n_scored, steps=steps, ms_per_step=round(s * 1e3, 1), tokens_per_s=round(toks / s, 1),
        peak_gflops=round(peak / 1e9, 1), peak_shape=shape, limit_tokens_per_s=round(toks * peak / flops, 1),
        mfu=float(f"{flops / s / peak:.4g}"), first_step_s=round(times[0], 1),
        peak_mem_mb=round(report.peak_mem_mb(dev_type)))))

def main():
    _, cfg, opts = parse_args(
        sys.argv[1:], orpo.Config, orpo.PRESETS, dict(steps=10),
        keys=("n_layer", "n_head", "n_embd", "block_size", "dropout", "bias", "vocab_size", "lam",
              "sft_on_prompt", "hand_grad", "batch_size", "grad_accum", "lr", "weight_decay", "beta1",
              "beta2", "grad_clip", "device", "dtype", "compile", "seed"),
        notes=dict(steps="timed optimizer steps (after two warm-up steps); the median is printed"))
    if opts["steps"] < 1:
        die(f"--steps must be an integer >= 1, got {opts['steps']}")
    bench(cfg, opts["steps"])

if __name__ == "__main__":
    main()
