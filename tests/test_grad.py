"""The hand-derived ORPO gradient (orpo.orpo_grad, orpo.HandORPO) against autograd and
central finite differences, in float64; its stability in float32; and training on it."""
import json
import math
import os

import pytest
import torch

import orpo
from conftest import ROOT, losses, run

LAMS = [0.0, 0.1, 1.0]
EXTREME = [-1e-6, -1e-3, -0.5, -20.0, -200.0]  # P near 1 ... P near 0


def rel_err(a, b):
    return ((a - b).norm() / b.norm().clamp(min=1e-300)).item()


def autograd_ell_grad(ell_w, ell_l, lam):
    ell = torch.cat([ell_w, ell_l]).detach().requires_grad_()
    loss, _ = orpo.orpo_loss(ell, -ell[:ell_w.numel()], lam=lam)
    (g,) = torch.autograd.grad(loss, ell)
    B = ell_w.numel()
    return g[:B], g[B:]


def ell_cases():
    torch.manual_seed(0)
    yield torch.tensor([-0.7]), torch.tensor([-1.3])  # batch of 1
    yield -torch.rand(5) * 3, -torch.rand(5) * 3     # a batch
    for w in EXTREME:                                # every pairing of the extremes
        for l in EXTREME:
            yield torch.tensor([w]), torch.tensor([l])


@pytest.mark.parametrize("lam", LAMS)
def test_grad_wrt_mean_logps_equals_autograd(lam):
    for ell_w, ell_l in ell_cases():
        ell_w, ell_l = ell_w.double(), ell_l.double()
        hw, hl = orpo.orpo_grad(ell_w, ell_l, lam)
        aw, al = autograd_ell_grad(ell_w, ell_l, lam)
        assert rel_err(torch.cat([hw, hl]), torch.cat([aw, al])) <= 1e-10, (
            f"orpo_grad at l_w={ell_w.tolist()}, l_l={ell_l.tolist()}, lam={lam}: dL/dl_w "
            f"{hw.tolist()}, dL/dl_l {hl.tolist()}; autograd: {aw.tolist()}, {al.tolist()}")


def test_grad_matches_the_frozen_reference_values():
    """orpo_grad against values frozen from a checked solution (tests/assignment_ref.json),
    not against this copy's own orpo_loss: a loss and a gradient wrong in the same way fail
    here. Float64 at every pairing of the extremes and lam = 0, 0.1, 1; float32 to 1e-3 (or
    1e-30, below which float32 underflows)."""
    with open(os.path.join(ROOT, "tests", "assignment_ref.json")) as f:
        cases = json.load(f)["rows"]["4a"]
    for c in cases:
        dt = getattr(torch, c["dtype"])
        g_w, g_l = orpo.orpo_grad(torch.tensor(c["ell_w"], dtype=dt), torch.tensor(c["ell_l"], dtype=dt), c["lam"])
        got, want = torch.cat([g_w, g_l]).double(), torch.tensor(c["g_w"] + c["g_l"], dtype=torch.float64)
        rtol, atol = (1e-8, 1e-300) if c["dtype"] == "float64" else (1e-3, 1e-30)  # f32 underflows
        assert torch.isfinite(got).all() and ((got - want).abs() <= rtol * want.abs() + atol).all(), (
            f"orpo_grad against the frozen values: got {got.tolist()}, expected {want.tolist()} at {c}")


def logits_case(B, T, V, lengths, targets=None, seed=0):
    """Random logits (2B, T, V) and a batch whose rows are padded to unequal lengths; with
    `targets` (one mean log-prob per row), the target logits are set so that each row's
    mean log-prob is near that value."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(2 * B, T, V, generator=g, dtype=torch.float64)
    y = torch.randint(0, V, (2 * B, T), generator=g)
    resp = torch.zeros(2 * B, T, dtype=torch.float64)
    seq = torch.zeros(2 * B, T, dtype=torch.float64)
    for i, (p, n) in enumerate(lengths):
        seq[i, :n] = 1
        resp[i, p:n] = 1
    if targets is not None:
        for i, t in enumerate(targets):  # log p(y) = a - log(e^a + V - 1), others at 0
            logits[i] = 0
            a = t + math.log(V - 1) - math.log1p(-math.exp(t))
            logits[i].scatter_(-1, y[i][:, None], torch.full((T, 1), a, dtype=torch.float64))
    return logits, y, resp, seq


LENGTHS = [(1, 6), (2, 4), (0, 3), (3, 6)]  # (prompt, prompt + response) per row, B = 2


@pytest.mark.parametrize("lam", LAMS)
@pytest.mark.parametrize("sft_on_prompt", [False, True])
def test_grad_wrt_logits_equals_autograd(lam, sft_on_prompt):
    for B, lengths in ((1, [(1, 5), (2, 4)]), (2, LENGTHS)):
        logits, y, resp, seq = logits_case(B, 6, 7, lengths)
        need = (seq if sft_on_prompt else resp).bool()
        a = logits.clone().requires_grad_()  # autograd, from the logits at every position
        logp, ell = orpo.response_logps(orpo.logps_from_logits(a[need], y[need]), resp, need)
        loss, _ = orpo.orpo_loss(ell, orpo.sft_loss(logp, ell, seq, sft_on_prompt), lam=lam)
        up = torch.tensor(0.37, dtype=torch.float64)  # dJ/dloss: the backward must scale by it
        (ga,) = torch.autograd.grad(loss, a, up)
        h = logits.clone().requires_grad_()
        loss_h, _, _ = orpo.HandORPO.apply(h[need], y, resp, seq, need, lam, sft_on_prompt)
        (gh,) = torch.autograd.grad(loss_h, h, up)
        at = f"lam={lam}, sft_on_prompt={sft_on_prompt}, B={B}, dJ/dloss=0.37"
        assert loss_h.item() == loss.item()
        assert rel_err(gh, ga) <= 1e-10, f"HandORPO.backward's dJ/dlogits differs from autograd's ({at})"
        assert gh[seq == 0].abs().max() == 0, f"HandORPO.backward: padding gets a gradient ({at})"
        assert gh[resp == 0].abs().max() == 0 or sft_on_prompt, (  # nor do prompt tokens (paper)
            f"HandORPO.backward: a prompt token gets a gradient ({at})")


@pytest.mark.parametrize("lam", [0.0, 0.5])
@pytest.mark.parametrize("targets", [None, [-1e-6, -20.0], [-1e-3, -200.0], [-200.0, -1e-6]])
def test_gradcheck_hand_function(lam, targets):
    B = 1 if targets else 2
    lengths = [(1, 5), (2, 4)] if targets else LENGTHS
    logits, y, resp, seq = logits_case(B, 5, 4, lengths, targets)
    need = resp.bool()
    if targets:  # the constructed rows do hit the extremes
        _, ell = orpo.response_logps(orpo.logps_from_logits(logits[need], y[need]), resp, need)
        for e, t in zip(ell.tolist(), targets):
            assert math.isclose(e, t, rel_tol=1e-6), (e, t)
    fn = lambda lg: orpo.HandORPO.apply(lg, y, resp, seq, need, lam, False)[0]
    # gradcheck's default tolerances: central differences cannot do better near P = 1, where
    # log odds curves as 1/l^2 (the exact comparison with autograd is the test above)
    assert torch.autograd.gradcheck(fn, (logits[need].requires_grad_(),))


def test_grad_float32_finite_where_the_naive_form_fails():
    """orpo_grad's alone (the loss's own: tests/test_loss.py), where 1 - e^l rounds to 0."""
    ells = -torch.logspace(-12, 4, 200)  # -1e-12 ... -1e4
    w, l = torch.meshgrid(ells, ells, indexing="ij")
    hw, hl = orpo.orpo_grad(w.flatten().float(), l.flatten().float(), 1.0)
    bad = ~(torch.isfinite(hw) & torch.isfinite(hl))
    assert not bad.any(), (f"orpo_grad is not finite in float32 at l_w={w.flatten()[bad][0].item():.3g}, "
                           f"l_l={l.flatten()[bad][0].item():.3g}")
    assert not torch.isfinite(1 / (1 - torch.exp(w.float()))).all()  # what it is for


def test_grad_training_on_hand_backward_matches_autograd(tmp_path, data_dir):
    auto = losses(run(tmp_path / "auto", data_dir, max_iters=20))
    hand = losses(run(tmp_path / "hand", data_dir, max_iters=20, hand_grad=True))
    assert len(auto) == len(hand) == 20
    for a, h in zip(auto, hand):
        for x, y in zip(a[1:], h[1:]):
            assert abs(x - y) <= 1e-5 * max(1.0, abs(x)), (a, h)


@pytest.mark.parametrize("chunk", [1, 3, 64])
def test_grad_fused_token_logprobs_match_cross_entropy(chunk):
    """model.TokenLogProbs (chunked, backward recomputes the logits) against autograd
    through F.cross_entropy on the full logits, in float64."""
    from model import TokenLogProbs
    g = torch.Generator().manual_seed(0)
    h = torch.randn(10, 8, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(13, 8, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 13, (10,), generator=g)
    up = torch.randn(10, generator=g, dtype=torch.float64)  # an arbitrary upstream gradient
    want = orpo.logps_from_logits(h @ w.t(), y)
    gh, gw = torch.autograd.grad((want * up).sum(), (h, w))
    got = TokenLogProbs.apply(h, w, y, chunk)
    fh, fw = torch.autograd.grad((got * up).sum(), (h, w))
    assert rel_err(got, want) <= 1e-12 and rel_err(fh, gh) <= 1e-12 and rel_err(fw, gw) <= 1e-12
    assert torch.autograd.gradcheck(lambda a, b: TokenLogProbs.apply(a, b, y, chunk), (h, w))


def test_fused_token_logprobs_under_bf16_autocast():
    """Under CPU bf16 autocast the vocabulary slices' matmuls run in bf16 and the softmax in
    fp32: the log-probs and gradients match fp32 cross-entropy on bf16-rounded h and W."""
    from model import TokenLogProbs
    g = torch.Generator().manual_seed(0)
    h = torch.randn(12, 16, generator=g).bfloat16().float().requires_grad_()
    w = torch.randn(40, 16, generator=g).bfloat16().float().requires_grad_()
    y = torch.randint(0, 40, (12,), generator=g)
    up = torch.randn(12, generator=g)
    want = orpo.logps_from_logits(h @ w.t(), y)
    gh, gw = torch.autograd.grad((want * up).sum(), (h, w))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = TokenLogProbs.apply(h, w, y, 7)  # 6 slices, the last one short
    fh, fw = torch.autograd.grad((got * up).sum(), (h, w))
    assert got.dtype == fh.dtype == fw.dtype == torch.float32
    # bf16 logits alone give about 1e-3 and 2.5e-3 here; a bf16 softmax gives 6.5e-3
    assert rel_err(got, want) <= 2e-3 and rel_err(fh, gh) <= 4e-3 and rel_err(fw, gw) <= 4e-3
