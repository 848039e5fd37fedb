"""The assignment's frozen reference values (tests/assignment_ref.json): the inputs at the
edges that the grader checks each graded function on, and what the solution computes there,
in float64. The grader reads the file and never calls the solution; this module is the one
place that does, and test_assignment.py checks that the file still agrees with it. After a
change to orpo.py that changes an answer, rewrite the file on purpose, from the root:

    python -m tests.assignment_freeze
"""
import json
import os

import numpy as np
import torch

import orpo
import prepare_data
from course.assignment import REF, sealed
from machinery.safe import atomic_write

EXT = [-1e-12, -1e-6, -1e-3, -0.5, -3.0, -20.0, -200.0]  # l: P near 1 ... P near 0
TOY = [([1, 2, 3], [4, 5, 0], [4, 0]),  # a b c | d e <eot> | d <eot>: exercise 3's pair (3a)
       ([2, 1], [3, 5, 4, 0], [0]),
       ([7], [8, 9, 10, 11, 0], [12, 13, 0]),
       ([2, 2, 2, 2, 2], [3, 0], [5, 5, 5, 0])]
LETTERS = {0: "<eot>", 1: "a", 2: "b", 3: "c", 4: "d", 5: "e"}
LENGTHS = [(1, 6), (2, 4), (0, 3), (3, 6)]  # (prompt, prompt + response) per row, B = 2


def t(v):
    return torch.tensor(v, dtype=torch.float64)


def ell_pairs():
    """(l_w, l_l) batches: one pair, a random batch, and every pairing of the extremes."""
    g = torch.Generator().manual_seed(0)
    rand = (-3 * torch.rand(5, generator=g, dtype=torch.float64)).tolist()
    rand_l = (-3 * torch.rand(5, generator=g, dtype=torch.float64)).tolist()
    ext = [(w, l) for w in EXT for l in EXT]
    return [([-0.7], [-1.3]), (rand, rand_l), ([w for w, _ in ext], [l for _, l in ext])]


def padded(B, lengths, seed, V=7, T=6):
    """Random logits (2B, T, V), targets, and the masks of rows padded to unequal lengths."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(2 * B, T, V, generator=g, dtype=torch.float64)
    y = torch.randint(0, V, (2 * B, T), generator=g)
    resp, seq = torch.zeros(2, 2 * B, T, dtype=torch.float64)
    for i, (p, n) in enumerate(lengths):
        seq[i, :n], resp[i, p:n] = 1, 1
    return logits, y, resp, seq


def objective_case(fn, w, l, lam, on_prompt=False):
    """One call of orpo_loss, prob_ratio_loss or simpo_objective, on L_SFT as sft_loss gives
    it: Eq. 1's -l_w, or (on_prompt, two pairs) over padded rows' prompts too."""
    logp, _, _, seq = padded(2, LENGTHS, 1) if on_prompt else (None,) * 4
    if on_prompt:
        logp = torch.log_softmax(logp, -1)[..., 0] * seq
    l_sft = orpo.sft_loss(logp, t(w + l), seq, on_prompt)
    loss, parts = getattr(orpo, fn)(t(w + l), l_sft, lam=lam)
    parts = {k: v.item() for k, v in parts.items() if not (fn == "simpo_objective" and k == "l_sft")}
    return dict(fn=fn, ell=w + l, l_sft=l_sft.tolist(), lam=lam, sft_on_prompt=on_prompt,
                loss=loss.item(), parts=parts)  # simpo_objective: l_sft is logged only, not graded


def freeze_losses(batches):
    """Rows 1b, 1c, 10a, 10b: the losses at the pairs, as the solution computes them."""
    odds, loss, simpo, objective = [], [], [], []
    for w, l in batches:
        l_or, log_or = orpo.odds_ratio_loss(t(w), t(l))
        odds.append(dict(ell_w=w, ell_l=l, l_or=l_or.tolist(), log_or=log_or.tolist()))
        simpo.append(dict(ell_w=w, ell_l=l, kw={}, loss=orpo.simpo_loss(t(w), t(l)).tolist()))
        loss += [objective_case("orpo_loss", w, l, lam) for lam in (0.0, 0.1, 1.0)]
        loss.append(objective_case("prob_ratio_loss", w, l, 1.0))
        objective += [objective_case("simpo_objective", w, l, lam) for lam in (0.0, 1.0, 5.0)]
    w, l = batches[1]
    loss.append(objective_case("orpo_loss", w[:2], l[:2], 0.3, on_prompt=True))
    simpo.append(dict(ell_w=w, ell_l=l, kw=dict(beta=2.5, gamma=0.5),
                      loss=orpo.simpo_loss(t(w), t(l), beta=2.5, gamma=0.5).tolist()))
    return {"1b": odds, "1c": loss, "10a": simpo, "10b": objective}


def freeze_grads(batches):
    """Rows 4a and 4b: the hand gradient per pair, and down to the logits."""
    grads = []
    for w, l in batches + [([w], [l]) for w in EXT for l in EXT]:
        for lam in (0.0, 0.1, 1.0):
            g_w, g_l = orpo.orpo_grad(t(w), t(l), lam)
            grads.append(dict(ell_w=w, ell_l=l, lam=lam, dtype="float64", g_w=g_w.tolist(),
                              g_l=g_l.tolist()))
    w32, l32 = (torch.tensor(v, dtype=torch.float32).double() for v in batches[-1])
    g_w, g_l = orpo.orpo_grad(w32, l32, 1.0)  # float32's inputs, their gradient in float64
    grads.append(dict(ell_w=w32.tolist(), ell_l=l32.tolist(), lam=1.0, dtype="float32",
                      g_w=g_w.tolist(), g_l=g_l.tolist()))
    back = []
    for B, lengths, lam, sft, g_loss in ((1, [(1, 5), (2, 4)], 1.0, False, 1.0),
                                         (2, LENGTHS, 0.0, False, 1.0), (2, LENGTHS, 1.0, False, 0.5),
                                         (1, [(1, 5), (2, 4)], 0.5, True, 1.0), (2, LENGTHS, 0.5, True, 1.0)):
        logits, y, resp, seq = padded(B, lengths, B)
        need = (seq if sft else resp).bool()
        lg = logits[need].requires_grad_()
        _, ell = orpo.response_logps(orpo.logps_from_logits(lg.detach(), y[need]), resp, need)
        loss = orpo.HandORPO.apply(lg, y, resp, seq, need, lam, sft)[0]
        (grad,) = torch.autograd.grad(loss * g_loss, lg)
        back.append(dict(logits=lg.tolist(), y=y.tolist(), resp=resp.tolist(), seq=seq.tolist(),
                         scored=need.int().tolist(), ell=ell.tolist(), lam=lam, sft_on_prompt=sft,
                         g_loss=g_loss, grad=grad.tolist()))
        g_w, g_l = orpo.orpo_grad(ell[:B], ell[B:], lam)
        grads.append(dict(ell_w=ell[:B].tolist(), ell_l=ell[B:].tolist(), lam=lam, dtype="float64",
                          g_w=g_w.tolist(), g_l=g_l.tolist()))
    return {"4a": grads, "4b": back}


def toy_split():
    """TOY as prepare_data writes a split: the tokens, and per pair (offset, lengths)."""
    tokens, index = [], []
    for p, c, r in TOY:
        index.append((len(tokens), len(p), len(c), len(r)))
        tokens += p + c + r
    return np.array(tokens, np.uint16), np.array(index, np.int64)


def freeze_by_hand():
    """Rows 1a and 3a: answers.txt's numbers and tokens, sealed (the handout holds this file)."""
    P = t([0.6, 0.3])
    l_or, log_or = orpo.odds_ratio_loss(P[:1].log(), P[1:].log())
    odds = P / (1 - P)
    numbers = dict(odds_w=odds[0].item(), odds_l=odds[1].item(), odds_ratio=log_or.exp().item(),
                   log_or=log_or.item(), l_or=l_or.item(), delta=torch.sigmoid(-log_or).item(),
                   prob_ratio=(P[0] / P[1]).item())
    tokens, index = toy_split()
    x, y, resp, seq = (v[0].tolist() for v in orpo.make_batch((tokens, index), [0], "cpu"))
    masks = dict(x=" ".join(LETTERS[v] for v in x), y=" ".join(LETTERS[v] for v in y),
                 resp_mask=" ".join(str(int(v)) for v in resp),
                 seq_mask=" ".join(str(int(v)) for v in seq))
    return {"1a": {k: ["number", sealed(k, f"{v:.3g}")] for k, v in numbers.items()},
            "3a": {k: ["tokens", sealed(k, v)] for k, v in masks.items()}}


def freeze_rest():
    """Rows 2, 3b, 3c and 11."""
    x = [-1e-12, -1e-8, -1e-6, -1e-3, -0.1, -0.6931, -0.6932, -1.0, -5.0, -20.0, -200.0, -1e4]
    x32 = torch.tensor(x, dtype=torch.float32).double()
    log1mexp = dict(x=x, y=orpo.log1mexp(t(x)).tolist(), x32=x32.tolist(), y32=orpo.log1mexp(x32).tolist())
    split, calls = toy_split(), []
    for rows in ([1], [1, 2, 3], [3, 1]):  # not exercise 3's pair: its masks are 3a's answer
        got = orpo.make_batch(split, rows, "cpu")
        calls.append(dict(zip(("x", "y", "resp_mask", "seq_mask"), (v.tolist() for v in got)), rows=rows))
    logps = []
    for B, lengths, sft, mean in ((1, [(1, 5), (2, 4)], False, True), (2, LENGTHS, False, True),
                                  (2, LENGTHS, False, False), (2, LENGTHS, True, True)):
        logits, y, resp, seq = padded(B, lengths, 10 + B)
        need = (seq if sft else resp).bool()
        tok = orpo.logps_from_logits(logits[need], y[need])
        logp, ell = orpo.response_logps(tok, resp, need, mean=mean)
        logps.append(dict(tok=tok.tolist(), resp=resp.tolist(), scored=need.int().tolist(),
                          mean=mean, logp=logp.tolist(), ell=ell.tolist()))
    dpo, g = [], torch.Generator().manual_seed(2)
    for B in (1, 4):
        pi, ref = (-1 - 59 * torch.rand(2, 2 * B, generator=g, dtype=torch.float64))
        for beta in (0.01, 0.1, 1.0):
            p = pi.clone().requires_grad_()
            loss = orpo.dpo_loss(p, ref, beta=beta)
            loss.backward()
            dpo.append(dict(pi=pi.tolist(), ref=ref.tolist(), beta=beta, loss=loss.item(),
                            grad=p.grad.tolist()))
    return {"2": log1mexp, "3b": dict(tokens=split[0].tolist(), index=split[1].tolist(),
            rows=[[p, c, r] for p, c, r in TOY], calls=calls), "3c": logps, "11": dpo}


def freeze_standins(rows):
    """What the stand-ins answer while another function is graded: log1mexp at every l,
    odds_ratio_loss and simpo_loss at every pair of the rows that call them, and orpo_grad
    at each pair of row 4b's batches (each pair is in one batch: its value, 1/B included)."""
    prs = sorted({p for c in rows["1b"] + rows["4a"] for p in zip(c["ell_w"], c["ell_l"])})
    ells = sorted({x for p in prs for x in p})
    w, l = t([p[0] for p in prs]), t([p[1] for p in prs])
    l_or, log_or = orpo.odds_ratio_loss(w, l)
    grad = []
    for c in rows["4b"]:
        B = len(c["ell"]) // 2
        g_w, g_l = orpo.orpo_grad(t(c["ell"][:B]), t(c["ell"][B:]), c["lam"])
        grad += [list(p) for p in zip(c["ell"][:B], c["ell"][B:], [c["lam"]] * B, g_w.tolist(), g_l.tolist())]
    return dict(log1mexp=[list(p) for p in zip(ells, orpo.log1mexp(t(ells)).tolist())],
                odds_ratio_loss=[list(p) for p in zip(*(v.tolist() for v in (w, l, l_or, log_or)))],
                simpo_loss=[list(p) for p in zip(w.tolist(), l.tolist(), orpo.simpo_loss(w, l).tolist())],
                orpo_grad=grad)


def compute_refs():
    """Every reference value, from the solution in this project, in float64."""
    batches = ell_pairs()
    rows = {**freeze_losses(batches), **freeze_grads(batches), **freeze_by_hand(), **freeze_rest()}
    columns = {k: getattr(prepare_data, k) for k in ("OFF", "PROMPT", "CHOSEN", "REJECTED")}
    return dict(about="the assignment's frozen reference values, from `python -m "
                "tests.assignment_freeze` (the solution, float64); the grader reads them and "
                "nothing else", columns=columns, rows=rows, standins=freeze_standins(rows))


def main():
    refs = compute_refs()
    with atomic_write(REF) as tmp, open(tmp, "w") as f:
        json.dump(refs, f, separators=(",", ":"))
        f.write("\n")
    print(f"wrote {REF} ({os.path.getsize(REF) // 1024} KiB)")


if __name__ == "__main__":
    main()
