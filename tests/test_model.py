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


def gpt2_state_dict(prefix=""):
    """GPT-2 124M's exact key names and shapes (Hugging Face layout, Conv1D weights stored
    (in, out), the attention-mask buffers included), with random values."""
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g) * 0.02
    sd = {"wte.weight": r(50257, 768), "wpe.weight": r(1024, 768),
          "ln_f.weight": 1 + r(768), "ln_f.bias": r(768)}
    for i in range(12):
        p = f"h.{i}."
        sd.update({p + "ln_1.weight": 1 + r(768), p + "ln_1.bias": r(768),
                   p + "attn.bias": torch.tril(torch.ones(1024, 1024)).view(1, 1, 1024, 1024),
                   p + "attn.c_attn.weight": r(768, 2304), p + "attn.c_attn.bias": r(2304),
                   p + "attn.c_proj.weight": r(768, 768), p + "attn.c_proj.bias": r(768),
                   p + "ln_2.weight": 1 + r(768), p + "ln_2.bias": r(768),
                   p + "mlp.c_fc.weight": r(768, 3072), p + "mlp.c_fc.bias": r(3072),
                   p + "mlp.c_proj.weight": r(3072, 768), p + "mlp.c_proj.bias": r(768)})
    return {prefix + k: v for k, v in sd.items()}


def gpt2_by_hand(sd, idx):
    """GPT-2's forward pass written out from the paper and the state dict alone."""
    import torch.nn.functional as F
    B, T = idx.shape
    ln = lambda x, n: F.layer_norm(x, (768,), sd[n + ".weight"], sd[n + ".bias"], eps=1e-5)
    x = sd["wte.weight"][idx] + sd["wpe.weight"][:T]
    causal = torch.tril(torch.ones(T, T, dtype=torch.bool))
    for i in range(12):
        p = f"h.{i}."
        q, k, v = (ln(x, p + "ln_1") @ sd[p + "attn.c_attn.weight"] + sd[p + "attn.c_attn.bias"]).split(768, -1)
        q, k, v = (t.view(B, T, 12, 64).transpose(1, 2) for t in (q, k, v))
        att = ((q @ k.transpose(-1, -2)) / 8.0).masked_fill(~causal, float("-inf")).softmax(-1)
        y = (att @ v).transpose(1, 2).reshape(B, T, 768)
        x = x + y @ sd[p + "attn.c_proj.weight"] + sd[p + "attn.c_proj.bias"]
        h = F.gelu(ln(x, p + "ln_2") @ sd[p + "mlp.c_fc.weight"] + sd[p + "mlp.c_fc.bias"], approximate="tanh")
        x = x + h @ sd[p + "mlp.c_proj.weight"] + sd[p + "mlp.c_proj.bias"]
    return ln(x, "ln_f") @ sd["wte.weight"].t()


import pytest  # noqa: E402


@pytest.mark.parametrize("prefix", ["", "transformer."])
def test_from_pretrained_maps_every_gpt2_tensor(tmp_path, prefix):
    sd = gpt2_state_dict(prefix)
    path = str(tmp_path / "pytorch_model.bin")
    torch.save(sd, path)
    model = GPT.from_pretrained(path).eval()
    assert sum(p.numel() for p in model.parameters()) == 124_475_904  # 50304-row wte, tied
    plain = {k.removeprefix(prefix): v for k, v in sd.items()}
    assert torch.equal(model.h[3].c_attn.weight, plain["h.3.attn.c_attn.weight"].t())
    assert torch.equal(model.wte.weight[50257:], torch.zeros(47, 768))  # padding rows stay 0 ...
    idx = torch.randint(0, 50257, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = model(idx)[..., :50257]
        want = gpt2_by_hand(plain, idx)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_from_pretrained_names_what_does_not_fit(tmp_path):
    sd = gpt2_state_dict()
    del sd["h.5.mlp.c_fc.bias"]
    torch.save(sd, tmp_path / "a.bin")
    with pytest.raises(KeyError, match="lacks.*h.5.c_fc.bias"):
        GPT.from_pretrained(str(tmp_path / "a.bin"))
    with pytest.raises(ValueError, match="no file at"):
        GPT.from_pretrained(str(tmp_path / "missing.bin"))
