"""A GPT in the nanoGPT manner: pre-LayerNorm blocks, causal self-attention through
F.scaled_dot_product_attention, a GELU MLP, tied input and output embeddings, GPT-2 init.

ORPO needs the logits at every position (it scores whole responses), so forward(idx)
returns them all; orpo.py turns them into log-probs.
"""
import inspect
import math
import os
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class GPTConfig:
    block_size: int = 1024
    vocab_size: int = 50304  # GPT-2's 50257 rounded up to a multiple of 64, for speed
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True  # GPT-2 has biases in its Linears and LayerNorms


class TokenLogProbs(torch.autograd.Function):
    """log softmax(h W^T)[y] at N positions: the fused cross-entropy that ORPO's log-probs
    come from. log p(y) = z_y - logsumexp_v z_v with z = h W^T: z_y is one dot product per
    position, and the logsumexp is taken a slice of `chunk` vocabulary columns at a time, so
    the (N, vocab) logits never exist and each (N, chunk) slice is still in cache for its
    softmax. The backward recomputes each slice's logits (one more matmul) rather than
    keeping them: with a 50k vocabulary that saves gigabytes, and the time to allocate them."""

    @staticmethod
    def forward(ctx, h, w, y, chunk):
        auto = torch.is_autocast_enabled(h.device.type)
        dt = torch.get_autocast_dtype(h.device.type) if auto else h.dtype  # matmuls follow autocast
        f = torch.promote_types(h.dtype, torch.float32)  # the softmax is always fp32 or wider
        hd, wd = h.to(dt), w.to(dt)
        lse = torch.stack([torch.logsumexp((hd @ wd[j:j + chunk].t()).to(f), 1)
                           for j in range(0, w.size(0), chunk)], 1).logsumexp(1)
        ctx.save_for_backward(h, w, y, lse)
        ctx.chunk, ctx.dt = chunk, dt
        return (hd.to(f) * wd[y].to(f)).sum(1) - lse

    @staticmethod
    def backward(ctx, g):
        h, w, y, lse = ctx.saved_tensors
        hd, wd = h.to(ctx.dt), w.to(ctx.dt)
        # d log p(y) / dz = onehot(y) - softmax(z), times the incoming gradient g: the
        # softmax part a slice at a time, the one-hot part once at the end
        dh, dw = torch.zeros_like(h), torch.empty_like(w)
        for j in range(0, w.size(0), ctx.chunk):
            s = slice(j, j + ctx.chunk)
            p = (hd @ wd[s].t()).to(lse.dtype).sub_(lse[:, None]).exp_().mul_(-g[:, None]).to(ctx.dt)
            dh += p @ wd[s]
            dw[s] = p.t() @ hd
        dh += g[:, None] * w[y]
        dw.index_add_(0, y, (g[:, None] * h).to(dw.dtype))
        return dh, dw, None, None


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.n_head, self.dropout = cfg.n_head, cfg.dropout
        self.ln_1 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)  # q, k, v at once
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias)
        self.mlp_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                           dropout_p=self.dropout if self.training else 0.0)
        x = x + self.drop(self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C)))
        x = x + self.drop(self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh")))
        return x


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        assert cfg.n_embd % cfg.n_head == 0, "n_embd must be divisible by n_head"
        self.cfg = cfg
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
            if name.endswith("proj.weight"):
                nn.init.normal_(p, 0.0, 0.02 / math.sqrt(2 * cfg.n_layer))
            elif p.dim() >= 2:
                nn.init.normal_(p, 0.0, 0.02)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def num_params(self, non_embedding=True):
        n = sum(p.numel() for p in self.parameters())
        return n - self.wpe.weight.numel() if non_embedding else n

    def forward(self, idx, need=None, targets=None, chunk=1024):
        """Logits (B, T, vocab) at every position; with a bool mask `need` (B, T), only at
        the positions it marks, as (N, vocab): ORPO scores responses, and the vocab
        projection of prompt and padding positions is work it never uses. With `targets`
        (N,) too, the log-probs of those targets (N,) instead, through TokenLogProbs."""
        T = idx.size(1)
        if T > self.cfg.block_size:
            raise ValueError(f"sequence of length {T} exceeds block_size {self.cfg.block_size}")
        pos = torch.arange(T, device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(pos))
        for block in self.h:
            x = block(x)
        x = self.ln_f(x)
        x = x if need is None else x[need]
        if targets is not None:
            return TokenLogProbs.apply(x, self.lm_head.weight, targets, chunk)
        return self.lm_head(x)

    def configure_optimizer(self, weight_decay, lr, betas, device_type):
        # Decay the matrices (Linear weights, embeddings); never biases or LayerNorm gains.
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
        fused = device_type == "cuda" and "fused" in inspect.signature(torch.optim.AdamW).parameters
        return torch.optim.AdamW(groups, lr=lr, betas=betas, **({"fused": True} if fused else {}))

    @classmethod
    def from_pretrained(cls, name_or_path="gpt2", block_size=1024, dropout=0.0):
        """OpenAI's GPT-2 124M weights: from the Hugging Face hub through huggingface_hub
        (which `datasets` brings), or from a local pytorch_model.bin; read by torch alone."""
        path = name_or_path
        if not os.path.exists(path):
            if name_or_path != "gpt2":
                raise ValueError(f"no file at {name_or_path!r}; give 'gpt2' or a local path")
            try:
                from huggingface_hub import hf_hub_download
                path = hf_hub_download("openai-community/gpt2", "pytorch_model.bin")
            except Exception as e:
                raise RuntimeError(
                    f"could not download GPT-2 from the Hugging Face hub ({type(e).__name__}). "
                    "Download https://huggingface.co/openai-community/gpt2/resolve/main/"
                    "pytorch_model.bin and pass its path instead: --init_from=/path/to/"
                    "pytorch_model.bin") from e
        sd = torch.load(path, map_location="cpu", weights_only=True)
        model = cls(GPTConfig(block_size=block_size, dropout=dropout))  # GPT-2 small's shape
        model.load_gpt2_state_dict(sd)
        return model

    @torch.no_grad()
    def load_gpt2_state_dict(self, sd):
        """Copy a GPT-2 state dict (Hugging Face names, Conv1D weights stored (in, out)) into
        this model, checking that every tensor is used and every shape fits."""
        sd = {k.removeprefix("transformer."): v for k, v in sd.items()
              if not k.endswith((".attn.bias", ".attn.masked_bias")) and k != "lm_head.weight"}
        rename = {"attn.c_attn": "c_attn", "attn.c_proj": "c_proj", "mlp.c_fc": "c_fc",
                  "mlp.c_proj": "mlp_proj"}
        own = self.state_dict()
        done = set()
        for k, v in sd.items():
            name = k
            for a, b in rename.items():
                name = name.replace(f".{a}.", f".{b}.")
            if name not in own:
                raise KeyError(f"GPT-2 tensor {k!r} has no place in this model")
            if name.endswith(".weight") and any(f".{b}." in name for b in rename.values()):
                v = v.t()  # Conv1D (in, out) -> Linear (out, in)
            if name == "wte.weight":  # 50257 rows into the padded 50304
                own[name][:v.size(0)] = v
                own[name][v.size(0):] = 0  # padding rows: never a target, never sampled
            elif name == "wpe.weight":  # a shorter block keeps the first positions
                own[name].copy_(v[:own[name].size(0)])
            else:
                if own[name].shape != v.shape:
                    raise ValueError(f"{k}: shape {tuple(v.shape)} does not fit {tuple(own[name].shape)}")
                own[name].copy_(v)
            done.add(name)
        missing = set(own) - done - {"lm_head.weight"}  # lm_head is tied to wte
        if missing:
            raise KeyError(f"GPT-2 state dict lacks {sorted(missing)}")

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, eot=None, generator=None,
                 n_vocab=None):
        """Sample continuations of idx (B, T). A row that has sampled the end-of-text token
        keeps emitting it; sampling stops when every row has. n_vocab: the tokenizer's size,
        so that the padding rows of the embedding are never sampled."""
        done = torch.zeros(idx.size(0), dtype=torch.bool, device=idx.device)
        for _ in range(max_new_tokens):
            logits = self(idx[:, -self.cfg.block_size:])[:, -1, :n_vocab].float()
            if temperature == 0:
                nxt = logits.argmax(-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k is not None:
                    kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                nxt = torch.multinomial(F.softmax(logits, dim=-1), 1, generator=generator)
            if eot is not None:
                nxt = nxt.masked_fill(done[:, None], eot)
                done |= nxt[:, 0] == eot
            idx = torch.cat((idx, nxt), dim=1)
            if done.all():
                break
        return idx
