"""A GPT in the nanoGPT manner, with GPT-2's module names: pre-LayerNorm blocks of causal
self-attention (F.scaled_dot_product_attention) and a GELU MLP, tied input and output
embeddings, GPT-2 init.

- forward(idx, need) gives logits, at every position or only at those `need` marks: ORPO
  scores responses, and the vocab projection of the prompt is work it never uses.
- token_logps(idx, need, targets) gives log P(target) at those positions through
  TokenLogProbs, a fused cross-entropy that never holds the (N, vocab) logits.
- The embedding has vocab_size rows, the tokenizer's n_vocab rounded up to a multiple of 64
  for speed. Only the first n_vocab ids take probability: the output layer computes only
  their logits, so a padding id is never in a softmax, never a target, never sampled.
- generate() samples from the last position's logits; flops() counts a training step's
  FLOPs, for MFU.
- from_pretrained() reads any GPT-2 (a hub name, a directory as transformers writes it, a
  pytorch_model.bin or model.safetensors); export_hf() writes one that transformers reads.
- Scorer wraps a GPT for the loss: its forward gives the token log-probs, so that DDP and
  torch.compile, which wrap forward alone, see the whole computation.
"""
import inspect
import json
import math
import os
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from machinery.safe import one_line

try:  # optional: Hugging Face's model.safetensors files, read and written when it is there
    import safetensors.torch as safetensors_torch
except ImportError:
    safetensors_torch = None


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
    come from. log p(y) = z_y - logsumexp_v z_v with z = h W^T: z_y is one dot product per
    position, and the logsumexp is taken a slice of `chunk` vocabulary columns at a time, so
    the (N, vocab) logits never exist and each (N, chunk) slice is still in cache for its
    softmax. The backward recomputes each slice's logits (one more matmul) rather than
    keeping them: with a 50k vocabulary that saves gigabytes, and the time to allocate them.
    Only W's first n_vocab rows (default: all) take probability; the others get zero gradient.

    Under autocast the matmuls run in its dtype (bf16) and the softmax in fp32. The slices'
    temporaries live in buffers allocated once per call, not in fresh 4-16 MB tensors for
    each slice (memory the system must map and zero each time), and each elementwise step
    writes its result where the next one reads it: z - max is one pass from the logits into
    the fp32 buffer, not a copy and then a subtraction (BENCHMARKS.md has the timings)."""

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


# Attention runs one of two ways. SDPA's fused kernel never holds the (T, T) scores: it is
# the one for fp32 (the reference numbers were made with it), for long blocks, for dropout,
# on GPUs, and on CPUs that emulate bf16. On a CPU that multiplies bf16 in hardware (AMX
# tiles or AVX-512 BF16), under 16-bit autocast, at blocks up to PLAIN_MAX_T tokens, the
# flash kernel spends several times its matmuls' time outside them, so there attention is
# the textbook two batched matmuls around an fp32 softmax, whose (T, T) probabilities
# autograd keeps (6 bytes per score: fp32 and bf16 copies, B nh T^2 of them a layer).
# BENCHMARKS.md has the measurements; bench.py --attn=sdpa|plain overrides the choice.
def native_bf16_cpu():
    """Whether this CPU multiplies bf16 in hardware (AMX or AVX-512 BF16); elsewhere bf16 is
    emulated, and slower than fp32."""
    return any(getattr(torch.cpu, f, lambda: False)()
               for f in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"))


NATIVE_BF16 = native_bf16_cpu()
PLAIN_MAX_T = 256
ATTN = "auto"  # "auto", "sdpa" or "plain"


def plain_attention(q, k, v):
    """softmax(q k^T / sqrt(hs), causal) v for q, k, v (B, nh, T, hs): two batched matmuls."""
    T = q.size(-2)
    att = (q * q.size(-1) ** -0.5) @ k.transpose(-2, -1)  # (B, nh, T, T); q: fewer to scale
    future = torch.ones(T, T, dtype=torch.bool, device=q.device).triu_(1)  # key after query
    att = F.softmax(att.masked_fill(future, float("-inf")), dim=-1, dtype=torch.float32)
    return att.to(v.dtype) @ v  # (B, nh, T, T) @ (B, nh, T, hs) -> (B, nh, T, hs)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.n_head, self.dropout = cfg.n_head, cfg.dropout
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)  # q, k, v at once
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)  # 3 x (B, T, C)
        # (B, T, C) -> (B, nh, T, hs): each head attends over its own hs = C / nh channels
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        cpu16 = x.device.type == "cpu" and torch.is_autocast_enabled("cpu")  # bf16 or fp16
        plain = ATTN == "plain" or (ATTN == "auto" and cpu16 and NATIVE_BF16 and T <= PLAIN_MAX_T)
        if plain and not (self.training and self.dropout):  # (no dropout in this path)
            y = plain_attention(q, k, v)  # (B, nh, T, hs)
        else:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True,  # (B, nh, T, hs)
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

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        x = x + self.mlp(self.ln_2(x))
        return x


# ----------------------------------------------------------------------------------------
# GPT-2 checkpoints as Hugging Face keeps them: on the hub, or on disk as transformers'
# save_pretrained writes them (config.json beside model.safetensors and/or pytorch_model.bin,
# or shards named by an index.json). Names are ours already; Conv1D stores (in, out).
# Everything that cannot be read is a ValueError naming the path.

GPT2_NAMES = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")
CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def _read_json(path):
    """The object in a JSON file (config.json, an index.json)."""
    try:
        with open(path) as f:
            obj = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: not readable JSON ({one_line(e)})") from e
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: not a JSON object")
    return obj


def _read_tensors(path):
    """The {name: tensor} dict in one weights file: .safetensors through safetensors, any
    other through torch.load with weights_only (a pickle cannot run code)."""
    st = path.endswith(".safetensors")
    if st and safetensors_torch is None:
        raise ValueError(f"{path}: reading .safetensors needs the safetensors package: "
                         "pip install safetensors")
    try:
        sd = (safetensors_torch.load_file(path) if st
              else torch.load(path, map_location="cpu", weights_only=True))
    except Exception as e:  # a missing, truncated or foreign file: any error its reader raises
        raise ValueError(f"{path}: not a readable weights file ({one_line(e)})") from e
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"{path}: not a state dict of tensors")
    return sd


def _weight_files(d):
    """The weight files of a save_pretrained directory: one file, or the shards its
    index.json names. model.safetensors first, as transformers does, when it can be read."""
    names = ("model.safetensors", "pytorch_model.bin")
    if safetensors_torch is None:
        names = names[::-1]  # a .bin beside it serves; a lone .safetensors asks for the package
    for name in names:
        if os.path.isfile(os.path.join(d, name)):
            return [os.path.join(d, name)]
        index = os.path.join(d, name + ".index.json")
        if os.path.isfile(index):
            shards = _read_json(index).get("weight_map", {}).values()
            return [os.path.join(d, s) for s in sorted(set(shards))]
    raise ValueError(f"{d}: no model.safetensors or pytorch_model.bin in this directory")


def _fetch_gpt2(name):
    """Download an OpenAI GPT-2's config.json and weights into huggingface_hub's cache;
    the directory they are in."""
    weights = "model.safetensors" if safetensors_torch is not None else "pytorch_model.bin"
    repo = f"openai-community/{name}"
    try:
        from huggingface_hub import hf_hub_download  # `datasets` brings it
        hf_hub_download(repo, "config.json")
        return os.path.dirname(hf_hub_download(repo, weights))
    except Exception as e:  # no package, no network, no such file: the user's fix is the same
        raise ValueError(f"{name}: could not download it from the Hugging Face hub "
                         f"({type(e).__name__}); download config.json and {weights} from "
                         f"https://huggingface.co/{repo} into a directory and pass its path") from e


def _read_gpt2(name_or_path):
    """(config.json's dict or None, state dict without the `transformer.` prefix) of a GPT-2
    named or kept at name_or_path."""
    path = name_or_path
    if not os.path.exists(path):
        if name_or_path not in GPT2_NAMES:
            raise ValueError(f"{path}: no such file or directory, and not one of "
                             f"{', '.join(GPT2_NAMES)}")
        path = _fetch_gpt2(name_or_path)
    files = _weight_files(path) if os.path.isdir(path) else [path]
    config = os.path.join(os.path.dirname(files[0]), "config.json")
    hf = _read_json(config) if os.path.isfile(config) else None
    sd = {}
    for f in files:
        sd.update(_read_tensors(f))
    return hf, {k.removeprefix("transformer."): v for k, v in sd.items()}  # as GPT2Model names them


def _gpt2_shape(hf, sd, where):
    """(n_layer, n_head, n_embd, n_positions, n_vocab) from config.json's dict hf, or, with
    none, from the tensors' shapes and GPT-2's rule of 64 channels a head."""
    if hf is not None:
        kind = hf.get("model_type", "gpt2"), hf.get("activation_function", "gelu_new")
        if kind[0] != "gpt2" or kind[1] not in ("gelu_new", "gelu_pytorch_tanh"):  # one tanh GELU
            raise ValueError(f"{where}: config.json describes a {kind[0]} with {kind[1]}: no GPT-2")
        keys = ("n_layer", "n_head", "n_embd", "n_positions", "vocab_size")
        try:
            return tuple(int(hf[k]) for k in keys)
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{where}: config.json lacks a GPT-2 size ({one_line(e)})") from e
    if "wte.weight" not in sd or "wpe.weight" not in sd:
        raise ValueError(f"{where}: no wte.weight and wpe.weight: not a GPT-2 state dict")
    n_vocab, n_embd = sd["wte.weight"].shape
    if n_embd % 64:
        raise ValueError(f"{where}: no config.json beside it to give n_head, and {n_embd} "
                         "channels are not GPT-2's 64 a head")
    n_layer = len({k.split(".")[1] for k in sd if k.startswith("h.")})  # h.0. ... h.{L-1}.
    return n_layer, n_embd // 64, n_embd, sd["wpe.weight"].size(0), n_vocab


# ----------------------------------------------------------------------------------------


class GPT(nn.Module):
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

    def hidden(self, idx):
        """The last hidden states (B, T, C), after ln_f: what the output layer reads."""
        B, T = idx.shape
        if T > self.cfg.block_size:
            raise ValueError(f"sequence of length {T} exceeds block_size {self.cfg.block_size}")
        pos = torch.arange(T, device=idx.device)  # (T,)
        x = self.drop(self.wte(idx) + self.wpe(pos))  # (B, T, C) + (T, C) -> (B, T, C)
        for block in self.h:
            x = block(x)
        return self.ln_f(x)  # (B, T, C)

    def forward(self, idx, need=None):
        """Logits over the n_vocab real ids: (B, T, n_vocab) at every position, or with a
        bool mask `need` (B, T) only at the N positions it marks, (N, n_vocab)."""
        x = self.hidden(idx)  # (B, T, C)
        if need is not None:
            x = x[need]  # (N, C)
        return F.linear(x, self.lm_head.weight[:self.n_vocab])  # (..., n_vocab): no padding id

    def token_logps(self, idx, need, targets, chunk=1024):
        """log P(target) (N,), fp32 or wider, at the N positions the bool mask `need` (B, T) marks,
        for targets (N,): the same numbers as log_softmax(forward(idx, need)) picked at the
        targets, without the (N, n_vocab) logits (see TokenLogProbs)."""
        x = self.hidden(idx)[need]  # (N, C)
        return TokenLogProbs.apply(x, self.lm_head.weight, targets, chunk, self.n_vocab)

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
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, eot=None, generator=None):
        """Sample continuations of idx (B, T), from the last position's logits only. A row
        that has sampled the end-of-text token eot keeps emitting it; sampling stops as soon
        as every row has."""
        w = self.lm_head.weight[:self.n_vocab]  # padding ids are never sampled
        done = torch.zeros(idx.size(0), dtype=torch.bool, device=idx.device)
        for _ in range(max_new_tokens):
            x = self.hidden(idx[:, -self.cfg.block_size:])[:, -1]  # (B, C)
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
        # bit, which moves fp32 results after hundreds of steps; so fp32 training on the CPU
        # keeps the for-each version, whose numbers are the reference ones. CUDA, and bf16
        # or fp16 training (the training dtype, `dtype`) anywhere, fuse.
        fused = device_type == "cuda" or dtype != "float32"
        fused = fused and "fused" in inspect.signature(torch.optim.AdamW).parameters
        return torch.optim.AdamW(groups, lr=lr, betas=betas, **({"fused": True} if fused else {}))

    @torch.no_grad()
    def load_gpt2_state_dict(self, sd):
        """Copy a GPT-2 state dict (Hugging Face names less the `transformer.` prefix, as
        _read_gpt2 gives them; Conv1D weights stored (in, out)) into this model, checking
        that every tensor is used and every shape fits; ValueError names the first that does
        not."""
        sd = {k: v for k, v in sd.items()
              if not k.endswith((".attn.bias", ".attn.masked_bias"))}  # the causal mask buffers
        head = sd.pop("lm_head.weight", None)
        if head is not None and not torch.equal(head, sd.get("wte.weight", head)):
            raise ValueError("lm_head.weight differs from wte.weight, and this GPT ties them")
        own = self.state_dict()  # views of the parameters: copying into them loads the model
        for k, v in sd.items():
            if k not in own:
                raise ValueError(f"GPT-2 tensor {k!r} has no place in this model")
            dst = own[k]
            if k.endswith(CONV1D):
                v = v.t()  # Conv1D (in, out) -> Linear (out, in)
            elif k == "wte.weight":  # the real ids' rows; the padding rows are zeroed
                dst = own[k][:self.n_vocab]
                own[k][self.n_vocab:] = 0
            elif k == "wpe.weight":  # a shorter block keeps the first positions
                v = v[:self.cfg.block_size]
            if dst.shape != v.shape:
                raise ValueError(f"{k}: shape {tuple(v.shape)} does not fit {tuple(dst.shape)}")
            dst.copy_(v)
        missing = set(own) - set(sd) - {"lm_head.weight"}  # lm_head is wte
        if missing:
            raise ValueError(f"GPT-2 state dict lacks {sorted(missing)}")

    @classmethod
    def from_pretrained(cls, name_or_path, block_size=1024, dropout=0.0):
        """A GPT-2 from wherever it is kept: gpt2, gpt2-medium, gpt2-large or gpt2-xl from
        the Hugging Face hub; a directory as transformers' save_pretrained writes it; or one
        pytorch_model.bin or model.safetensors file. The shape comes from config.json, or
        from the tensors where there is none. Anything that cannot be read, or does not fit,
        is a ValueError naming the path."""
        hf, sd = _read_gpt2(name_or_path)
        n_layer, n_head, n_embd, n_positions, n_vocab = _gpt2_shape(hf, sd, name_or_path)
        if n_embd % n_head or n_layer < 1:
            raise ValueError(f"{name_or_path}: {n_layer} layers of {n_embd} channels in "
                             f"{n_head} heads is no GPT-2")
        if block_size > n_positions:
            raise ValueError(f"{name_or_path}: block_size {block_size} exceeds the "
                             f"checkpoint's {n_positions} positions")
        model = cls(GPTConfig(block_size=block_size, vocab_size=padded_vocab(n_vocab),
                              n_vocab=n_vocab, n_layer=n_layer, n_head=n_head, n_embd=n_embd,
                              dropout=dropout, bias=True))
        try:
            model.load_gpt2_state_dict(sd)
        except ValueError as e:
            raise ValueError(f"{name_or_path}: {e}") from e
        return model

    @torch.no_grad()
    def export_hf(self, out_dir, eot=None):
        """Write this model as a Hugging Face GPT-2 directory that GPT2LMHeadModel.
        from_pretrained(out_dir) loads: config.json, pytorch_model.bin, and model.safetensors
        too when safetensors is installed. The vocabulary is cut back to n_vocab; eot, when
        given, is written as the bos and eos id (GPT-2's convention: its last id)."""
        c = self.cfg
        if not c.bias:
            raise ValueError("export_hf needs bias=True: GPT-2 has a bias in every Linear and LayerNorm")
        sd = {}
        for k, v in self.state_dict().items():
            if k == "lm_head.weight":
                continue  # tied: written below as wte's copy
            if k.endswith(CONV1D):
                v = v.t()  # Linear (out, in) -> Conv1D (in, out)
            elif k == "wte.weight":
                v = v[:self.n_vocab]
            # a fresh contiguous CPU copy: no file then holds a whole storage for a slice
            sd["transformer." + k] = v.to("cpu").clone(memory_format=torch.contiguous_format)
        sd["lm_head.weight"] = sd["transformer.wte.weight"].clone()  # safetensors refuses shared memory
        config = {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"],
                  "n_layer": c.n_layer, "n_head": c.n_head, "n_embd": c.n_embd,
                  "n_positions": c.block_size, "n_ctx": c.block_size, "vocab_size": self.n_vocab,
                  "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5,
                  "resid_pdrop": c.dropout, "embd_pdrop": c.dropout, "attn_pdrop": c.dropout,
                  "tie_word_embeddings": True}
        if eot is not None:
            config["bos_token_id"] = config["eos_token_id"] = eot
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "config.json"), "w") as f:
            json.dump(config, f, indent=2)
        torch.save(sd, os.path.join(out_dir, "pytorch_model.bin"))
        st = os.path.join(out_dir, "model.safetensors")
        if safetensors_torch is not None:  # transformers' "format" check wants "pt"
            safetensors_torch.save_file(sd, st, metadata={"format": "pt"})
        elif os.path.exists(st):
            os.remove(st)  # an older export's: transformers would read it before the .bin


class Scorer(nn.Module):
    """The GPT as the loss reads it: forward(idx, need, targets) gives the fused token log-probs
    (or, without targets, the logits). DDP's gradient hooks and torch.compile wrap forward
    alone, so the whole computation has to go through it."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, idx, need, targets=None):
        return self.model(idx, need) if targets is None else self.model.token_logps(idx, need, targets)
