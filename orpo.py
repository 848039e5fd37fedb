"""ORPO: Odds Ratio Preference Optimization (Hong, Lee & Thorne, 2024, arXiv 2403.07691),
in one readable script: config, data, loss, training loop, eval, sampling.

    python orpo.py --config small                 # the CPU demo (prepares its data itself)
    python orpo.py --config small --lam=0         # the same loop as plain SFT
    python orpo.py --config small --prompt "user: 3 more like cat and dog\\nassistant:"
    torchrun --standalone --nproc_per_node=2 orpo.py --config tiny   # DDP

One phase, no reference model:  L = L_SFT + lam * L_OR  (paper Eq. 6), averaged over pairs.
"""
import contextlib
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

import prepare_data
from model import GPT, GPTConfig

def die(msg):
    """Bad input: a clear message and exit status 2, as argparse does."""
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


# ----------------------------------------------------------------------------------------
# Config: one dataclass, named presets, validated --key=value overrides


@dataclass
class Config:
    # data
    dataset: str = "synthetic"     # synthetic, hh-rlhf, ultrafeedback, or a name for data_file
    data_file: str = ""            # a local .jsonl(.gz)/.json/.parquet of pairs to prepare
    data_dir: str = ""             # the prepared files; default: data/<dataset>
    out_dir: str = "out"
    # model
    init_from: str = "scratch"     # scratch, resume, gpt2 (the hub), or a GPT-2 .bin path
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    block_size: int = 64
    dropout: float = 0.0
    bias: bool = True
    # loss
    lam: float = 1.0               # weight of L_OR; 0 gives plain SFT through the same loop
    sft_on_prompt: bool = False    # paper: L_SFT on response tokens only; TRL/official code: True
    hand_grad: bool = False        # backward through the hand-derived gradient (orpo_grad)
    ratio: str = "odds"            # odds: ORPO (Eq. 5); prob: the probability ratio of Sec. 7.1
    logp: str = "mean"             # mean: Eq. 3's length-normalised log P(y|x); sum: summed
    # optimisation
    batch_size: int = 32           # pairs per micro-step (each pair is 2 sequences)
    grad_accum: int = 1            # micro-steps per optimizer step (summed over DDP ranks)
    max_iters: int = 600
    lr_decay_iters: int = 0        # where the cosine ends; 0: max_iters
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_iters: int = 30
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    # eval, logging, sampling
    eval_interval: int = 100
    eval_pairs: int = 500          # held-out pairs per eval
    log_interval: int = 20
    n_samples: int = 400           # sampled generations scored before and after training
    temperature: float = 1.0
    top_k: int = 0                 # 0: no top-k
    max_new_tokens: int = 32
    prompt: str = ""               # sample from out_dir's checkpoint for this prompt, no training
    # system
    device: str = "auto"           # auto: cuda, then mps, then cpu
    dtype: str = "auto"            # auto: bf16 (or fp16 + GradScaler) on cuda, fp32 elsewhere
    compile: bool = False
    seed: int = 1337
    vocab_size: int = 0            # 0: the data's tokenizer's, rounded up to a multiple of 64
    bench: bool = False            # time bench_steps steps on fixed-length random batches
    bench_steps: int = 10
    figure: str = ""               # run and plot one of FIGURES (several runs, in sequence)


PRESETS = {
    # seconds, for tests
    "tiny": dict(n_layer=2, n_head=2, n_embd=32, block_size=64, batch_size=8, max_iters=20,
                 warmup_iters=2, eval_interval=10, eval_pairs=32, log_interval=5, n_samples=8,
                 out_dir="out-tiny"),
    # the CPU demo: about 2 minutes on 2 cores
    "small": dict(out_dir="out-small"),
    # GPT-2 small (124M) on one GPU, fine-tuned from OpenAI's weights on UltraFeedback, as
    # the paper does. lam, lr, warmup and the global batch (4 GPUs x 8 pairs = 32) are the
    # authors' released recipe (github.com/xfactlab/orpo, scripts/run_mistral_orpo_beta.sh:
    # --alpha 0.1 --lr 5e-6 --warmup_steps 200); it decays inverse-sqrt, we decay cosine.
    # 2000 iterations: about one epoch of UltraFeedback's 61k train pairs.
    "gpt2-125m": dict(dataset="ultrafeedback", init_from="gpt2", n_layer=12, n_head=12,
                      n_embd=768, block_size=1024, vocab_size=50304, lam=0.1, lr=5e-6,
                      min_lr=5e-7, warmup_iters=200, batch_size=4, grad_accum=8,
                      max_iters=2000, weight_decay=0.0, eval_interval=200, eval_pairs=256,
                      n_samples=8, max_new_tokens=256, out_dir="out-gpt2-125m"),
}


def parse_args(argv):
    """--config NAME, then --key=value (or --key value) overrides, checked against Config."""
    args, preset = list(argv), "small"
    fields = {f.name: f for f in dataclasses.fields(Config)}
    pairs = []
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
    for key, val in pairs:
        if key == "config":
            if val not in PRESETS:
                die(f"unknown config {val!r}; presets: {', '.join(PRESETS)}")
            preset = val
    cfg = Config(**PRESETS[preset])
    for key, val in pairs:
        if key == "config":
            continue
        if key not in fields:
            die(f"unknown config key {key!r}; known keys: {', '.join(fields)}")
        typ = type(getattr(cfg, key))
        try:
            if typ is bool:
                if val.lower() not in ("true", "false", "1", "0"):
                    raise ValueError
                val = val.lower() in ("true", "1")
            else:
                val = typ(val)
        except ValueError:
            die(f"--{key} expects {typ.__name__}, got {val!r}")
        setattr(cfg, key, val)
    for key, ok in (("ratio", ("odds", "prob")), ("logp", ("mean", "sum")),
                    ("figure", ("",) + tuple(FIGURES))):
        if getattr(cfg, key) not in ok:
            die(f"--{key} must be one of {', '.join(map(repr, ok))}, got {getattr(cfg, key)!r}")
    if cfg.hand_grad and (cfg.ratio, cfg.logp) != ("odds", "mean"):
        die("--hand_grad derives ORPO's own gradient: it needs --ratio=odds --logp=mean")
    return preset, cfg


# ----------------------------------------------------------------------------------------
# Data: pairs stored as token arrays by prepare_data.py; chosen and rejected of a batch are
# padded together into one (2B, T) tensor, chosen rows first, so one forward pass serves both.


def load_data(cfg):
    data_dir = cfg.data_dir or os.path.join("data", cfg.dataset)
    meta_path = os.path.join(data_dir, "meta.json")
    if not os.path.exists(meta_path):  # prepare it, to fit block_size
        print(f"no data in {data_dir}: preparing {cfg.data_file or cfg.dataset}")
        try:
            prepare_data.prepare(cfg.dataset, data_dir, max_len=cfg.block_size + 1,
                                 max_prompt_len=(cfg.block_size + 1) // 2,
                                 file=cfg.data_file or None)
        except ValueError as e:
            die(str(e))
    with open(meta_path) as f:
        meta = json.load(f)
    n_vocab = prepare_data.get_encoding(meta["tokenizer"]).n_vocab
    if n_vocab != meta["vocab_size"]:
        die(f"{meta_path} says vocab_size {meta['vocab_size']}, but tokenizer "
                         f"{meta['tokenizer']!r} has {n_vocab}: the data is stale; prepare it again")
    splits = {s: (np.load(os.path.join(data_dir, f"{s}.tokens.npy"), mmap_mode="r"),
                  np.load(os.path.join(data_dir, f"{s}.index.npy"))) for s in ("train", "val")}
    return meta, splits


def make_batch(split, rows, block_size, device):
    """Pairs `rows` of a split -> x, y (2B, T) int64 and masks (2B, T) float: `resp` marks the
    response targets (the end-of-text token included), `seq` every non-pad target."""
    tokens, index = split
    seqs, n_prompt = [], []
    for half in (2, 3):  # column 2: chosen length, column 3: rejected length
        for r in rows:
            off, p, c, rj = (int(v) for v in index[r])
            start = off + p + (c if half == 3 else 0)
            seqs.append(np.concatenate([tokens[off:off + p], tokens[start:start + index[r][half]]]))
            n_prompt.append(p)
    T = max(len(s) for s in seqs) - 1
    if T > block_size:
        die(f"a pair of {T + 1} tokens does not fit block_size {block_size}; "
                         f"re-run prepare_data.py with --max_len {block_size + 1}")
    x = np.zeros((len(seqs), T), np.int64)
    y = np.zeros((len(seqs), T), np.int64)
    resp = np.zeros((len(seqs), T), np.float32)
    seq = np.zeros((len(seqs), T), np.float32)
    for i, (s, p) in enumerate(zip(seqs, n_prompt)):
        n = len(s) - 1
        x[i, :n], y[i, :n] = s[:-1], s[1:]
        resp[i, p - 1:n] = 1.0  # target t is token t+1: the response starts at target p-1
        seq[i, :n] = 1.0
    t = lambda a: torch.from_numpy(a).to(device, non_blocking=True)
    return t(x), t(y), t(resp), t(seq)


def batch_order(index, batch_size, seed, epoch):
    """The batches of one epoch, a function of (seed, epoch) alone, so that a resumed run that
    knows its epoch and batch position sees what an uninterrupted one would. Pairs are
    shuffled, sorted by length within windows of 64 batches (so a batch pads little), cut
    into batches, and the batches shuffled."""
    rng = np.random.default_rng([seed, epoch])
    perm = rng.permutation(len(index))
    length = index[:, 1] + np.maximum(index[:, 2], index[:, 3])
    win = 64 * batch_size
    perm = np.concatenate([w[np.argsort(length[w], kind="stable")]
                           for w in np.split(perm, range(win, len(perm), win))])
    batches = [perm[i:i + batch_size] for i in range(0, len(perm) - batch_size + 1, batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


# ----------------------------------------------------------------------------------------
# The loss, in fp32 whatever the autocast dtype. Notation: l = log P(y|x), a mean token
# log-prob (Eq. 3); P = e^l; w = chosen (winning), l = rejected (losing).


def log1mexp(x):
    """log(1 - e^x) for x < 0, stable: log(-expm1 x) near 0, log1p(-e^x) far from it
    (Maechler 2012). The naive log(1 - exp(x)) gives -inf, then NaN, as P -> 1. Each branch
    gets a clamped input so that the branch torch.where discards has no inf gradient."""
    a = -math.log(2)
    return torch.where(x > a, torch.log(-torch.expm1(x.clamp(min=a))),
                       torch.log1p(-torch.exp(x.clamp(max=a))))


def logps_from_logits(logits, targets):
    """log P(target) from logits (N, V), in fp32 (fp64 in tests); the model's fused
    TokenLogProbs computes the same without materialising the logits."""
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return -F.cross_entropy(logits, targets, reduction="none")


def response_logps(tok, resp, need, mean=True):
    """The per-token log-probs tok (N,) at the positions `need` marks, placed in (2B, T)
    (zero elsewhere), and the mean log-prob of each response (2B,): paper Eq. 3,
    log P(y|x) = (1/m) sum_t log P(y_t | x, y_<t). With mean=False, the sum (no 1/m)."""
    logp = torch.zeros_like(resp).masked_scatter(need, tok.to(resp.dtype))
    ell = (logp * resp).sum(1) / (resp.sum(1) if mean else 1)
    # clamp below 0: a response the model is sure of in fp32 would give infinite log-odds
    ell = ell.clamp(max=-torch.finfo(torch.float32).tiny)
    return logp, ell


def orpo_loss(logp, ell, seq, lam, sft_on_prompt, ratio="odds"):
    """L = L_SFT + lam * L_OR (Eq. 6), averaged over the B pairs. Returns (loss, parts).
    ratio="prob" swaps the odds ratio for the probability ratio P_w/P_l (Sec. 7.1)."""
    B = ell.size(0) // 2
    ell_w, ell_l = ell[:B], ell[B:]
    if sft_on_prompt:  # the official code and TRL: NLL over prompt and chosen response
        l_sft = -((logp * seq)[:B].sum(1) / seq[:B].sum(1))
    else:              # the paper's Eq. 1: NLL of the chosen response, per token
        l_sft = -ell_w
    if ratio == "odds":
        log_odds_w = ell_w - log1mexp(ell_w)      # Eq. 4: log odds = log P - log(1 - P)
        log_odds_l = ell_l - log1mexp(ell_l)
        log_or = log_odds_w - log_odds_l          # Eq. 5: log of the odds ratio
    else:                                         # Sec. 7.1: log P_w/P_l, for comparison
        log_or = ell_w - ell_l
    l_or = -F.logsigmoid(log_or)                  # Eq. 7: L_OR = -log sigma(log OR)
    loss = (l_sft + lam * l_or).mean()            # Eq. 6
    return loss, dict(sft=l_sft.mean(), orl=l_or.mean(), ell_w=ell_w.mean(), ell_l=ell_l.mean(),
                      log_or=log_or.mean(), acc=(log_or > 0).float().mean())


# ----------------------------------------------------------------------------------------
# The gradient by hand (see README, "Deriving the gradient"). With d = log OR,
#   dL_OR/dd = -sigma(-d) = -delta                 (delta: the paper's Eq. 9)
#   d log odds / dl = 1 + P/(1-P) = 1/(1-P)
# so dL_OR/dl_w = -delta/(1-P_w) and dL_OR/dl_l = +delta/(1-P_l): the paper's h(d) (Eq. 10)
# with the minus sign that its Eqs. 8 and 20 drop. Then dl/dlogits_t = (onehot(y_t) -
# softmax_t)/m on the m response positions, zero elsewhere.


def orpo_grad(ell_w, ell_l, lam):
    """dL/dl_w, dL/dl_l for L = mean_b[-l_w + lam * L_OR] (response-only L_SFT)."""
    B = ell_w.size(0)
    log_or = (ell_w - log1mexp(ell_w)) - (ell_l - log1mexp(ell_l))
    delta = torch.sigmoid(-log_or)                # Eq. 9: delta(d) = 1 / (1 + OR)
    inv_w = -1 / torch.expm1(ell_w)               # 1/(1 - P_w): grows as P_w -> 1
    inv_l = -1 / torch.expm1(ell_l)               # 1/(1 - P_l): the sure-of-rejected weight
    g_w = (-1 - lam * delta * inv_w) / B          # SFT pulls l_w up; L_OR pulls harder
    g_l = (lam * delta * inv_l) / B               # L_OR pushes l_l down
    return g_w, g_l


class HandORPO(torch.autograd.Function):
    """The ORPO loss with a backward written by hand: the flag --hand_grad trains on it."""

    @staticmethod
    def forward(ctx, logits, y, resp, seq, need, lam, sft_on_prompt):
        logp, ell = response_logps(logps_from_logits(logits, y[need]), resp, need)
        loss, parts = orpo_loss(logp, ell, seq, lam, sft_on_prompt)
        ctx.save_for_backward(logits, y, resp, seq, need, ell)
        ctx.lam, ctx.sft_on_prompt = lam, sft_on_prompt
        ctx.mark_non_differentiable(parts["sft"], parts["orl"])  # returned for logging only
        return loss, parts["sft"], parts["orl"]

    @staticmethod
    def backward(ctx, g_loss, _, __):
        logits, y, resp, seq, need, ell = ctx.saved_tensors
        B = ell.size(0) // 2
        g_w, g_l = orpo_grad(ell[:B], ell[B:], ctx.lam)
        if ctx.sft_on_prompt:
            g_w = g_w + 1 / B  # take out the response-only L_SFT; the prompt-wide one is below
        tok = torch.cat([g_w, g_l])[:, None] * resp / resp.sum(1, keepdim=True)  # dL/dlogp_t
        if ctx.sft_on_prompt:
            tok[:B] -= seq[:B] / seq[:B].sum(1, keepdim=True) / B
        g = -torch.softmax(logits.to(ell.dtype), -1)  # d logp_t / d logits_t = onehot(y_t) - softmax_t
        g.scatter_add_(-1, y[need][:, None], torch.ones_like(g[:, :1]))
        return (g * (g_loss * tok[need])[:, None]).to(logits.dtype), *[None] * 6


# ----------------------------------------------------------------------------------------
# Training


def lr_at(it, cfg):
    """Linear warmup, then cosine decay to min_lr at lr_decay_iters (default max_iters)."""
    if it < cfg.warmup_iters:
        return cfg.lr * (it + 1) / cfg.warmup_iters
    end = cfg.lr_decay_iters or cfg.max_iters
    frac = min(1.0, (it - cfg.warmup_iters) / max(1, end - cfg.warmup_iters))
    return cfg.min_lr + 0.5 * (1 + math.cos(math.pi * frac)) * (cfg.lr - cfg.min_lr)


def setup_device(cfg):
    dev = cfg.device
    if dev == "auto":
        dev = "cuda" if torch.cuda.is_available() else (
            "mps" if torch.backends.mps.is_available() else "cpu")
    dtype = cfg.dtype
    if dtype == "auto":
        dtype = ("bfloat16" if torch.cuda.is_bf16_supported() else "float16") \
            if dev.startswith("cuda") else "float32"
    if dtype not in ("float32", "bfloat16", "float16"):
        die(f"--dtype must be auto, float32, bfloat16 or float16, got {dtype!r}")
    dev_type = dev.split(":")[0]
    ptdtype = getattr(torch, dtype)
    ctx = (contextlib.nullcontext() if dtype == "float32"
           else torch.autocast(device_type=dev_type, dtype=ptdtype))
    if dev_type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return dev, dev_type, dtype, ctx


def model_config(cfg, meta):
    vocab = cfg.vocab_size or -(-meta["vocab_size"] // 64) * 64  # 64 | vocab: GPT-2's 50304
    return GPTConfig(block_size=cfg.block_size, vocab_size=vocab, n_layer=cfg.n_layer,
                     n_head=cfg.n_head, n_embd=cfg.n_embd, dropout=cfg.dropout, bias=cfg.bias)


def forward_loss(model, batch, cfg, ctx):
    x, y, resp, seq = batch
    need = (seq if cfg.sft_on_prompt else resp).bool()  # the positions the loss reads
    if cfg.hand_grad:  # the hand-derived backward starts from the logits
        with ctx:
            logits = model(x, need)
        loss, sft, orl = HandORPO.apply(logits, y, resp, seq, need, cfg.lam, cfg.sft_on_prompt)
        return loss, dict(sft=sft, orl=orl)
    with ctx:
        tok = model(x, need, y[need])  # log P(y_t) at those positions, fused and chunked
    logp, ell = response_logps(tok, resp, need, cfg.logp == "mean")
    return orpo_loss(logp, ell, seq, cfg.lam, cfg.sft_on_prompt, cfg.ratio)


@torch.no_grad()
def evaluate(model, split, cfg, device, ctx):
    """Held-out metrics, averaged over the first eval_pairs pairs of the split."""
    model.eval()
    n = min(cfg.eval_pairs, len(split[1]))
    sums, count = {}, 0
    for i in range(0, n, cfg.batch_size):
        rows = range(i, min(i + cfg.batch_size, n))
        batch = make_batch(split, rows, cfg.block_size, device)
        # the loss's value is the same with either backward; autograd's path reports all parts.
        # Always Eq. 3's mean and the odds ratio, so that runs with --logp/--ratio compare.
        _, parts = forward_loss(model, batch, dataclasses.replace(
            cfg, hand_grad=False, logp="mean", ratio="odds"), ctx)
        for k, v in parts.items():
            sums[k] = sums.get(k, 0.0) + v.item() * len(rows)
        count += len(rows)
    model.train()
    m = {k: v / count for k, v in sums.items()}
    m["margin"] = m["ell_w"] - m["ell_l"]
    return m


@torch.no_grad()
def sample_and_judge(model, split, meta, cfg, device, ctx, seed):
    """Sample a response to each of the first n_samples held-out prompts. On the synthetic
    task, the judge scores it; a win is a sample the judge scores above the pair's chosen
    response (a tie counts half), as the paper counts reward-model wins against a reference."""
    enc = prepare_data.get_encoding(meta["tokenizer"])
    tokens, index = split
    gen = torch.Generator(device=device).manual_seed(seed)
    model.eval()
    out, eot = [], meta["eot"]
    rows = range(min(cfg.n_samples, len(index)))
    by_len = {}  # prompts of one length are sampled as one batch
    for r in rows:
        by_len.setdefault(int(index[r][1]), []).append(r)
    for p, group in sorted(by_len.items()):
        for i in range(0, len(group), cfg.batch_size):
            rs = group[i:i + cfg.batch_size]
            prompts = np.stack([tokens[index[r][0]:index[r][0] + p] for r in rs]).astype(np.int64)
            with ctx:
                ids = model.generate(torch.from_numpy(prompts).to(device), cfg.max_new_tokens,
                                     cfg.temperature, cfg.top_k or None, eot, gen, enc.n_vocab)
            for r, row in zip(rs, ids[:, p:].tolist()):
                off, c = int(index[r][0]), int(index[r][2])
                resp = row[:row.index(eot)] if eot in row else row
                out.append(dict(row=r, prompt=enc.decode(tokens[off:off + p].tolist()),
                                sample=enc.decode(resp),
                                chosen=enc.decode(tokens[off + p:off + p + c - 1].tolist())))
    out.sort(key=lambda s: s["row"])
    model.train()
    if meta["source"] == "synthetic":
        for s in out:
            s["score"] = prepare_data.judge(s["prompt"], s["sample"])
            ref = prepare_data.judge(s["prompt"], s["chosen"])
            s["win"] = 1.0 if s["score"] > ref else 0.5 if s["score"] == ref else 0.0
    return out


def save_checkpoint(path, **state):
    tmp = path + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)  # atomic: a crash mid-save leaves the last good checkpoint intact


def load_checkpoint(path, cfg=None, meta=None):
    """Load and check a checkpoint; errors name the file and the mismatched key."""
    try:
        ck = torch.load(path, map_location="cpu", weights_only=False)
    except FileNotFoundError:
        die(f"no checkpoint at {path}")
    except Exception as e:
        die(f"{path} is not a readable checkpoint ({type(e).__name__}: {e})")
    missing = {"model", "config", "iter", "meta"} - set(ck) if isinstance(ck, dict) else {"model"}
    if missing:
        die(f"{path} lacks {sorted(missing)}; not an orpo checkpoint")
    if cfg is not None:
        for k in ("n_layer", "n_head", "n_embd", "block_size", "bias"):
            if ck["config"][k] != getattr(cfg, k):
                die(f"checkpoint {path} has {k}={ck['config'][k]}, "
                                 f"but the run asks for {k}={getattr(cfg, k)}")
    if meta is not None and ck["meta"]["vocab_size"] != meta["vocab_size"]:
        die(f"checkpoint {path} has vocab_size {ck['meta']['vocab_size']}, "
                         f"but the data has {meta['vocab_size']}")
    return ck


def sample_prompt(cfg):
    """--prompt: load out_dir/ckpt.pt and print samples for the prompt the user typed."""
    path = os.path.join(cfg.out_dir, "ckpt.pt")
    ck = load_checkpoint(path)
    meta, saved = ck["meta"], Config(**ck["config"])
    dev, dev_type, dtype, ctx = setup_device(cfg)
    model = GPT(model_config(saved, meta)).to(dev)
    model.load_state_dict(ck["model"])
    model.eval()
    enc = prepare_data.get_encoding(meta["tokenizer"])
    text = cfg.prompt.replace("\\n", "\n")
    ids = torch.tensor(enc.encode_ordinary(text), device=dev)[None]
    gen = torch.Generator(device=dev).manual_seed(cfg.seed)
    with ctx:
        out = model.generate(ids.expand(max(1, min(cfg.n_samples, 5)), -1), cfg.max_new_tokens,
                             cfg.temperature, cfg.top_k or None, meta["eot"], gen, enc.n_vocab)
    for row in out[:, ids.size(1):].tolist():
        resp = row[:row.index(meta["eot"])] if meta["eot"] in row else row
        line = f"{text!r} ->{enc.decode(resp)!r}"
        if meta["source"] == "synthetic":
            try:
                line += f"   judge {prepare_data.judge(text, enc.decode(resp)):.2f}"
            except (ValueError, KeyError, IndexError):
                pass  # a prompt outside the synthetic task has no judge score
        print(line)


def step_flops(model, tokens, n_logits, T):
    """FLOPs of one forward and backward (3x forward): the blocks' matmuls (6 per parameter
    per token), attention's scores and values (12 L d T per token, nanoGPT's count), and the
    vocab projection at the n_logits positions that need it."""
    c = model.cfg
    n_blocks = sum(p.numel() for p in model.h.parameters())
    return 6 * n_blocks * tokens + 12 * c.n_layer * c.n_embd * T * tokens + 6 * c.n_embd * c.vocab_size * n_logits


_PEAK = {}
GPU_BF16_PEAK = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12,
                 "L4": 121e12, "4090": 165e12, "3090": 71e12}  # dense bf16 FLOP/s, vendor specs


def peak_flops(dev_type, dtype):
    """The denominator of MFU: on CUDA the GPU's bf16 peak from its spec sheet; on the CPU
    the fastest n=1024 matmul in the run's dtype, measured here and now, over the three
    layouts the model uses (A B, A B^T, A^T B): a CPU's kernels differ by layout, and on one
    without native bf16 the plain A B in bf16 ran 20x slower than A B^T."""
    key = (dev_type, dtype)
    if key not in _PEAK:
        if dev_type == "cuda":
            name = torch.cuda.get_device_name()
            _PEAK[key] = next((v for k, v in GPU_BF16_PEAK.items() if k in name), float("nan"))
        else:
            # its own generator: drawing from the global one would shift dropout's masks
            # after the first log line, and a resumed run would no longer match
            a = torch.randn(1024, 1024, dtype=getattr(torch, dtype),
                            generator=torch.Generator().manual_seed(0))
            best = float("inf")
            for _ in range(4):
                for b, c in ((a, a), (a, a.t()), (a.t(), a)):
                    t = time.perf_counter()
                    b @ c
                    best = min(best, time.perf_counter() - t)
            _PEAK[key] = 2 * 1024 ** 3 / best
    return _PEAK[key]


def peak_memory(dev_type):
    if dev_type == "cuda":
        return torch.cuda.max_memory_allocated()
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def bench(cfg):
    """--bench: bench_steps timed optimizer steps on random batches in which every sequence
    fills block_size (half prompt, half response); prints one JSON line."""
    dev, dev_type, dtype, ctx = setup_device(cfg)
    torch.manual_seed(cfg.seed)
    model = GPT(model_config(dataclasses.replace(cfg, vocab_size=cfg.vocab_size or 50304), {})).to(dev)
    opt = model.configure_optimizer(cfg.weight_decay, cfg.lr, (cfg.beta1, cfg.beta2), dev_type)
    scaler = torch.amp.GradScaler(dev_type, enabled=dtype == "float16")
    fwd = torch.compile(model) if cfg.compile else model
    B, T, V = cfg.batch_size, cfg.block_size, model.cfg.vocab_size
    g = torch.Generator().manual_seed(cfg.seed)
    x, y = (torch.randint(0, V, (2 * B, T), generator=g).to(dev) for _ in range(2))
    resp = torch.zeros(2 * B, T)
    resp[:, T // 2 - 1:] = 1.0
    batch = (x, y, resp.to(dev), torch.ones(2 * B, T, device=dev))
    times = []
    for i in range(cfg.bench_steps + 2):  # two warm-up steps
        t = time.perf_counter()
        loss, _ = forward_loss(fwd, batch, cfg, ctx)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        loss.item()  # waits for the device
        times.append(time.perf_counter() - t)
    s = float(np.median(times[2:]))
    n_logits = int((batch[3] if cfg.sft_on_prompt else batch[2]).sum().item())
    flops = step_flops(model, 2 * B * T, n_logits, T)
    out = dict(device=dev, dtype=dtype, threads=torch.get_num_threads(), params=model.num_params(),
               tokens_per_step=2 * B * T, logit_positions=n_logits, steps=cfg.bench_steps,
               ms_per_step=round(s * 1e3, 1), tokens_per_s=round(2 * B * T / s, 1),
               mfu=round(flops / s / peak_flops(dev_type, dtype), 4),
               peak_flops=round(peak_flops(dev_type, dtype) / 1e9, 1),
               peak_mem_mb=round(peak_memory(dev_type) / 2**20))
    print(json.dumps(out))
    return out


def train(cfg, preset="custom"):
    # -- distributed: torchrun sets RANK and WORLD_SIZE
    ddp = int(os.environ.get("WORLD_SIZE", "1")) > 1
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    if ddp:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        backend = "nccl" if torch.cuda.is_available() and cfg.device in ("auto", "cuda") else "gloo"
        torch.distributed.init_process_group(backend)
        if backend == "nccl":
            cfg.device = f"cuda:{local}"
            torch.cuda.set_device(cfg.device)
        if cfg.grad_accum % world:
            die(f"grad_accum={cfg.grad_accum} must divide by {world} ranks")
    master = rank == 0
    accum = cfg.grad_accum // world  # micro-steps per rank
    torch.manual_seed(cfg.seed + rank)
    dev, dev_type, dtype, ctx = setup_device(cfg)
    meta, data = load_data(cfg)
    train_split, val_split = data["train"], data["val"]
    n_train = len(train_split[1])

    # -- model, optimizer, scaler; resume restores all three and the data position
    if cfg.init_from in ("scratch", "resume"):
        model = GPT(model_config(cfg, meta)).to(dev)
    else:  # pretrained GPT-2 124M: its shape, and data tokenized with its tokenizer
        if meta["tokenizer"] != "gpt2":
            die(f"--init_from={cfg.init_from} needs data tokenized with gpt2, but "
                f"{cfg.dataset} uses {meta['tokenizer']!r}")
        cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.bias = 12, 12, 768, True
        try:
            model = GPT.from_pretrained(cfg.init_from, cfg.block_size, cfg.dropout).to(dev)
        except (RuntimeError, ValueError, KeyError) as e:
            die(str(e))
    opt = model.configure_optimizer(cfg.weight_decay, cfg.lr, (cfg.beta1, cfg.beta2), dev_type)
    scaler = torch.amp.GradScaler(dev_type, enabled=dtype == "float16")
    it, epoch, pos, history = 0, 0, 0, []
    ckpt_path = os.path.join(cfg.out_dir, "ckpt.pt")
    if cfg.init_from == "resume":
        ck = load_checkpoint(ckpt_path, cfg, meta)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        scaler.load_state_dict(ck["scaler"])
        it, epoch, pos, history = ck["iter"], ck["epoch"], ck["pos"], ck["history"]
        torch.set_rng_state(ck["rng"])
        print(f"resumed from {ckpt_path} at iteration {it}")
    raw = model
    if cfg.compile:
        model = torch.compile(model)
    if ddp:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[dev] if dev_type == "cuda" else None)
    if master:
        os.makedirs(cfg.out_dir, exist_ok=True)
        print(f"{preset}: {raw.num_params() / 1e6:.2f}M parameters, {dev} {dtype}, lam={cfg.lam}, "
              f"{n_train} train pairs, {world} process(es) x {accum} micro-steps x "
              f"{cfg.batch_size} pairs")
    mode = "a" if cfg.init_from == "resume" else "w"  # a new run's log holds only that run
    log = open(os.path.join(cfg.out_dir, "log.jsonl"), mode) if master else None

    def write(rec):
        if master:
            log.write(json.dumps(rec) + "\n")
            log.flush()

    if n_train < cfg.batch_size:
        die(f"{n_train} training pairs are fewer than batch_size {cfg.batch_size}")
    order = batch_order(train_split[1], cfg.batch_size, cfg.seed, epoch)

    def next_rows():  # pos: the next batch of this epoch's order
        nonlocal order, epoch, pos
        if pos == len(order):
            epoch, pos = epoch + 1, 0
            order = batch_order(train_split[1], cfg.batch_size, cfg.seed, epoch)
        pos += 1
        return order[pos - 1]

    if it == 0 and master:
        m0 = evaluate(raw, val_split, cfg, dev, ctx)
        s0 = sample_and_judge(raw, val_split, meta, cfg, dev, ctx, cfg.seed)
        history.append(dict(iter=0, **m0))
        write(dict(kind="eval", iter=0, **m0))
        write(dict(kind="samples", iter=0, samples=s0))
        print_eval(0, m0)
        print_samples("before training", s0)

    t0, t_start, toks, padded, flops = time.time(), time.time(), 0, 0, 0
    while it < cfg.max_iters:
        lr = lr_at(it, cfg)
        for g in opt.param_groups:
            g["lr"] = lr
        tot = torch.zeros(3, device=dev)  # loss, L_SFT, L_OR summed over micro-steps
        for micro in range(cfg.grad_accum):
            rows = next_rows()  # every rank walks the whole order; each keeps its share
            if micro % world != rank:
                continue
            batch = make_batch(train_split, rows, cfg.block_size, dev)
            lens = train_split[1][rows].astype(np.int64)  # counted on the host: no device sync
            real = int((2 * lens[:, 1] + lens[:, 2] + lens[:, 3] - 2).sum())  # non-pad inputs
            n_logits = real if cfg.sft_on_prompt else int(lens[:, 2:].sum())
            toks, padded = toks + real, padded + batch[0].numel()
            flops += step_flops(raw, real, n_logits, batch[0].size(1))
            sync = micro + world >= cfg.grad_accum  # the last micro-step of this rank
            with (contextlib.nullcontext() if sync or not ddp else model.no_sync()):
                loss, parts = forward_loss(model, batch, cfg, ctx)
                scaler.scale(loss / accum).backward()
            tot += torch.stack([loss.detach(), parts["sft"].detach(), parts["orl"].detach()])
        tot /= cfg.grad_accum
        if ddp:
            torch.distributed.all_reduce(tot)
        vals = tot.tolist()  # one sync per optimizer step
        bad = [f"{n}={v}" for n, v in zip(("loss", "L_SFT", "L_OR"), vals) if not math.isfinite(v)]
        if bad:  # stop, not skip: a NaN means a bug or a diverged run, never noise to step over
            die(f"iteration {it + 1}: non-finite {', '.join(bad)}; stopped "
                             f"before the step, nothing saved (last good checkpoint: {ckpt_path})")
        if cfg.grad_clip > 0:
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(raw.parameters(), cfg.grad_clip)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        it += 1
        write(dict(kind="train", iter=it, loss=vals[0], sft=vals[1], orl=vals[2], lr=lr))
        if master and (it % cfg.log_interval == 0 or it == cfg.max_iters):
            dt = time.time() - t0
            print(f"iter {it:5d} | loss {vals[0]:.4f} | L_SFT {vals[1]:.4f} | L_OR {vals[2]:.4f} "
                  f"| lr {lr:.2e} | {toks * world / dt:,.0f} tok/s "
                  f"| MFU {flops / dt / peak_flops(dev_type, dtype):.1%} | pad {1 - toks / padded:.1%}")
            t0, toks, padded, flops = time.time(), 0, 0, 0
        if it % cfg.eval_interval == 0 or it == cfg.max_iters:
            if master:
                m = evaluate(raw, val_split, cfg, dev, ctx)
                history.append(dict(iter=it, **m))
                write(dict(kind="eval", iter=it, **m))
                print_eval(it, m)
                save_checkpoint(ckpt_path, model=raw.state_dict(), optimizer=opt.state_dict(),
                                scaler=scaler.state_dict(), config=dataclasses.asdict(cfg),
                                meta=meta, iter=it, epoch=epoch, pos=pos, history=history,
                                rng=torch.get_rng_state())
    if master:
        s1 = sample_and_judge(raw, val_split, meta, cfg, dev, ctx, cfg.seed)
        write(dict(kind="samples", iter=it, samples=s1))
        print_samples("after training", s1)
        s0 = next((r["samples"] for r in map(json.loads, open(log.name))
                   if r["kind"] == "samples" and r["iter"] == 0), None)
        summary = summarize(cfg, preset, history, s0, s1, time.time() - t_start)
        with open(os.path.join(cfg.out_dir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=1)
        log.close()
    if ddp:
        torch.distributed.destroy_process_group()
    return raw, val_split, dev, ctx, history


# ----------------------------------------------------------------------------------------
# Figures: the paper's findings, reproduced by runs of this script in sequence. Each writes
# its numbers (CSV) to out_dir/<figure>/, and a PNG when matplotlib is installed.

FIGURES = {
    "sft-vs-orpo": {"SFT (lam=0)": dict(lam=0.0), "ORPO (lam=1)": dict(lam=1.0)},  # Figs. 3, 7
    "lambda": {f"lam={x}": dict(lam=x) for x in (0.0, 0.1, 0.5, 1.0)},              # App. E
    "ratio": {"odds ratio": dict(ratio="odds"), "prob ratio": dict(ratio="prob")},   # Sec. 7.1
    "length": {"mean log P": dict(logp="mean"), "summed log P": dict(logp="sum")},    # Eq. 3
}


def write_csv(path, rows):
    with open(path, "w") as f:
        f.write(",".join(rows[0]) + "\n")
        f.writelines(",".join(str(v) for v in r.values()) + "\n" for r in rows)
    print(f"wrote {path}")


@torch.no_grad()
def pair_logps(model, split, cfg, device, ctx):
    """Per held-out pair: response lengths and mean log-probs, chosen then rejected."""
    rows, n = [], min(cfg.eval_pairs, len(split[1]))
    for i in range(0, n, cfg.batch_size):
        x, y, resp, _ = make_batch(split, range(i, min(i + cfg.batch_size, n)), cfg.block_size, device)
        need = resp.bool()
        with ctx:
            tok = model(x, need, y[need])
        _, ell = response_logps(tok, resp, need)
        m, B = resp.sum(1), x.size(0) // 2
        rows += [dict(len_w=int(m[b]), len_l=int(m[b + B]), mean_w=float(ell[b]),
                      mean_l=float(ell[b + B])) for b in range(B)]
    return rows


def figure(cfg, preset):
    """Run each variant of FIGURES[cfg.figure] in turn; write the curves and the plot."""
    name, d = cfg.figure, os.path.join(cfg.out_dir, cfg.figure)
    curves, finals, extra = [], [], []
    if name == "length":  # the untrained model too: its summed log P prefers shorter answers
        torch.manual_seed(cfg.seed)
        meta, data = load_data(cfg)
        dev, _, _, ctx = setup_device(cfg)
        model = GPT(model_config(cfg, meta)).to(dev)
        extra = [dict(run="untrained", **r) for r in pair_logps(model, data["val"], cfg, dev, ctx)]
    for run, change in FIGURES[name].items():
        rcfg = dataclasses.replace(cfg, figure="", out_dir=os.path.join(d, run.replace(" ", "_")),
                                   **change)
        print(f"== {name}: run '{run}' ==")
        model, val, dev, ctx, evals = train(rcfg, preset)
        curves += [dict(run=run, iter=e["iter"], logp_chosen=e["ell_w"], logp_rejected=e["ell_l"],
                        margin=e["margin"], acc=e["acc"]) for e in evals]
        finals.append(curves[-1])
        if name == "length":  # lengths and log P per held-out pair, under the final model
            extra += [dict(run=run, **r) for r in pair_logps(model, val, rcfg, dev, ctx)]
    write_csv(os.path.join(d, "curves.csv"), curves)
    if name == "ratio":  # Fig. 6: log OR and log PR for P_w, P_l uniform on (0, 1)
        p = torch.rand(2, 100_000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        odds = p.log() - (-p).log1p()
        extra = [dict(log_or=float(o), log_pr=float(r)) for o, r in
                 zip(odds[0] - odds[1], p[0].log() - p[1].log())]
        print(f"uniform P: std of log OR {float((odds[0] - odds[1]).std()):.2f}, "
              f"of log PR {float((p[0].log() - p[1].log()).std()):.2f}")
    if extra:
        write_csv(os.path.join(d, "pairs.csv"), extra)
    print(f"== {name}: held-out, at the end ==")
    for f in finals:
        print(f"  {f['run']:14s} log P chosen {f['logp_chosen']:7.3f} | rejected "
              f"{f['logp_rejected']:7.3f} | margin {f['margin']:6.3f} | acc {f['acc']:.3f}")
    if name == "length":  # which answer each model's log P prefers, by length difference
        for run in dict.fromkeys(r["run"] for r in extra):
            for sign, what in ((-1, "chosen shorter"), (0, "same length"), (1, "chosen longer")):
                g = [r for r in extra if r["run"] == run and np.sign(r["len_w"] - r["len_l"]) == sign]
                by_mean = sum(r["mean_w"] > r["mean_l"] for r in g) / max(1, len(g))
                by_sum = sum(r["mean_w"] * r["len_w"] > r["mean_l"] * r["len_l"] for r in g) / max(1, len(g))
                print(f"  {run:14s} {what:15s} {len(g):4d} pairs | accuracy by mean log P "
                      f"{by_mean:.3f}, by summed log P {by_sum:.3f}")
    plot(name, d, curves, extra)


def plot(name, d, curves, extra):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib is not installed, so no {name}.png: `pip install matplotlib` "
              f"(or -r requirements-extra.txt); the numbers are in {d}/curves.csv")
        return
    runs = list(dict.fromkeys(c["run"] for c in curves))
    fig, axes = plt.subplots(1, 3 if extra else 2, figsize=(15 if extra else 10, 4))
    for ax, k in zip(axes, ("logp_chosen", "logp_rejected")):
        for run in runs:
            rs = [c for c in curves if c["run"] == run]
            ax.plot([c["iter"] for c in rs], [c[k] for c in rs], label=run)
        ax.set(title=f"held-out mean log P({k.split('_')[1]})", xlabel="iteration")
        ax.legend()
    if name == "ratio":
        axes[2].hist([[r["log_or"] for r in extra], [r["log_pr"] for r in extra]], bins=100,
                     range=(-10, 10), label=["log odds ratio", "log prob ratio"], histtype="step")
        axes[2].set(title="contrast for uniform random P_w, P_l (Fig. 6)")
        axes[2].legend()
    if name == "length":
        for run in dict.fromkeys(r["run"] for r in extra):
            rs = [r for r in extra if r["run"] == run]
            axes[2].scatter([r["len_w"] - r["len_l"] for r in rs],
                            [r["mean_w"] - r["mean_l"] for r in rs], s=6, alpha=0.5, label=run)
        axes[2].set(title="per held-out pair", xlabel="len(chosen) - len(rejected)",
                    ylabel="mean log P chosen - rejected")
        axes[2].legend()
    fig.tight_layout()
    fig.savefig(os.path.join(d, f"{name}.png"), dpi=100)
    print(f"wrote {os.path.join(d, name + '.png')}")


# ----------------------------------------------------------------------------------------
# Printing


def print_eval(it, m):
    print(f"eval {it:5d} | L_SFT {m['sft']:.4f} | L_OR {m['orl']:.4f} | log P chosen "
          f"{m['ell_w']:.3f} | log P rejected {m['ell_l']:.3f} | log OR {m['log_or']:.3f} | "
          f"acc {m['acc']:.3f} | margin {m['margin']:.3f}")


def print_samples(title, samples, k=3):
    print(f"samples {title}:")
    for s in samples[:k]:
        judged = f"   judge {s['score']:.2f}" if "score" in s else ""
        print(f"  {s['prompt']!r} ->{s['sample']!r}{judged}")


def summarize(cfg, preset, history, s0, s1, seconds):
    a, b = history[0], history[-1]
    what = "SFT baseline (lam=0)" if cfg.lam == 0 else f"ORPO (lam={cfg.lam})"
    lines = [f"== summary: {what}, config {preset}, {b['iter']} iterations, {seconds:.0f} s ==",
             f"held-out pairs ({cfg.eval_pairs}):          start      end",
             f"  mean log P(chosen)    (Eq. 3) {a['ell_w']:8.3f} {b['ell_w']:8.3f}   rises under SFT and ORPO",
             f"  mean log P(rejected)  (Eq. 3) {a['ell_l']:8.3f} {b['ell_l']:8.3f}   SFT lifts it too (Fig. 3); ORPO lowers it",
             f"  log odds ratio        (Eq. 5) {a['log_or']:8.3f} {b['log_or']:8.3f}",
             f"  preference accuracy           {a['acc']:8.3f} {b['acc']:8.3f}   log odds chosen > rejected",
             f"  L_SFT                 (Eq. 1) {a['sft']:8.3f} {b['sft']:8.3f}",
             f"  L_OR                  (Eq. 7) {a['orl']:8.3f} {b['orl']:8.3f}"]
    out = dict(config=preset, lam=cfg.lam, iters=b["iter"], seconds=seconds, start=a, end=b)
    if s0 and s1 and "win" in s1[0]:
        w0, w1 = (sum(s["win"] for s in s) / len(s) for s in (s0, s1))
        j0, j1 = (sum(s["score"] for s in s) / len(s) for s in (s0, s1))
        lines += [f"judge, {len(s1)} sampled answers (T={cfg.temperature}):",
                  f"  win rate vs chosen (ties 1/2)         {w0:8.3f} {w1:8.3f}",
                  f"  mean judge score              {j0:8.3f} {j1:8.3f}"]
        out.update(win_rate=[w0, w1], judge_score=[j0, j1])
    print("\n".join(lines))
    return out


if __name__ == "__main__":
    sys.stdout.reconfigure(line_buffering=True)  # log lines appear as they happen, piped too
    preset, cfg = parse_args(sys.argv[1:])
    if cfg.prompt:
        sample_prompt(cfg)
    elif cfg.bench:
        bench(cfg)
    elif cfg.figure:
        figure(cfg, preset)
    else:
        train(cfg, preset)
