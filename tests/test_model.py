import torch

from model import GPT, GPTConfig


def tiny_model(**kw):
    torch.manual_seed(0)
    return GPT(GPTConfig(block_size=32, vocab_size=50, n_layer=2, n_head=2, n_embd=16, **kw))


def test_causal_later_tokens_never_change_earlier_logits():
    model = tiny_model().eval()
    x = torch.randint(0, 50, (3, 20))
    ref = model(x)
    for t in (0, 7, 19):
        x2 = x.clone()
        x2[:, t:] = torch.randint(0, 50, (3, 20 - t))
        out = model(x2)
        assert torch.equal(out[:, :t], ref[:, :t]), f"logits before {t} changed"
        if t < 19:
            assert not torch.allclose(out[:, t:], ref[:, t:])  # the edit itself did reach the model


def test_logits_at_every_position_and_tied_embeddings():
    model = tiny_model()
    assert model(torch.zeros(2, 5, dtype=torch.long)).shape == (2, 5, 50)
    assert model.lm_head.weight is model.wte.weight


def test_gpt2_init_scales_residual_projections():
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=32, vocab_size=50, n_layer=8, n_head=2, n_embd=64))
    std = model.h[0].c_proj.weight.std().item()
    assert abs(std - 0.02 / 4) < 0.002, std  # 0.02 / sqrt(2 * 8)
    assert abs(model.h[0].c_fc.weight.std().item() - 0.02) < 0.002


def test_too_long_input_is_an_error():
    model = tiny_model()
    try:
        model(torch.zeros(1, 33, dtype=torch.long))
    except ValueError as e:
        assert "block_size" in str(e)
    else:
        raise AssertionError("no error")


def test_optimizer_groups_decay_matrices_only():
    model = tiny_model()
    opt = model.configure_optimizer(0.1, 1e-3, (0.9, 0.95), "cpu")
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    n = sum(p.numel() for g in opt.param_groups for p in g["params"])
    assert n == sum(p.numel() for p in model.parameters())


def test_generate_stops_at_end_of_text():
    model = tiny_model().eval()
    with torch.no_grad():  # make token 3 certain, so it is the first token sampled
        model.lm_head.weight.zero_()
        model.lm_head.weight[3] = 0  # still tied: wte row 3
        model.ln_f.bias.fill_(1.0)
        model.ln_f.weight.zero_()
        model.wte.weight[3].fill_(100.0)
    g = torch.Generator().manual_seed(0)
    out = model.generate(torch.zeros(1, 2, dtype=torch.long), 10, eot=3, generator=g)
    assert out.tolist() == [[0, 0, 3]]
    out = model.generate(torch.zeros(1, 2, dtype=torch.long), 4, eot=None, generator=g)
    assert out.shape == (1, 6)
