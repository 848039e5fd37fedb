import contextlib
import math
from decimal import Decimal, localcontext

import numpy as np
import torch

import orpo
from model import GPT, GPTConfig


def toy_split(rows):
    """rows of (prompt, chosen, rejected) token lists -> a (tokens, index) split."""
    tokens, index = [], []
    for p, c, r in rows:
        index.append((len(tokens), len(p), len(c), len(r)))
        tokens += p + c + r
    return np.array(tokens, np.uint16), np.array(index, np.int64)


ROWS = [([1, 2, 3], [4, 5, 0], [6, 0]),
        ([7], [8, 9, 10, 11, 0], [12, 13, 0]),
        ([2, 2, 2, 2, 2], [3, 0], [5, 5, 5, 0])]


def test_masks_cover_exactly_the_response_tokens():
    split = toy_split(ROWS)
    x, y, resp, seq = orpo.make_batch(split, [0, 1, 2], "cpu")
    B = len(ROWS)
    assert x.shape == y.shape == (2 * B, 8)  # the longest: 5 + 4 tokens, minus one
    for i, (p, c, r) in enumerate(ROWS):
        for row, response in ((i, c), (B + i, r)):
            marked = y[row][resp[row].bool()].tolist()
            assert marked == response, (  # end-of-text (0) included
                f"row {row}: resp_mask marks the targets {marked}, the response is {response}")
            assert x[row, :len(p)].tolist() == p  # every row starts with the prompt
            n = len(p) + len(response) - 1  # the targets: every token after the first
            assert seq[row].tolist() == [1.0] * n + [0.0] * (8 - n), (
                f"row {row}: seq_mask is {seq[row].tolist()}, for {n} targets then padding")
    assert ((resp == 1) <= (seq == 1)).all(), "resp_mask marks a target that seq_mask does not"


def test_logps_same_alone_and_padded_in_a_batch():
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, vocab_size=16, n_layer=2, n_head=2, n_embd=16)).eval()
    split = toy_split(ROWS)
    x, y, resp, _ = orpo.make_batch(split, [0, 1, 2], "cpu")
    need = resp.bool()
    _, ell = orpo.response_logps(model(x, need, y[need]), resp, need)
    every = torch.ones_like(need)
    _, dense = orpo.response_logps(orpo.logps_from_logits(model(x).flatten(0, 1), y.flatten()), resp, every)
    torch.testing.assert_close(dense, ell, rtol=0, atol=1e-5, msg=lambda m: (  # logits everywhere agree
        f"response_logps: ell from the scored positions and from every position differ: {m}"))
    for i in range(3):
        x, y, resp, _ = orpo.make_batch(split, [i], "cpu")  # no padding at all
        _, alone = orpo.response_logps(model(x, resp.bool(), y[resp.bool()]), resp, resp.bool())
        torch.testing.assert_close(alone, ell[[i, 3 + i]], rtol=0, atol=1e-6, msg=lambda m: (
            f"response_logps: ell of pair {i} alone differs from ell padded in a batch: {m}"))



def test_response_logps_place_the_tokens_and_average_over_the_response():
    """One pair by hand: the scored positions are prompt and response (as under
    sft_on_prompt), the response is 3 tokens of each row, the chosen row ends in padding."""
    scored = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]).bool()
    resp = torch.tensor([[0, 1, 1, 1, 0], [0, 0, 1, 1, 1]], dtype=torch.float64)
    tok = torch.tensor([-5.0, -1.0, -2.0, -3.0, -4.0, -6.0, -0.5, -0.5, -2.0], dtype=torch.float64)
    logp, ell = orpo.response_logps(tok, resp, scored)
    want = [[-5.0, -1.0, -2.0, -3.0, 0.0], [-4.0, -6.0, -0.5, -0.5, -2.0]]
    assert logp.tolist() == want, f"response_logps: logp is {logp.tolist()}, want tok placed: {want}"
    assert ell.tolist() == [-2.0, -1.0], (  # (-1 - 2 - 3)/3 and (-0.5 - 0.5 - 2)/3
        f"response_logps: ell is {ell.tolist()}, want Eq. 3's mean over the response [-2.0, -1.0]")
    _, total = orpo.response_logps(tok, resp, scored, mean=False)
    assert total.tolist() == [-6.0, -3.0], (
        f"response_logps(mean=False): ell is {total.tolist()}, want the sum over the response [-6.0, -3.0]")

def test_log1mexp_is_stable_and_exact():
    x = torch.tensor([-1e-12, -1e-6, -0.1, -math.log(2), -1.0, -20.0, -200.0, -1e4], dtype=torch.float64)
    with localcontext() as ctx:  # the reference, in 60-digit decimal arithmetic
        ctx.prec = 60
        want = [float((1 - Decimal(v).exp()).ln()) for v in x.tolist()]
    want = torch.tensor(want, dtype=torch.float64)
    torch.testing.assert_close(orpo.log1mexp(x), want, rtol=1e-12, atol=1e-30, msg=lambda m: (
        f"log1mexp in float64 against 60-digit arithmetic at x = {x.tolist()}: {m}"))
    x32 = x.float().requires_grad_()
    y = orpo.log1mexp(x32)
    y.sum().backward()
    assert torch.isfinite(y).all() and torch.isfinite(x32.grad).all(), (
        f"log1mexp in float32 at x = {x.tolist()}: {y.tolist()}, its gradient {x32.grad.tolist()}")
    naive = torch.log1p(-torch.exp(torch.tensor(-1e-12)))
    assert not torch.isfinite(naive)  # what the stable form is for


def test_loss_float32_finite_where_the_naive_form_fails():
    """The loss and its autograd gradient in float32, at every pairing of l from -1e-12
    (P = 1 to float32's precision) to -1e4: exercises 1 and 2 alone."""
    ells = -torch.logspace(-12, 4, 200)
    w, l = torch.meshgrid(ells, ells, indexing="ij")
    w, l = w.flatten().float().requires_grad_(), l.flatten().float().requires_grad_()
    loss, _ = orpo.orpo_loss(torch.cat([w, l]), -w, lam=1.0)
    loss.backward()
    for what, t in (("the loss", loss), ("dL/dl_w", w.grad), ("dL/dl_l", l.grad)):
        bad = (~torch.isfinite(t)).nonzero().flatten()[:1].tolist()
        assert not bad, f"{what} is not finite in float32" + (
            f", at l_w={w[bad[0]].item():.3g}, l_l={l[bad[0]].item():.3g}" if t.dim() else "")
    naive = lambda x: x - torch.log1p(-torch.exp(x))  # log odds, naively
    bad = -torch.nn.functional.logsigmoid(naive(w.detach()) - naive(l.detach()))
    assert not torch.isfinite(bad).all()


def test_loss_matches_the_paper_by_hand():
    ell = torch.tensor([-0.5, -2.0, -1.5, -0.3], dtype=torch.float64)  # chosen 2, rejected 2
    logp = torch.zeros(4, 3, dtype=torch.float64)
    seq = torch.ones(4, 3, dtype=torch.float64)
    lam = 0.7
    loss, parts = orpo.orpo_loss(ell, orpo.sft_loss(logp, ell, seq), lam=lam)
    want = 0.0
    for w, l in ((-0.5, -1.5), (-2.0, -0.3)):
        odds = lambda v: math.exp(v) / (1 - math.exp(v))
        want += -w + lam * -math.log(1 / (1 + math.exp(-math.log(odds(w) / odds(l)))))
    assert abs(loss.item() - want / 2) < 1e-12
    assert parts["acc"].item() == 0.5



def close(got, want, what, rtol=1e-10):
    """got (a tensor) against want (frozen floats), with a message that names the quantity."""
    want = torch.tensor(want, dtype=torch.float64)
    rtol = max(rtol, 1e-7) if got.dtype == torch.float32 else rtol  # acc: a float32 share
    ok = got.shape == want.shape and torch.allclose(got.detach().double(), want, rtol=rtol, atol=0)
    assert ok, f"{what}: expected {want.tolist()}, got {got.tolist()}"


# Three pairs (chosen l_w, rejected l_l, and an L_SFT given), lam = 0.3: the values below are
# frozen from 60-digit decimal arithmetic
ELL_W, ELL_L, L_SFT = [-0.2, -2.5, -1e-3], [-1.1, -0.4, -7.0], [0.9, 2.1, 0.05]


def test_odds_ratio_loss_and_eq6_at_frozen_values(monkeypatch):
    """odds_ratio_loss, orpo_loss and prob_ratio_loss alone, with a log1mexp of the test's own
    (the naive form, exact enough at these l), so that exercise 1 checks out before exercise 2."""
    monkeypatch.setattr(orpo, "log1mexp", lambda x: torch.log1p(-torch.exp(x)))
    w, l, l_sft = (torch.tensor(v, dtype=torch.float64) for v in (ELL_W, ELL_L, L_SFT))
    l_or, log_or = orpo.odds_ratio_loss(w, l)
    close(log_or, [2.20299982704223, -3.12398244784689, 13.9063429393326], "odds_ratio_loss: log OR")
    close(l_or, [0.104784489285559, 3.16702437441265, 9.13170345565257e-07], "odds_ratio_loss: L_OR")
    means = dict(l_sft=1.01666666666667, ell_w=-0.900333333333333, ell_l=-2.83333333333333, acc=2 / 3)
    for fn, loss, l_or, log_or in ((orpo.orpo_loss, 1.34384764435352, 1.09060325895618, 4.32845343950932),
                                   (orpo.prob_ratio_loss, 1.27242524425387, 0.852528591957358, 1.933)):
        got, parts = fn(torch.cat([w, l]), l_sft, lam=0.3)
        close(got, loss, f"{fn.__name__}: the loss L (Eq. 6, lam = 0.3, the mean over 3 pairs)")
        for k, v in dict(means, l_or=l_or, log_or=log_or).items():
            close(parts[k], v, f"{fn.__name__}: parts[{k!r}], the mean over the pairs")

def test_sft_on_prompt_uses_the_whole_sequence():
    logp = torch.tensor([[-1.0, -2.0, -3.0], [-1.0, -1.0, -1.0]], dtype=torch.float64)
    seq = torch.tensor([[0.0, 1.0, 1.0], [1.0, 1.0, 1.0]], dtype=torch.float64)
    ell = torch.tensor([-3.0, -1.0], dtype=torch.float64)
    got = orpo.sft_loss(logp, ell, seq, on_prompt=True).tolist()  # the chosen row's seq_mask: -2, -3
    assert got == [2.5], f"sft_loss(on_prompt=True): L_SFT per pair is {got}, want their mean, [2.5]"
    _, parts = orpo.orpo_loss(ell, orpo.sft_loss(logp, ell, seq), lam=0.0)
    assert parts["l_sft"].item() == 3.0


def test_overfits_one_batch():
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, vocab_size=16, n_layer=2, n_head=2, n_embd=32))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    batch = orpo.make_batch(toy_split(ROWS), [0, 1, 2], "cpu")
    for _ in range(300):
        need = batch[2].bool()
        logp, ell = orpo.response_logps(model(batch[0], need, batch[1][need]), batch[2], need)
        loss, parts = orpo.orpo_loss(ell, orpo.sft_loss(logp, ell, batch[3]), lam=1.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert parts["l_sft"].item() < 0.01, parts  # chosen memorised
    assert parts["ell_l"].item() < -5, parts  # rejected pushed far down
    assert parts["acc"].item() == 1.0


def test_probability_ratio_and_summed_logp():
    """--loss=prob contrasts log P_w - log P_l (Sec. 7.1); --loss=sum drops Eq. 3's 1/m."""
    tok = torch.log(torch.tensor([0.5, 0.5, 0.2, 0.1, 0.1, 0.9], dtype=torch.float64))
    resp = torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.float64)  # B=1: chosen, rejected
    need = torch.tensor([[1, 1, 0], [1, 1, 1]]).bool()
    tok = tok[:5]
    _, mean = orpo.response_logps(tok, resp, need)
    _, total = orpo.response_logps(tok, resp, need, mean=False)
    torch.testing.assert_close(total, mean * resp.sum(1))
    torch.testing.assert_close(total, torch.log(torch.tensor([0.25, 0.2 * 0.1 * 0.1], dtype=torch.float64)))
    _, odds = orpo.orpo_loss(mean, -mean[:1], lam=1.0)
    _, prob = orpo.prob_ratio_loss(mean, -mean[:1], lam=1.0)
    torch.testing.assert_close(prob["log_or"], mean[0] - mean[1])
    P = mean.exp()
    torch.testing.assert_close(odds["log_or"], torch.log(P[0] / (1 - P[0]) / (P[1] / (1 - P[1]))))


def test_dpo_loss_by_hand():
    """Two pairs, summed log-probs. Pair 1: z = 0.5 * ((-3 + 4) - (-5 + 4)) = 1; pair 2:
    z = 0.5 * ((-2 + 1) - (-1 + 2)) = -1. L = mean(log(1 + e^-z))."""
    pi = torch.tensor([-3.0, -2.0, -5.0, -1.0], dtype=torch.float64)   # chosen 1, 2; rejected 1, 2
    ref = torch.tensor([-4.0, -1.0, -4.0, -2.0], dtype=torch.float64)
    loss = orpo.dpo_loss(pi, ref, beta=0.5)
    want = (math.log(1 + math.exp(-1)) + math.log(1 + math.exp(1))) / 2
    assert abs(loss.item() - want) < 1e-15, f"dpo_loss is {loss.item()}, want {want}"
    same = orpo.dpo_loss(pi, pi, beta=0.5).item()
    assert abs(same - math.log(2)) < 1e-15, f"dpo_loss with the policy as the reference is {same}"


def test_dpo_gradient_agrees_with_finite_differences():
    g = torch.Generator().manual_seed(0)
    pi = (-20 * torch.rand(6, generator=g, dtype=torch.float64)).requires_grad_()
    ref = -20 * torch.rand(6, generator=g, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda p: orpo.dpo_loss(p, ref, beta=0.3), (pi,))
    orpo.dpo_loss(pi, ref, beta=0.3).backward()
    z = 0.3 * ((pi[:3] - ref[:3]) - (pi[3:] - ref[3:]))
    want_w = -0.3 * torch.sigmoid(-z) / 3  # dL/dpi_w = -beta sigma(-z) / B; the rejected: +
    torch.testing.assert_close(pi.grad, torch.cat([want_w, -want_w]).detach(),
                               msg=lambda m: f"dpo_loss: its gradient with respect to pi: {m}")


def test_simpo_loss_and_objective_at_frozen_values():
    """simpo_loss per pair (beta = 2, gamma = 1 by default, and given), and simpo_objective:
    the mean over the pairs, lam unused; its parts: the margin l_w - l_l as log_or."""
    w, l, l_sft = (torch.tensor(v, dtype=torch.float64) for v in (ELL_W, ELL_L, L_SFT))
    close(orpo.simpo_loss(w, l), [0.371100665947778, 5.20550140390966, 2.26485202468983e-06],
          "simpo_loss with its defaults beta = 2, gamma = 1")
    close(orpo.simpo_loss(w, l, beta=1.5, gamma=0.3),
          [0.300058479617643, 3.48125216030124, 3.72254231250166e-05], "simpo_loss(beta=1.5, gamma=0.3)")
    for lam in (0.0, 5.0):
        loss, parts = orpo.simpo_objective(torch.cat([w, l]), l_sft, lam=lam)
        close(loss, 1.85886811156982, f"simpo_objective: the loss at lam={lam} (no L_SFT, no lam)")
        want = dict(l_sft=1.01666666666667, l_or=1.85886811156982, ell_w=-0.900333333333333,
                    ell_l=-2.83333333333333, log_or=1.933, acc=2 / 3)
        for k, v in want.items():
            close(parts[k], v, f"simpo_objective: parts[{k!r}], the mean over the pairs")


def test_dpo_loss_at_frozen_values():
    """dpo_loss at three pairs of summed log-probs, two betas; the loss carries a gradient."""
    pi = torch.tensor([-3.0, -12.0, -2.0, -5.0, -9.0, -4.0], dtype=torch.float64).requires_grad_()
    ref = torch.tensor([-4.0, -10.0, -2.5, -4.0, -11.0, -3.0], dtype=torch.float64)
    for beta, want in ((0.2, 0.746157054272086), (2.0, 2.68902422862148)):
        loss = orpo.dpo_loss(pi, ref, beta=beta)
        close(loss, want, f"dpo_loss at beta={beta}, the mean over 3 pairs")
        assert loss.requires_grad, "dpo_loss: the loss has no gradient with respect to pi"


def test_dpo_forward_scores_summed_logps():
    """The step's loss under --loss=dpo, with stand-in models that return fixed token log-probs: one
    pair, a chosen response of 2 tokens and a rejected one of 3. Summed, pi = (-3, -3) and
    ref = (-3, -6), so z = 0.5 ((-3 + 3) - (-3 + 6)) = -1.5; the means would give z = -0.5."""
    resp = torch.tensor([[0, 1, 1, 0], [0, 1, 1, 1]], dtype=torch.float32)
    x = y = torch.zeros(2, 4, dtype=torch.int64)
    pi = lambda *_: torch.tensor([-1.0, -2.0, -1.0, -1.0, -1.0])
    ref = lambda *_: torch.tensor([-1.5, -1.5, -2.0, -2.0, -2.0])
    loss_fn = orpo.objective(orpo.Config(loss="dpo", beta=0.5), contextlib.nullcontext(), ref)
    loss, _ = loss_fn(pi, (x, y, resp, resp))
    close(loss, 1.70141327798275, "the loss under --loss=dpo: DPO's loss of the SUMMED log-probs "
          "(pi and ref), log(1 + e^1.5)", rtol=1e-6)
