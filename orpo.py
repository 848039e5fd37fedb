"""ORPO: Odds Ratio Preference Optimization (Hong, Lee & Thorne, 2024, arXiv 2403.07691).
One phase, no reference model: L = L_SFT + lam * L_OR (Eq. 6), averaged over the pairs.
machinery/ holds what a student need not read.

    python orpo.py --config small     # the CPU demo (prepares its data itself); --lam=0: SFT
    python orpo.py --help             # every key, what it does, and the presets
    python orpo.py --config tiny --nproc=2 --grad_accum=2   # DDP: two processes
"""
from machinery import boot  # first: it sets what torch reads as it loads
import contextlib
import functools
import math
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

import prepare_data
from machinery import checkpoint, procs, report
from machinery.cli import parse_args, setup_device
from machinery.safe import die
from prepare_data import CHOSEN, PROMPT, REJECTED  # columns of {split}.index.npy

# ----------------------------------------------------------------------------------------
# The loss (Eqs. 1-7), in fp32 whatever the autocast dtype. Notation, the paper's: for a
# response y of m tokens to a prompt x, ℓ = log P(y|x) (code: ell) is the mean token
# log-prob of Eq. 3, and P = e^ℓ. Subscript w marks the chosen (winning) response, l the
# rejected (losing) one. A batch holds B pairs as 2B rows, the B chosen rows first.

def log1mexp(x):
    """log(1 - e^x) for x < 0, stable as P = e^x -> 1, where log(1 - exp(x)) gives -inf."""
    # log(-expm1 x) near 0, log1p(-e^x) far (Maechler 2012); clamped: no inf grad in either
    a = -math.log(2)
    return torch.where(x > a, torch.log(-torch.expm1(x.clamp(min=a))),
                       torch.log1p(-torch.exp(x.clamp(max=a))))

def response_logps(tok, resp_mask, scored, mean=True):
    """Token log-probs tok (N,) at the positions `scored` marks -> logp (2B, T), zero elsewhere,
    and ℓ (2B,), Eq. 3: (1/m) sum_t log P(y_t | x, y_<t); mean=False: the sum, no 1/m."""
    logp = torch.zeros_like(resp_mask).masked_scatter(scored, tok.to(resp_mask.dtype))
    ell = (logp * resp_mask).sum(1) / (resp_mask.sum(1) if mean else 1)
    # clamp below 0: a response the model is sure of in fp32 would give infinite log-odds
    return logp, ell.clamp(max=-torch.finfo(torch.float32).tiny)

def sft_loss(logp, ell, seq_mask, on_prompt=False):
    """L_SFT per pair (B,), Eq. 1: -ℓ_w; on_prompt: over the prompt too, as TRL computes it."""
    B = ell.size(0) // 2
    if on_prompt:
        return -((logp * seq_mask)[:B].sum(1) / seq_mask[:B].sum(1))
    return -ell[:B]

def odds_ratio_loss(ell_w, ell_l):
    """L_OR per pair, and the log odds ratio, from ℓ_w and ℓ_l (B,)."""
    log_odds_w = ell_w - log1mexp(ell_w)  # Eq. 4: log odds = log P - log(1 - P)
    log_odds_l = ell_l - log1mexp(ell_l)
    log_or = log_odds_w - log_odds_l      # Eq. 5: the log of the odds ratio
    return -F.logsigmoid(log_or), log_or  # Eq. 7: L_OR = -log sigma(log OR)

def pair_means(l_sft, l_or, ell_w, ell_l, log_or):
    return dict(l_sft=l_sft.mean(), l_or=l_or.mean(), ell_w=ell_w.mean(), ell_l=ell_l.mean(),
                log_or=log_or.mean(), acc=(log_or > 0).float().mean())

def orpo_loss(ell, l_sft, *, lam):
    """L = L_SFT + lam * L_OR (Eq. 6), averaged over the B pairs, from ℓ (2B,) and L_SFT (B,)
    (Eq. 1, sft_loss). Returns (loss, parts)."""
    ell_w, ell_l = ell.chunk(2)  # chosen rows first
    l_or, log_or = odds_ratio_loss(ell_w, ell_l)  # Eqs. 4, 5, 7
    return (l_sft + lam * l_or).mean(), pair_means(l_sft, l_or, ell_w, ell_l, log_or)  # Eq. 6

# ----------------------------------------------------------------------------------------
# The gradient by hand (GRADIENT.md derives it). With d = log OR, dL_OR/dd = -sigma(-d) =
# -delta (delta: the paper's Eq. 9) and d log odds / dℓ = 1 + P/(1-P) = 1/(1-P), so
# dL_OR/dℓ_w = -delta/(1-P_w) and dL_OR/dℓ_l = +delta/(1-P_l): the paper's h(d) (Eq. 10)
# with the minus sign that its Eqs. 8 and 20 drop. Then dℓ/dlogits_t = (onehot(y_t) -
# softmax_t)/m on the m response positions, zero elsewhere.
def orpo_grad(ell_w, ell_l, lam):
    """dL/dℓ_w, dL/dℓ_l (B,) at ℓ_w, ℓ_l (B,), for L = mean_b[-ℓ_w + lam * L_OR] (Eq. 6)."""
    B = ell_w.size(0)
    _, log_or = odds_ratio_loss(ell_w, ell_l)
    delta = torch.sigmoid(-log_or)                # Eq. 9: delta(d) = 1 / (1 + OR)
    inv_w = -1 / torch.expm1(ell_w)               # 1/(1 - P_w): grows as P_w -> 1
    inv_l = -1 / torch.expm1(ell_l)               # 1/(1 - P_l): the sure-of-rejected weight
    g_w = (-1 - lam * delta * inv_w) / B          # SFT pulls ℓ_w up; L_OR pulls harder
    g_l = (lam * delta * inv_l) / B               # L_OR pushes ℓ_l down
    return g_w, g_l

def logps_from_logits(logits, targets):
    """log P(target) from logits (N, V), in fp32 (fp64 in tests); the model's fused
    token_logps computes the same without materialising the logits."""
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return -F.cross_entropy(logits, targets, reduction="none")

class HandORPO(torch.autograd.Function):
    """The ORPO loss with a backward written by hand: the flag --hand_grad trains on it."""

    @staticmethod
    def forward(ctx, logits, y, resp_mask, seq_mask, scored, lam, sft_on_prompt):
        logp, ell = response_logps(logps_from_logits(logits, y[scored]), resp_mask, scored)
        loss, parts = orpo_loss(ell, sft_loss(logp, ell, seq_mask, sft_on_prompt), lam=lam)
        ctx.save_for_backward(logits, y, resp_mask, seq_mask, scored, ell)
        ctx.lam, ctx.sft_on_prompt = lam, sft_on_prompt
        ctx.mark_non_differentiable(parts["l_sft"], parts["l_or"])  # for logging only
        return loss, parts["l_sft"], parts["l_or"]

    @staticmethod
    def backward(ctx, g_loss, _, __):
        """g_loss, dJ/dloss -> dJ/dlogits (N, V) in logits' dtype, then None for each other input."""
        logits, y, resp_mask, seq_mask, scored, ell = ctx.saved_tensors
        B = ell.size(0) // 2
        g_w, g_l = orpo_grad(ell[:B], ell[B:], ctx.lam)  # with Eq. 1's L_SFT = -ℓ_w
        per_tok = lambda mask: mask / mask.sum(1, keepdim=True)  # dℓ/dlogp_t: 1/m on the mask
        g_tok = torch.cat([g_w, g_l])[:, None] * per_tok(resp_mask)  # dL/dlogp_t (2B, T)
        if ctx.sft_on_prompt:  # L_SFT over prompt and response: it replaces Eq. 1's -ℓ_w
            g_tok[:B] += (per_tok(resp_mask[:B]) - per_tok(seq_mask[:B])) / B
        g = -torch.softmax(logits.to(ell.dtype), -1)  # dlogp_t/dlogits_t = onehot(y_t) - softmax_t
        g.scatter_add_(-1, y[scored][:, None], torch.ones_like(g[:, :1]))
        return (g * (g_loss * g_tok[scored])[:, None]).to(logits.dtype), *[None] * 6

# ----------------------------------------------------------------------------------------
# Ablations (Sec. 7.1's probability ratio, summed log P) and compared methods (SimPO, DPO):
# each a loss of its own, in LOSSES, the registry that --loss picks from.

def prob_ratio_loss(ell, l_sft, *, lam):
    """Eq. 6 with the probability ratio for the odds ratio (Sec. 7.1): log P_w/P_l = ℓ_w - ℓ_l."""
    ell_w, ell_l = ell.chunk(2)  # chosen rows first
    log_ratio = ell_w - ell_l
    l_or = -F.logsigmoid(log_ratio)
    return (l_sft + lam * l_or).mean(), pair_means(l_sft, l_or, ell_w, ell_l, log_ratio)

def simpo_loss(ell_w, ell_l, *, beta=2.0, gamma=1.0):
    """SimPO (Meng, Xia & Chen, 2024), reference-free too, per pair: -log sigma(beta (ℓ_w -
    ℓ_l) - gamma), on Eq. 3's mean log-probs, with a target margin gamma and no SFT term."""
    return -F.logsigmoid(beta * (ell_w - ell_l) - gamma)

def simpo_objective(ell, l_sft, *, lam):
    """SimPO's loss alone (no L_SFT, lam unused); parts: L_SFT measured, ℓ_w - ℓ_l as log_or."""
    ell_w, ell_l = ell.chunk(2)  # chosen rows first
    l_or = simpo_loss(ell_w, ell_l)
    return l_or.mean(), pair_means(l_sft, l_or, ell_w, ell_l, ell_w - ell_l)

def dpo_loss(pi, ref, *, beta):
    """DPO (Rafailov et al. 2023, their Eq. 7) from pi, ref (2B,), the SUMMED log-probs under
    the policy and the frozen reference: L = -log sigma(beta (log-ratio_w - log-ratio_l))."""
    B = pi.size(0) // 2
    z = beta * ((pi[:B] - ref[:B]) - (pi[B:] - ref[B:]))  # the implicit reward margin
    return -F.logsigmoid(z).mean()

def dpo_objective(ell, l_sft, *, lam, pi, ref, beta):
    """DPO's loss of the summed log-probs pi, ref (2B,); its parts are ORPO's terms, measured."""
    with torch.no_grad():
        parts = orpo_loss(ell, l_sft, lam=lam)[1]
    return dpo_loss(pi, ref, beta=beta), parts

@dataclass(frozen=True)
class Loss:
    fn: object          # (ℓ, L_SFT, lam=, and a reference's keywords) -> (loss, parts)
    name: str           # what the summary calls it; lam=0 makes an ORPO-like loss "SFT"
    mean: bool = True   # ℓ as Eq. 3's mean token log-prob, or their sum
    ref: bool = False   # trains against a frozen reference model (--ref), as DPO does
    lam: bool = True    # uses lam

LOSSES = {
    "orpo": Loss(orpo_loss, "ORPO"),
    "prob": Loss(prob_ratio_loss, "ORPO with the probability ratio (Sec. 7.1)"),
    "sum": Loss(orpo_loss, "ORPO on summed log-probs", mean=False),
    "simpo": Loss(simpo_objective, "SimPO", lam=False),
    "dpo": Loss(dpo_objective, "DPO", ref=True, lam=False),
}

# ----------------------------------------------------------------------------------------
# Config: one dataclass and named presets; machinery/cli.py checks --key=value overrides

@dataclass
class Config:
    # data
    dataset: str = "synthetic"     # synthetic, hh-rlhf, ultrafeedback, or a name for data_file
    data_file: str = ""            # a local .jsonl(.gz)/.json/.parquet of pairs to prepare
    data_dir: str = ""             # the prepared files; default: data/<dataset or data_file's name>
    out_dir: str = "out"           # the checkpoint, log.jsonl and summary.json
    fresh: bool = False            # start over: an earlier run in out_dir moves to out_dir/previous
    # model
    init_from: str = "scratch"     # scratch, resume, gpt2[-medium|-large|-xl], or a GPT-2 path
    n_layer: int = 4               # transformer blocks
    n_head: int = 4                # attention heads per block
    n_embd: int = 128              # the width of the residual stream
    block_size: int = 64           # the longest prompt + response, in tokens
    dropout: float = 0.0           # the share of activations dropped in training
    bias: bool = True              # biases in Linears and LayerNorms, as GPT-2 has
    vocab_size: int = 0            # 0: the tokenizer's, rounded up to a multiple of 64
    # loss
    loss: str = "orpo"             # the objective: orpo; prob, sum (ablations); simpo; dpo
    lam: float = 1.0               # weight of L_OR; 0 gives plain SFT through the same loop
    sft_on_prompt: bool = False    # paper: L_SFT on response tokens only; TRL/official code: True
    hand_grad: bool = False        # backward through the hand-derived gradient (orpo_grad)
    ref: str = ""                  # dpo: the reference checkpoint, usually the SFT run's ckpt.pt
    beta: float = 0.1              # dpo: its beta, the strength of the pull towards --ref
    # optimisation
    batch_size: int = 32           # pairs per micro-step (each pair is 2 sequences)
    grad_accum: int = 1            # micro-steps per optimizer step (summed over DDP ranks)
    max_iters: int = 600           # optimizer steps
    lr_decay_iters: int = 0        # where the cosine ends; 0: max_iters
    lr: float = 1e-3               # the peak learning rate
    min_lr: float = 1e-4           # the learning rate at the end of the cosine
    warmup_iters: int = 30         # steps of linear warmup to lr
    weight_decay: float = 0.1      # AdamW's, on matrices only
    beta1: float = 0.9             # AdamW's first-moment decay
    beta2: float = 0.95            # AdamW's second-moment decay
    grad_clip: float = 1.0         # 0: no clipping
    # eval and sampling
    eval_interval: int = 100       # steps between held-out evals (each saves the checkpoint)
    eval_pairs: int = 500          # held-out pairs per eval
    log_interval: int = 20         # steps between printed loss lines
    n_samples: int = 1000          # held-out prompts answered and judged before and after training
    temperature: float = 1.0       # sampling temperature; 0: greedy
    top_k: int = 0                 # 0: no top-k
    max_new_tokens: int = 32       # the longest sampled answer
    # system
    device: str = "auto"           # auto: cuda, then mps, then cpu
    dtype: str = "auto"            # auto: bf16 on GPU (fp16 if old) or bf16-native CPU; else fp32
    compile: bool = False          # torch.compile the model
    nproc: int = 1                 # processes (DDP: gloo on CPUs, NCCL on GPUs); orpo.py starts them
    seed: int = 1337               # the weights, the data order and the samples

PRESETS = {
    # seconds, for tests
    "tiny": dict(n_layer=2, n_head=2, n_embd=32, block_size=64, batch_size=8, max_iters=20,
                 warmup_iters=2, eval_interval=10, eval_pairs=32, log_interval=5, n_samples=8,
                 dtype="float32", out_dir="out-tiny"),
    # the CPU demo, fp32: bf16 rounds differently on each CPU kernel (AMX, AVX-512, emulated)
    "small": dict(dtype="float32", out_dir="out-small"),
    # GPT-2 small (124M) on UltraFeedback, about one epoch, as the paper does; lam, lr, warmup
    # and the batch of 32 are the authors' recipe (xfactlab/orpo, run_mistral_orpo_beta.sh)
    "gpt2-125m": dict(dataset="ultrafeedback", init_from="gpt2", n_layer=12, n_head=12,
                      n_embd=768, block_size=1024, vocab_size=50304, lam=0.1, lr=5e-6,
                      min_lr=5e-7, warmup_iters=200, batch_size=4, grad_accum=8,
                      max_iters=2000, weight_decay=0.0, eval_interval=200, eval_pairs=256,
                      n_samples=8, max_new_tokens=256, out_dir="out-gpt2-125m"),
}
RULES = {"loss": (lambda v: v in LOSSES, "one of " + ", ".join(LOSSES))}  # cli.check's, for --loss

# ----------------------------------------------------------------------------------------
# Batching: token arrays -> one padded (2B, T) batch, so one forward pass serves both sides of each pair

def make_batch(split, rows, device):
    """Pairs `rows` of a split -> x, y (2B, T) int64, and two float masks (2B, T): resp_mask
    marks the response targets (the end-of-text token included), seq_mask every non-pad one."""
    tokens, index = split
    seqs, n_prompt = [], []
    for side in (CHOSEN, REJECTED):
        for r in rows:
            off, p, c = (int(v) for v in index[r][:REJECTED])
            start = off + p + (c if side == REJECTED else 0)
            seqs.append(np.concatenate([tokens[off:off + p], tokens[start:start + index[r][side]]]))
            n_prompt.append(p)
    T = max(len(s) for s in seqs) - 1
    x, y = np.zeros((2, len(seqs), T), np.int64)
    resp_mask, seq_mask = np.zeros((2, len(seqs), T), np.float32)
    for i, (s, p) in enumerate(zip(seqs, n_prompt)):
        n = len(s) - 1
        x[i, :n], y[i, :n] = s[:-1], s[1:]
        resp_mask[i, p - 1:n] = 1.0  # target t is token t+1: the response starts at target p-1
        seq_mask[i, :n] = 1.0
    return tuple(torch.from_numpy(a).to(device, non_blocking=True) for a in (x, y, resp_mask, seq_mask))

def batch_order(index, batch_size, seed, epoch):
    """One epoch's batches, a function of (seed, epoch) alone, so a resumed run sees what an
    uninterrupted one would; sorted by length within windows of 64 batches, so a batch pads little."""
    rng = np.random.default_rng([seed, epoch])
    perm = rng.permutation(len(index))
    length = index[:, PROMPT] + np.maximum(index[:, CHOSEN], index[:, REJECTED])
    win = 64 * batch_size
    perm = np.concatenate([w[np.argsort(length[w], kind="stable")]
                           for w in np.split(perm, range(win, len(perm), win))])
    batches = [perm[i:i + batch_size] for i in range(0, len(perm) - batch_size + 1, batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]

def step_rows(index, cfg, epoch, pos, rank, world):
    """From (epoch, pos) on: this process's rows of each step's grad_accum micro-batches, and
    (epoch, pos) after it. Every process walks the whole order and keeps its share."""
    order = batch_order(index, cfg.batch_size, cfg.seed, epoch)
    while True:
        rows = []
        for micro in range(cfg.grad_accum):
            if pos == len(order):  # the next epoch: an order of its own
                epoch, pos = epoch + 1, 0
                order = batch_order(index, cfg.batch_size, cfg.seed, epoch)
            if micro % world == rank:
                rows.append(order[pos])
            pos += 1
        yield rows, epoch, pos

# ----------------------------------------------------------------------------------------
# One training step: the model gives the fused token log-probs; amp: autocast (fp32: none)

def forward(model, batch, amp, cfg, loss, ref=None, hand_grad=False):
    """A batch's loss under `loss`, a LOSSES entry, and ORPO's terms (parts) for the log."""
    x, y, resp_mask, seq_mask = batch
    scored = (seq_mask if cfg.sft_on_prompt else resp_mask).bool()  # where the loss reads
    if hand_grad:  # the hand-derived backward starts from the logits
        with amp:
            logits = model(x, scored)
        out, l_sft, l_or = HandORPO.apply(logits, y, resp_mask, seq_mask, scored, cfg.lam,
                                          cfg.sft_on_prompt)
        return out, dict(l_sft=l_sft, l_or=l_or)
    with amp:
        tok = model(x, scored, y[scored])  # log P(y_t) where the loss reads
    logp, ell = response_logps(tok, resp_mask, scored, mean=loss.mean)
    l_sft = sft_loss(logp, ell, seq_mask, cfg.sft_on_prompt)  # Eq. 1
    if not loss.ref:
        return loss.fn(ell, l_sft, lam=cfg.lam)
    with torch.no_grad(), amp:  # the frozen reference: a forward pass, every batch
        ref_tok = ref(x, scored, y[scored])
    total = lambda t: response_logps(t, resp_mask, scored, mean=False)[1]  # DPO sums, no 1/m
    return loss.fn(ell, l_sft, lam=cfg.lam, pi=total(tok), ref=total(ref_tok), beta=cfg.beta)

def objective(cfg, amp, ref=None):
    """The loss that cfg trains on, as loss_fn(model, batch) -> (loss, parts)."""
    return functools.partial(forward, amp=amp, cfg=cfg, loss=LOSSES[cfg.loss], ref=ref,
                             hand_grad=cfg.hand_grad)

def lr_at(it, cfg):
    if it < cfg.warmup_iters:
        return cfg.lr * (it + 1) / cfg.warmup_iters
    end = cfg.lr_decay_iters or cfg.max_iters
    frac = min(1.0, (it - cfg.warmup_iters) / max(1, end - cfg.warmup_iters))
    return cfg.min_lr + 0.5 * (1 + math.cos(math.pi * frac)) * (cfg.lr - cfg.min_lr)

def train_step(model, opt, scaler, batches, loss_fn, lr, grad_clip):
    """One optimizer step at lr; returns [loss, L_SFT, L_OR], averaged over the micro-batches and
    every process, as floats (one device sync); FloatingPointError, before the step, if not finite."""
    for g in opt.param_groups:
        g["lr"] = lr
    ddp = isinstance(model, torch.nn.parallel.DistributedDataParallel)
    tot = torch.zeros(3, device=batches[0][0].device)  # loss, L_SFT, L_OR
    for i, batch in enumerate(batches):
        last = i == len(batches) - 1  # DDP averages the gradients on a process's last
        with (model.no_sync() if ddp and not last else contextlib.nullcontext()):
            loss, parts = loss_fn(model, batch)
            scaler.scale(loss / len(batches)).backward()
        tot += torch.stack([loss.detach(), parts["l_sft"].detach(), parts["l_or"].detach()])
    tot /= len(batches) * (torch.distributed.get_world_size() if ddp else 1)
    if ddp:
        torch.distributed.all_reduce(tot)
    vals = tot.tolist()
    bad = [f"{n}={v}" for n, v in zip(("loss", "L_SFT", "L_OR"), vals) if not math.isfinite(v)]
    if bad:  # stop, not skip: a NaN means a bug or a diverged run, never noise to step over
        raise FloatingPointError(f"non-finite {', '.join(bad)}")
    if grad_clip > 0:
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    scaler.step(opt)
    scaler.update()
    opt.zero_grad(set_to_none=True)
    return vals

@torch.no_grad()
def evaluate(model, split, cfg, device, amp):
    """ORPO's terms on the first eval_pairs held-out pairs, whatever the objective trained."""
    model.eval()
    n, sums = min(cfg.eval_pairs, len(split[1])), {}
    for i in range(0, n, cfg.batch_size):
        rows = range(i, min(i + cfg.batch_size, n))
        _, parts = forward(model, make_batch(split, rows, device), amp, cfg, LOSSES["orpo"])
        for k, v in parts.items():
            sums[k] = sums.get(k, 0.0) + v.item() * len(rows)
    model.train()
    m = {k: v / n for k, v in sums.items()}
    return dict(m, margin=m["ell_w"] - m["ell_l"])

# ----------------------------------------------------------------------------------------
# Training: set up, then the loop

def train(cfg, preset="custom"):
    """Train as cfg says; returns the summary (process 0's; None on the others)."""
    t_begin, loss = time.time(), LOSSES[cfg.loss]
    rank, world, device = procs.start(cfg)  # one process, or one of torchrun's
    master, log, s0, summary = rank == 0, None, None, None  # the log: process 0's alone
    with checkpoint.RunDir(cfg.out_dir, rank) as run:  # its lock; Ctrl-C: one line
        torch.manual_seed(cfg.seed + rank)
        dev, dev_type, dtype, amp = setup_device(device, cfg.dtype)
        ck = run.resume_state(cfg) if cfg.init_from == "resume" else None
        with procs.rank0_first(world, rank):  # the first process prepares the data
            meta, data, enc = prepare_data.for_run(cfg)
        (tokens, index), val = data["train"], data["val"]
        # raw: the GPT itself, which eval, sampling and checkpoints read; model: what trains,
        # raw under torch.compile and DDP where asked (they wrap forward, the fused log-probs)
        raw = checkpoint.build_model(cfg, meta, run.path, ck).to(dev)
        ref = checkpoint.load_reference(cfg, meta, raw).to(dev) if loss.ref else None
        opt = raw.configure_optimizer(cfg.weight_decay, cfg.lr, (cfg.beta1, cfg.beta2), dev_type, dtype)
        scaler = torch.amp.GradScaler(dev_type, enabled=dtype == "float16")
        it, epoch, pos, history, seconds = run.restore(ck, opt, scaler, rank, world, dev_type)
        run.claim(cfg, resume=ck is not None)  # one run per out_dir
        model = procs.wrap(torch.compile(raw) if cfg.compile else raw, world, dev, dev_type)
        judge = report.Judge(val, enc, meta, cfg, dev, amp)  # samples answers; judges them
        if master:  # a resumed run keeps its log up to the checkpoint, and the samples before
            log, s0 = report.open_log(cfg.out_dir, it if ck else None)
            report.print_start(preset, raw, dev, dtype, cfg, len(index), world)
        loss_fn, steps = objective(cfg, amp, ref), step_rows(index, cfg, epoch, pos, rank, world)
        start, t_loop, speed = it, time.time() - seconds, report.Speed(index, world)  # resumed: start > 0
        while True:
            if (it % cfg.eval_interval == 0 or it == cfg.max_iters) and (it == 0 or it > start):
                rng = procs.rng_states(world, dev_type) if it else None  # every process takes part
                m = evaluate(raw, val, cfg, dev, amp) if master else None  # the held-out eval
                if master:  # then the samples before training, or a checkpoint
                    history.append(report.record_eval(log, it, m))
                if master and it == 0:
                    s0 = report.record_samples(log, 0, "before training", judge(raw))
                elif master:
                    run.save(raw, cfg, meta, opt, scaler, rng, iter=it, epoch=epoch, pos=pos,
                             history=history, seconds=time.time() - t_loop)
            if it == cfg.max_iters:
                break
            lr = lr_at(it, cfg)
            rows, epoch, pos = next(steps)
            batches = [make_batch((tokens, index), r, dev) for r in rows]
            try:
                vals = train_step(model, opt, scaler, batches, loss_fn, lr, cfg.grad_clip)
            except FloatingPointError as e:  # before the step: the last checkpoint stands
                die(f"iteration {it + 1}: {e}; stopped before the step, nothing saved ({run.kept()})")
            it += 1
            report.write(log, dict(kind="train", iter=it, loss=vals[0], l_sft=vals[1], l_or=vals[2], lr=lr))
            speed.step(rows, it, vals, lr, master and (it % cfg.log_interval == 0 or it == cfg.max_iters))
        if master:  # sample after training; print and write the summary
            seconds, s1 = time.time() - t_loop, report.record_samples(log, it, "after training", judge(raw))
            summary = report.finish(log, cfg, preset, loss, history, s0, s1, seconds,
                                    time.time() - t_begin, min(cfg.eval_pairs, len(val[1])), world, dev_type)
    del model  # DDP holds the process group: let go of it before procs.stop ends the group
    procs.stop(world)
    return summary

def main():
    sys.stdout.reconfigure(line_buffering=True)  # log lines appear as they happen, piped too
    preset, cfg, _ = parse_args(sys.argv[1:], Config, PRESETS, rules=RULES)
    if LOSSES[cfg.loss].ref and not cfg.ref:  # before any work
        die(f"--loss={cfg.loss} needs --ref=PATH, the frozen reference: a checkpoint, usually the SFT run's")
    train(cfg, preset)

if __name__ == "__main__":
    main()
