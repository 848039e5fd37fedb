"""ORPO: Odds Ratio Preference Optimization (Hong, Lee & Thorne, 2024, arXiv 2403.07691).
One phase, no reference model: L = L_SFT + lam * L_OR (Eq. 6), averaged over the pairs.
Top to bottom: the loss and its gradient by hand, the ablations and compared methods, the
config, batching, one step, eval, train(). machinery/ holds what a student need not read.

    python orpo.py --config small     # the CPU demo (prepares its data itself); --lam=0: SFT
    python orpo.py --help             # every key, what it does, and the presets
    torchrun --standalone --nproc_per_node=2 orpo.py --config tiny --grad_accum=2   # DDP
"""
from machinery import boot  # first: it sets what torch reads as it loads
import collections
import contextlib
import functools
import math
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from machinery import procs, report
from machinery.checkpoint import RunDir, build_model, load_data, load_reference
from machinery.cli import parse_args, setup_device
from machinery.safe import die
from model import Scorer
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
    """A batch's terms, averaged over the pairs, and the share of pairs ranked right."""
    return dict(l_sft=l_sft.mean(), l_or=l_or.mean(), ell_w=ell_w.mean(), ell_l=ell_l.mean(),
                log_or=log_or.mean(), acc=(log_or > 0).float().mean())

def orpo_loss(logp, ell, seq_mask, *, lam, sft_on_prompt=False):
    """L = L_SFT + lam * L_OR (Eq. 6), averaged over the B pairs. Returns (loss, parts)."""
    ell_w, ell_l = ell.chunk(2)  # chosen rows first
    l_sft = sft_loss(logp, ell, seq_mask, sft_on_prompt)  # Eq. 1
    l_or, log_or = odds_ratio_loss(ell_w, ell_l)           # Eqs. 4, 5, 7
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
        loss, parts = orpo_loss(logp, ell, seq_mask, lam=lam, sft_on_prompt=sft_on_prompt)
        ctx.save_for_backward(logits, y, resp_mask, seq_mask, scored, ell)
        ctx.lam, ctx.sft_on_prompt = lam, sft_on_prompt
        ctx.mark_non_differentiable(parts["l_sft"], parts["l_or"])  # for logging only
        return loss, parts["l_sft"], parts["l_or"]

    @staticmethod
    def backward(ctx, g_loss, _, __):
        """g_loss, dJ/dloss -> dJ/dlogits (N, V) in logits' dtype, then None for each other input."""
        logits, y, resp_mask, seq_mask, scored, ell = ctx.saved_tensors
        B = ell.size(0) // 2
        g_w, g_l = orpo_grad(ell[:B], ell[B:], ctx.lam)
        if ctx.sft_on_prompt:
            g_w = g_w + 1 / B  # take out the response-only L_SFT; the prompt-wide one is below
        tok = torch.cat([g_w, g_l])[:, None] * resp_mask / resp_mask.sum(1, keepdim=True)
        if ctx.sft_on_prompt:
            tok[:B] -= seq_mask[:B] / seq_mask[:B].sum(1, keepdim=True) / B
        g = -torch.softmax(logits.to(ell.dtype), -1)  # dlogp_t/dlogits_t = onehot(y_t) - softmax_t
        g.scatter_add_(-1, y[scored][:, None], torch.ones_like(g[:, :1]))
        return (g * (g_loss * tok[scored])[:, None]).to(logits.dtype), *[None] * 6

# ----------------------------------------------------------------------------------------
# Ablations and compared methods, each a loss of its own: the probability ratio (Sec. 7.1;
# --ratio=prob), summed log-probs (--logp=sum), SimPO (--ratio=simpo), DPO (--loss=dpo).

def prob_ratio_loss(logp, ell, seq_mask, *, lam, sft_on_prompt=False):
    """Eq. 6 with the probability ratio for the odds ratio (Sec. 7.1): log P_w/P_l = ℓ_w - ℓ_l."""
    ell_w, ell_l = ell.chunk(2)  # chosen rows first
    l_sft, log_ratio = sft_loss(logp, ell, seq_mask, sft_on_prompt), ell_w - ell_l
    l_or = -F.logsigmoid(log_ratio)
    return (l_sft + lam * l_or).mean(), pair_means(l_sft, l_or, ell_w, ell_l, log_ratio)

def simpo_loss(ell_w, ell_l, *, beta=2.0, gamma=1.0):
    """SimPO (Meng, Xia & Chen, 2024), reference-free too, per pair: -log sigma(beta (ℓ_w -
    ℓ_l) - gamma), on Eq. 3's mean log-probs, with a target margin gamma and no SFT term."""
    return -F.logsigmoid(beta * (ell_w - ell_l) - gamma)

def simpo_objective(logp, ell, seq_mask, *, lam, sft_on_prompt=False):
    """SimPO's loss alone (no L_SFT, lam unused); parts: L_SFT measured, ℓ_w - ℓ_l as log_or."""
    ell_w, ell_l = ell.chunk(2)  # chosen rows first
    l_sft, l_or = sft_loss(logp, ell, seq_mask, sft_on_prompt), simpo_loss(ell_w, ell_l)
    return l_or.mean(), pair_means(l_sft, l_or, ell_w, ell_l, ell_w - ell_l)

def dpo_loss(pi, ref, *, beta):
    """DPO (Rafailov et al. 2023, their Eq. 7) from pi, ref (2B,), the SUMMED log-probs under
    the policy and the frozen reference: L = -log sigma(beta (log-ratio_w - log-ratio_l))."""
    B = pi.size(0) // 2
    z = beta * ((pi[:B] - ref[:B]) - (pi[B:] - ref[B:]))  # the implicit reward margin
    return -F.logsigmoid(z).mean()

LOSSES = {"odds": orpo_loss, "prob": prob_ratio_loss, "simpo": simpo_objective}  # --ratio

# ----------------------------------------------------------------------------------------
# Config: one dataclass and named presets; machinery/cli.py checks --key=value overrides

@dataclass
class Config:
    # data
    dataset: str = "synthetic"     # synthetic, hh-rlhf, ultrafeedback, or a name for data_file
    data_file: str = ""            # a local .jsonl(.gz)/.json/.parquet of pairs to prepare
    data_dir: str = ""             # the prepared files; default: data/<dataset or data_file's name>
    out_dir: str = "out"           # the checkpoint, log.jsonl and summary.json
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
    lam: float = 1.0               # weight of L_OR; 0 gives plain SFT through the same loop
    sft_on_prompt: bool = False    # paper: L_SFT on response tokens only; TRL/official code: True
    hand_grad: bool = False        # backward through the hand-derived gradient (orpo_grad)
    ratio: str = "odds"            # odds: ORPO (Eq. 5); prob: P_w/P_l (Sec. 7.1); simpo: SimPO
    logp: str = "mean"             # mean: Eq. 3's length-normalised log P(y|x); sum: summed
    loss: str = "orpo"             # dpo: Rafailov et al. (2023), against the frozen model --ref
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

# ----------------------------------------------------------------------------------------
# Batching: prepare_data.py's token arrays -> one padded (2B, T) tensor per batch, chosen
# rows first, so one forward pass serves both sides of every pair.

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
    t = lambda a: torch.from_numpy(a).to(device, non_blocking=True)
    return t(x), t(y), t(resp_mask), t(seq_mask)

def batch_order(index, batch_size, seed, epoch):
    """One epoch's batches, a function of (seed, epoch) alone, so a resumed run sees what an
    uninterrupted one would: pairs shuffled, sorted by length within windows of 64 batches
    (so a batch pads little), cut into batches, the batches shuffled."""
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
# One training step. model.Scorer returns the token log-probs at the scored positions, fused
# (no (2B, T, V) logits). Each objective is (model, batch, ctx) -> (loss, parts).

def orpo_forward(model, batch, ctx, *, lam, sft_on_prompt=False, ratio="odds", logp="mean",
                 hand_grad=False):
    """ORPO's loss of a batch (Eq. 6), its ablations, or with hand_grad orpo_grad's backward."""
    x, y, resp_mask, seq_mask = batch
    scored = (seq_mask if sft_on_prompt else resp_mask).bool()  # where the loss reads
    if hand_grad:  # the hand-derived backward starts from the logits
        with ctx:
            logits = model(x, scored)
        loss, l_sft, l_or = HandORPO.apply(logits, y, resp_mask, seq_mask, scored, lam,
                                           sft_on_prompt)
        return loss, dict(l_sft=l_sft, l_or=l_or)
    with ctx:
        tok = model(x, scored, y[scored])  # log P(y_t) where the loss reads
    logp, ell = response_logps(tok, resp_mask, scored, mean=logp == "mean")
    return LOSSES[ratio](logp, ell, seq_mask, lam=lam, sft_on_prompt=sft_on_prompt)

def dpo_forward(model, batch, ctx, *, ref, beta, lam, sft_on_prompt=False):
    """DPO's loss of a batch against the frozen ref; its parts are ORPO's terms, measured."""
    x, y, resp_mask, seq_mask = batch
    scored = (seq_mask if sft_on_prompt else resp_mask).bool()
    with ctx:
        tok = model(x, scored, y[scored])
    with torch.no_grad(), ctx:  # the reference: a forward pass without gradients, every batch
        ref_tok = ref(x, scored, y[scored])
    pi_sum = response_logps(tok, resp_mask, scored, mean=False)[1]  # DPO sums, no 1/m
    ref_sum = response_logps(ref_tok, resp_mask, scored, mean=False)[1]
    with torch.no_grad():
        logp, ell = response_logps(tok, resp_mask, scored)
        parts = orpo_loss(logp, ell, seq_mask, lam=lam, sft_on_prompt=sft_on_prompt)[1]
    return dpo_loss(pi_sum, ref_sum, beta=beta), parts

def objective(cfg, ref=None):
    """The loss that cfg trains on, as loss_fn(model, batch, ctx) -> (loss, parts)."""
    if cfg.loss == "dpo":
        return functools.partial(dpo_forward, ref=ref, beta=cfg.beta, lam=cfg.lam,
                                 sft_on_prompt=cfg.sft_on_prompt)
    return functools.partial(orpo_forward, lam=cfg.lam, sft_on_prompt=cfg.sft_on_prompt,
                             ratio=cfg.ratio, logp=cfg.logp, hand_grad=cfg.hand_grad)

def lr_at(it, cfg):
    """Linear warmup, then cosine decay to min_lr at lr_decay_iters (default max_iters)."""
    if it < cfg.warmup_iters:
        return cfg.lr * (it + 1) / cfg.warmup_iters
    end = cfg.lr_decay_iters or cfg.max_iters
    frac = min(1.0, (it - cfg.warmup_iters) / max(1, end - cfg.warmup_iters))
    return cfg.min_lr + 0.5 * (1 + math.cos(math.pi * frac)) * (cfg.lr - cfg.min_lr)

def train_step(model, opt, scaler, batches, loss_fn, ctx, lr, grad_clip):
    """One optimizer step at lr over this process's micro-batches, gradients averaged (by DDP
    over the processes too) and clipped. Returns [loss, L_SFT, L_OR], averaged over every
    process, as floats (one device sync); FloatingPointError, before the step, if not finite."""
    for g in opt.param_groups:
        g["lr"] = lr
    ddp = isinstance(model, torch.nn.parallel.DistributedDataParallel)
    tot = torch.zeros(3, device=batches[0][0].device)  # loss, L_SFT, L_OR
    for i, batch in enumerate(batches):
        last = i == len(batches) - 1  # DDP averages the gradients on a process's last
        with (model.no_sync() if ddp and not last else contextlib.nullcontext()):
            loss, parts = loss_fn(model, batch, ctx)
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

# ----------------------------------------------------------------------------------------
# Eval: the held-out loss terms (report.sample_and_judge samples answers for the judge)

@torch.no_grad()
def evaluate(model, split, cfg, device, ctx):
    """ORPO's terms on the first eval_pairs held-out pairs, whatever the objective trained."""
    model.eval()
    n, sums = min(cfg.eval_pairs, len(split[1])), {}
    for i in range(0, n, cfg.batch_size):
        rows = range(i, min(i + cfg.batch_size, n))
        _, parts = orpo_forward(model, make_batch(split, rows, device), ctx, lam=cfg.lam,
                                sft_on_prompt=cfg.sft_on_prompt)
        for k, v in parts.items():
            sums[k] = sums.get(k, 0.0) + v.item() * len(rows)
    model.train()
    m = {k: v / n for k, v in sums.items()}
    return dict(m, margin=m["ell_w"] - m["ell_l"])

# ----------------------------------------------------------------------------------------
# Training: set up, then the loop

Run = collections.namedtuple("Run", "model val meta dev ctx history summary samples")  # train's

def train(cfg, preset="custom"):
    """Train as cfg says: the set-up, the data, the model and the optimizer, then the loop."""
    t_begin = time.time()
    rank, world, device = procs.start(cfg)  # one process, or one of torchrun's
    master = rank == 0
    log = samples_before = summary = samples = None  # process 0's alone
    with RunDir(cfg.out_dir, rank) as run:  # out_dir's lock; Ctrl-C or a NaN loss: one line
        torch.manual_seed(cfg.seed + rank)
        dev, dev_type, dtype, ctx = setup_device(device, cfg.dtype)
        ck = run.resume_state(cfg) if cfg.init_from == "resume" else None
        with procs.rank0_first(world, rank):  # the first process prepares the data
            meta, data = load_data(cfg)
        train_split, val_split = data["train"], data["val"]
        raw = build_model(cfg, meta, run.path, ck).to(dev)
        ref = load_reference(cfg, meta, raw).to(dev) if cfg.loss == "dpo" else None
        run.claim(resume=cfg.init_from == "resume")  # one run per out_dir
        opt = raw.configure_optimizer(cfg.weight_decay, cfg.lr, (cfg.beta1, cfg.beta2), dev_type, dtype)
        scaler = torch.amp.GradScaler(dev_type, enabled=dtype == "float16")
        progress = run.restore(ck, opt, scaler, rank, dev_type)  # iteration 0, or the checkpoint's
        scorer = Scorer(raw)  # eval reads it as it is: one process, never compiled
        model = procs.wrap(torch.compile(scorer) if cfg.compile else scorer, world, dev, dev_type)
        loss_fn = objective(cfg, ref)
        steps = step_rows(train_split[1], cfg, progress.epoch, progress.pos, rank, world)
        if master:  # a resumed run keeps its log up to the checkpoint, and the samples before
            log, samples_before = report.open_log(cfg.out_dir, progress.it if ck else None)
            report.print_start(preset, raw, dev, dtype, cfg, len(train_split[1]), world)
        if master and progress.it == 0:
            report.record_eval(log, progress.history, 0, evaluate(scorer, val_split, cfg, dev, ctx))
            samples_before = report.sample_and_judge(raw, val_split, meta, cfg, dev, ctx)
            report.record_samples(log, 0, "before training", samples_before)
        meter = report.Meter(raw, train_split[1], cfg, world, progress, ref is not None)  # cost, tok/s
        while progress.it < cfg.max_iters:
            lr = lr_at(progress.it, cfg)
            t0 = time.time()
            rows, progress.epoch, progress.pos = next(steps)
            batches = [make_batch(train_split, r, dev) for r in rows]
            vals = train_step(model, opt, scaler, batches, loss_fn, ctx, lr, cfg.grad_clip)
            progress.it += 1
            meter.step(rows, batches, t0)
            report.write(log, dict(kind="train", iter=progress.it, loss=vals[0], l_sft=vals[1],
                                   l_or=vals[2], lr=lr))
            if master and (progress.it % cfg.log_interval == 0 or progress.it == cfg.max_iters):
                meter.print_step(progress.it, vals, lr)
            if progress.it % cfg.eval_interval == 0 or progress.it == cfg.max_iters:
                rng = procs.rng_states(world, dev_type)  # every process takes part
                if master:
                    report.record_eval(log, progress.history, progress.it,
                                       evaluate(scorer, val_split, cfg, dev, ctx))
                    run.save(raw, cfg, meta, opt, scaler, rng, meter.seconds())
        if master:  # sample after training; print and write the summary
            seconds = meter.seconds()
            samples = report.sample_and_judge(raw, val_split, meta, cfg, dev, ctx)
            report.record_samples(log, progress.it, "after training", samples)
            summary = report.finish(log, cfg, preset, history=progress.history, s0=samples_before,
                                    s1=samples, seconds=seconds, wall=time.time() - t_begin,
                                    pairs=min(cfg.eval_pairs, len(val_split[1])), cost=meter.total(dev_type))
    procs.stop(world)
    return Run(raw, val_split, meta, dev, ctx, progress.history, summary, samples)

def main():
    sys.stdout.reconfigure(line_buffering=True)  # log lines appear as they happen, piped too
    preset, cfg, _ = parse_args(sys.argv[1:], Config, PRESETS)
    train(cfg, preset)

if __name__ == "__main__":
    main()
