"""A GPT in the nanoGPT manner, with GPT-2's module names: pre-LayerNorm blocks of causal
self-attention and a GELU MLP, tied input and output embeddings, GPT-2 init. Reading and
writing GPT-2's Hugging Face files is machinery/gpt2.py's work, not this file's.
"""
import inspect
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class GPTConfig:
    block_size: int = 1024
    vocab_size: int = 50304  # embedding rows: GPT-2's 50257 padded to a multiple of 64, for speed
    n_vocab: int = 0  # the tokenizer's ids, the only ones that take probability; 0: all vocab_size
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True  # GPT-2 has biases in its Linears and LayerNorms


def padded_vocab(n_vocab):
    """n_vocab rounded up to a multiple of 64: matmuls over the vocabulary run faster."""
    return -(-n_vocab // 64) * 64


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.n_head, self.dropout = cfg.n_head, cfg.dropout
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)  # q, k, v at once
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, kv=None):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)  # 3 x (B, T, C)
        # (B, T, C) -> (B, nh, T, hs): each head attends over its own hs = C / nh channels
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        if kv is not None:  # generate's KV cache: this layer's keys and values so far ([])
            if kv:  # the earlier S - T positions' keys and values, computed once, not again
                assert T == 1, "after the first pass the KV cache takes one token at a time"
                k, v = torch.cat((kv[0], k), 2), torch.cat((kv[1], v), 2)  # (B, nh, S, hs)
            kv[:] = [k, v]
        # one new query (T = 1) after a cache sees every key: no mask (is_causal would align
        # it with the first key); else T = S and the mask is the causal one
        y = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1,  # (B, nh, T, hs)
                                           dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C): the heads side by side again
        return self.drop(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x):
        # (B, T, C) -> (B, T, 4C) -> (B, T, C); tanh GELU is GPT-2's "gelu_new"
        return self.drop(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.mlp = MLP(cfg)

    def forward(self, x, kv=None):
        x = x + self.attn(self.ln_1(x), kv)
        x = x + self.mlp(self.ln_2(x))
        return x


def _like(buf, t):
    """A contiguous tensor of t's shape over the start of the flat buffer buf."""
    return buf[:t.numel()].view(t.shape)


def _logits(h, w, buf):
    """h @ w^T (N, chunk), written into the start of the flat buffer buf."""
    return torch.mm(h, w.t(), out=buf[:h.size(0) * w.size(0)].view(h.size(0), w.size(0)))


def _logsumexp(z, buf):
    """torch.logsumexp(z, 1), in buf's dtype (fp32) and its memory, with the same arithmetic."""
    m = z.amax(1, keepdim=True).to(buf.dtype)  # (N, 1): the max of bf16 values is exact
    e = torch.sub(z, m, out=_like(buf, z)).exp_()  # z - m: bf16 z is exact in fp32
    return e.sum(1).log_().add_(m[:, 0])  # (N,)


class TokenLogProbs(torch.autograd.Function):
    """log softmax(h W^T)[y] at N positions: the fused cross-entropy that ORPO's log-probs
    come from. With GPT-2's vocabulary of 50k, the (N, vocab) logits would be gigabytes,
    written, read once and kept for the backward. Instead log p(y) = z_y - logsumexp_v z_v
    with z = h W^T takes z_y as one dot product per position and the logsumexp a slice of
    `chunk` vocabulary columns at a time, each (N, chunk) slice still in cache for its
    softmax; the backward recomputes each slice's logits (one more matmul) rather than keeping
    them, which saves those gigabytes and the time to allocate them.

    The slices' temporaries live in buffers allocated once per call, not in fresh 4-16 MB
    tensors for each slice (memory the system must map and zero each time), and each
    elementwise step writes its result where the next one reads it: z - max is one pass from
    the logits into the fp32 buffer, not a copy and then a subtraction (BENCHMARKS.md has
    the timings)."""

    @staticmethod
    def forward(ctx, h, w, y, chunk, n_vocab=None):
        auto = torch.is_autocast_enabled(h.device.type)
        dt = torch.get_autocast_dtype(h.device.type) if auto else h.dtype  # matmuls follow autocast
        f = torch.promote_types(h.dtype, torch.float32)  # the softmax is always fp32 or wider
        hd, wd = h.to(dt), w[:n_vocab].to(dt)  # cast once: the backward reuses them
        zbuf, sbuf = hd.new_empty(h.size(0) * chunk), h.new_empty(h.size(0) * chunk, dtype=f)
        lse = torch.stack([_logsumexp(_logits(hd, wd[j:j + chunk], zbuf), sbuf)  # (N,) a slice
                           for j in range(0, wd.size(0), chunk)], 1).logsumexp(1)  # (N,)
        ctx.save_for_backward(h, w, hd, wd, y, lse)
        ctx.chunk = chunk
        return (hd.to(f) * wd[y].to(f)).sum(1) - lse  # (N,)

    @staticmethod
    def backward(ctx, g):
        h, w, hd, wd, y, lse = ctx.saved_tensors
        # d log p(y) / dz = onehot(y) - softmax(z), times the incoming gradient g: the
        # softmax part a slice at a time, the one-hot part once at the end
        dh, dw = torch.zeros_like(h), torch.empty_like(w)
        dw[wd.size(0):] = 0  # padding rows: never in a softmax
        zbuf, pbuf = hd.new_empty(h.size(0) * ctx.chunk), hd.new_empty(h.size(0) * ctx.chunk)
        sbuf = lse.new_empty(h.size(0) * ctx.chunk)
        for j in range(0, wd.size(0), ctx.chunk):
            s = slice(j, min(j + ctx.chunk, wd.size(0)))
            z = _logits(hd, wd[s], zbuf)  # (N, chunk)
            p = torch.sub(z, lse[:, None], out=_like(sbuf, z)).exp_()  # the softmax slice, fp32
            p = torch.mul(p, -g[:, None], out=_like(pbuf, z))  # to the matmul dtype as it stores
            dh += p @ wd[s]  # (N, chunk) @ (chunk, C) -> (N, C)
            if dw.dtype == p.dtype:  # (chunk, N) @ (N, C) -> (chunk, C), straight into dw
                torch.mm(p.t(), hd, out=dw[s])
            else:  # a 16-bit product (autocast), stored into the fp32 gradient
                dw[s] = p.t() @ hd
        dh += g[:, None] * w[y]
        dw.index_add_(0, y, (g[:, None] * h).to(dw.dtype))
        return dh, dw, None, None, None


class GPT(nn.Module):
    chunk = 1024  # vocabulary columns per slice of TokenLogProbs

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        assert cfg.n_embd % cfg.n_head == 0, "n_embd must be divisible by n_head"
        assert 0 <= cfg.n_vocab <= cfg.vocab_size, "n_vocab must be at most vocab_size"
        self.cfg = cfg
        self.n_vocab = cfg.n_vocab or cfg.vocab_size
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)
        self.h = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # tied embeddings
        # GPT-2 init: N(0, 0.02), and the projections into the residual stream scaled by
        # 1/sqrt(2 n_layer) so that the residual's variance does not grow with depth.
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, 0.0, 0.02 / math.sqrt(2 * cfg.n_layer))
            elif p.dim() >= 2:
                nn.init.normal_(p, 0.0, 0.02)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def num_params(self, non_embedding=True):
        n = sum(p.numel() for p in self.parameters())
        return n - self.wpe.weight.numel() if non_embedding else n

    def hidden(self, idx, cache=None):
        """The last hidden states (B, T, C), after ln_f: what the output layer reads. With a
        KV cache (a list per layer, see generate), idx holds the tokens after those cached."""
        B, T = idx.shape
        t0 = cache[0][0].size(2) if cache and cache[0] else 0  # positions already cached
        if t0 + T > self.cfg.block_size:
            raise ValueError(f"sequence of length {t0 + T} exceeds "
                             f"block_size {self.cfg.block_size}")
        pos = torch.arange(t0, t0 + T, device=idx.device)  # (T,)
        x = self.drop(self.wte(idx) + self.wpe(pos))  # (B, T, C) + (T, C) -> (B, T, C)
        for i, block in enumerate(self.h):
            x = block(x, cache[i] if cache is not None else None)
        return self.ln_f(x)  # (B, T, C)

    def forward(self, idx, need=None, targets=None):
        """Logits over the n_vocab real ids: (B, T, n_vocab), or with a bool mask `need` (B, T)
        only at the N positions it marks, (N, n_vocab): ORPO scores the responses, and never
        uses the prompt's. Given targets (N,) too: log P(target) (N,) there instead, fp32 or
        wider, through TokenLogProbs. (DDP and torch.compile wrap forward alone, so the loss
        reads the model through it.)"""
        x = self.hidden(idx)  # (B, T, C)
        if need is not None:
            x = x[need]  # (N, C)
        if targets is not None:
            return TokenLogProbs.apply(x, self.lm_head.weight, targets, self.chunk, self.n_vocab)  # (N,)
        return F.linear(x, self.lm_head.weight[:self.n_vocab])  # (..., n_vocab): no padding id

    def flops(self, tokens, n_logits, T):
        """FLOPs of one forward and backward (3x the forward) over `tokens` tokens in rows of
        length T: the blocks' matmuls (6 per parameter per token), attention's scores and
        values (12 L C T per token, nanoGPT's count), and the output layer's n_vocab
        columns at the n_logits positions that compute it."""
        c = self.cfg
        n_blocks = sum(p.numel() for p in self.h.parameters())
        return (6 * n_blocks * tokens + 12 * c.n_layer * c.n_embd * T * tokens
                + 6 * c.n_embd * self.n_vocab * n_logits)

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, eot=None, generator=None,
                 cache=True):
        """Sample continuations of idx (B, T), from the last position's logits only. A row
        that has sampled the end-of-text token eot keeps emitting it; sampling stops as soon
        as every row has. With the KV cache (cache=True), each new token runs alone through
        the model, attending over the keys and values kept from the tokens before it: the
        same logits as running the whole context again (cache=False), within fp32 rounding,
        for a fraction of the work. Past block_size the context slides, and every position
        moves: there each token recomputes the last block_size, as cache=False always does."""
        w = self.lm_head.weight[:self.n_vocab]  # padding ids are never sampled
        done = torch.zeros(idx.size(0), dtype=torch.bool, device=idx.device)
        kv = None
        for _ in range(max_new_tokens):
            if kv and idx.size(1) <= self.cfg.block_size:  # the cache holds all but the last
                x = self.hidden(idx[:, -1:], kv)[:, -1]  # (B, C)
            else:  # the whole context (at most block_size), which fills a fresh cache
                kv = [[] for _ in self.h] if cache else None
                x = self.hidden(idx[:, -self.cfg.block_size:], kv)[:, -1]  # (B, C)
            logits = F.linear(x, w).float()  # (B, n_vocab)
            if temperature == 0:
                nxt = logits.argmax(-1, keepdim=True)  # (B, 1)
            else:
                logits = logits / temperature
                if top_k is not None:
                    kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]  # (B, 1)
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                nxt = torch.multinomial(F.softmax(logits, dim=-1), 1, generator=generator)  # (B, 1)
            if eot is not None:
                nxt = nxt.masked_fill(done[:, None], eot)
                done |= nxt[:, 0] == eot
            idx = torch.cat((idx, nxt), dim=1)  # (B, T + 1)
            if done.all():
                break
        return idx

    def configure_optimizer(self, weight_decay, lr, betas, device_type, dtype="float32"):
        # Decay the matrices (Linear weights, embeddings); never biases or LayerNorm gains.
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
        # The fused kernel updates each tensor in one pass, several times faster on a CPU
        # than the for-each version (BENCHMARKS.md). Its rounding differs in the last
        # bit, which moves fp32 results after hundreds of steps; so fp32 training (`dtype`)
        # on the CPU keeps the for-each version, whose numbers are the reference ones.
        fused = device_type == "cuda" or dtype != "float32"
        fused = fused and "fused" in inspect.signature(torch.optim.AdamW).parameters
        return torch.optim.AdamW(groups, lr=lr, betas=betas, **({"fused": True} if fused else {}))
