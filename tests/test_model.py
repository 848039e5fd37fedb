import json
import os

import pytest
import torch
import torch.nn.functional as F

from machinery import gpt2
from model import GPT, GPTConfig


def tiny_model(**kw):
    torch.manual_seed(0)
    shape = dict(block_size=32, vocab_size=50, n_layer=2, n_head=2, n_embd=16)
    return GPT(GPTConfig(**{**shape, **kw}))


def ids_and_targets(n_vocab, B, T):
    """Random ids (B, T), a mask `need` of the positions scored, and their targets (N,)."""
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(0, n_vocab, (B, T), generator=g)
    need = torch.rand(B, T, generator=g) > 0.3
    return idx, need, torch.randint(0, n_vocab, (int(need.sum()),), generator=g)


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


def test_logits_at_every_position_or_the_needed_ones_and_tied_embeddings():
    model = tiny_model().eval()
    x = torch.randint(0, 50, (2, 5))
    assert model(x).shape == (2, 5, 50)
    need = torch.tensor([[0, 1, 1, 0, 1], [1, 0, 0, 0, 0]], dtype=torch.bool)
    assert torch.equal(model(x, need), model(x)[need])  # (4, 50)
    assert model.lm_head.weight is model.wte.weight


def test_modules_have_gpt2_names():
    """The state dict is GPT-2's (Hugging Face) less the `transformer.` prefix, so loading
    OpenAI's weights needs no rename table."""
    model = tiny_model(n_layer=1)
    want = {"wte.weight", "wpe.weight", "ln_f.weight", "ln_f.bias", "lm_head.weight"}
    want |= {f"h.0.{m}.{p}" for m in ("ln_1", "attn.c_attn", "attn.c_proj", "ln_2", "mlp.c_fc",
                                      "mlp.c_proj") for p in ("weight", "bias")}
    assert set(model.state_dict()) == want


def test_gpt2_init_scales_residual_projections():
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=32, vocab_size=50, n_layer=8, n_head=2, n_embd=64))
    for w in (model.h[0].attn.c_proj.weight, model.h[0].mlp.c_proj.weight):
        assert abs(w.std().item() - 0.02 / 4) < 0.002  # 0.02 / sqrt(2 * 8)
    assert abs(model.h[0].mlp.c_fc.weight.std().item() - 0.02) < 0.002


def test_too_long_input_is_an_error():
    model = tiny_model()
    with pytest.raises(ValueError, match="block_size"):
        model(torch.zeros(1, 33, dtype=torch.long))


def test_optimizer_groups_decay_matrices_only():
    model = tiny_model()
    opt = model.configure_optimizer(0.1, 1e-3, (0.9, 0.95), "cpu")
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    n = sum(p.numel() for g in opt.param_groups for p in g["params"])
    assert n == sum(p.numel() for p in model.parameters())


def test_flops_count_the_real_vocabulary():
    model = tiny_model(vocab_size=64, n_vocab=50)
    n_blocks = sum(p.numel() for p in model.h.parameters())
    # 100 tokens in rows of 20, 40 of them with logits: 50 columns, not 64
    assert model.flops(100, 40, 20) == 6 * n_blocks * 100 + 12 * 2 * 16 * 20 * 100 + 6 * 16 * 50 * 40


def padded_model():
    """vocab_size 64, n_vocab 50, and padding rows that would win every softmax they entered:
    h has a component 1 along channel 0 at every position, and padding rows 100 there."""
    model = tiny_model(vocab_size=64, n_vocab=50).eval()
    with torch.no_grad():
        model.ln_f.weight[0], model.ln_f.bias[0] = 0.0, 1.0
        model.wte.weight[50:] = 0.0
        model.wte.weight[50:, 0] = 100.0
    return model


def test_token_logps_are_forwards_log_softmax_over_the_real_ids():
    model = padded_model()
    x, need, y = ids_and_targets(50, 3, 10)
    model.chunk = 16  # 4 vocabulary slices, the last one short
    got = model(x, need, y)
    got.sum().backward()
    grad, model.wte.weight.grad = model.wte.weight.grad, None
    logits = model(x, need)
    assert logits.shape == (len(y), 50)
    want = logits.log_softmax(-1).gather(1, y[:, None])[:, 0]
    want.sum().backward()
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad, model.wte.weight.grad, rtol=1e-5, atol=1e-6)
    assert not grad[50:].any()  # no padding id is a target or in a softmax
    assert got.dtype == torch.float32 and (got < 0).all() and (got > -10).all()


def train_losses(dtype, steps=6):
    """The losses of a few AdamW steps of a tiny GPT's mean token log-prob on fixed random
    tokens, in fp32 or under the CPU's 16-bit autocast, as orpo.py trains."""
    model = tiny_model(block_size=64, vocab_size=64, n_embd=32)
    opt = model.configure_optimizer(0.1, 3e-3, (0.9, 0.95), "cpu", dtype)
    g = torch.Generator().manual_seed(4)
    x, need = torch.randint(0, 64, (4, 64), generator=g), torch.rand(4, 64, generator=g) > 0.5
    y = torch.randint(0, 64, (int(need.sum()),), generator=g)
    ctx = torch.autocast("cpu", getattr(torch, dtype), enabled=dtype != "float32")
    losses = []
    for _ in range(steps):
        with ctx:
            loss = -model(x, need, y).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def test_bf16_steps_stay_within_bf16_rounding_of_fp32():
    """bf16 rounds each matmul's inputs to 8 significant bits, a relative error of up to
    2^-9; averaged over many products the losses of six steps stay within 2^-9 (0.2%) of
    fp32's (measured: within 0.02%), and they learn as fp32 does."""
    fp32, bf16 = train_losses("float32"), train_losses("bfloat16")
    assert fp32[-1] < fp32[0] - 0.05  # the steps do learn: a drift would show
    assert bf16 != fp32  # bf16 did run: its rounding differs
    for a, b in zip(fp32, bf16):
        assert abs(a - b) <= 2 ** -9 * abs(a), (fp32, bf16)


def test_generate_never_samples_padding_ids():
    model = padded_model()
    g = torch.Generator().manual_seed(0)
    out = model.generate(torch.zeros(4, 1, dtype=torch.long), 20, temperature=2.0, generator=g)
    assert out.shape == (4, 21) and out.max() < 50


def sample_reference(model, idx, n, temperature, top_k, generator):
    """Sampling the plain way: every position's logits, then the last one's."""
    for _ in range(n):
        logits = model(idx[:, -model.cfg.block_size:])[:, -1].float() / temperature
        if top_k is not None:
            logits[logits < torch.topk(logits, top_k).values[:, [-1]]] = float("-inf")
        idx = torch.cat((idx, torch.multinomial(logits.softmax(-1), 1, generator=generator)), 1)
    return idx


@pytest.mark.parametrize("temperature,top_k", [(1.0, None), (0.7, 5), (1.5, None)])
def test_generate_samples_what_the_full_logits_would(temperature, top_k):
    model = tiny_model().eval()
    idx = torch.randint(0, 50, (3, 4), generator=torch.Generator().manual_seed(2))
    for seed in range(3):
        gen = lambda: torch.Generator().manual_seed(seed)
        got = model.generate(idx, 40, temperature, top_k, generator=gen())
        want = sample_reference(model, idx, 40, temperature, top_k, gen())
        assert torch.equal(got, want)  # 40 tokens: past block_size 32, the window slides


def test_generate_stops_at_end_of_text():
    model = tiny_model().eval()
    with torch.no_grad():  # make token 3 certain, so it is the first token sampled
        model.lm_head.weight.zero_()
        model.ln_f.bias.fill_(1.0)
        model.ln_f.weight.zero_()
        model.wte.weight[3].fill_(100.0)  # still tied: lm_head row 3
    g = torch.Generator().manual_seed(0)
    out = model.generate(torch.zeros(2, 2, dtype=torch.long), 10, eot=3, generator=g)
    assert out.tolist() == [[0, 0, 3], [0, 0, 3]]
    out = model.generate(torch.zeros(1, 2, dtype=torch.long), 4, eot=None, generator=g)
    assert out.shape == (1, 6)


def test_generate_rows_that_ended_emit_eot_until_all_have():
    model = tiny_model(vocab_size=5).eval()  # 5 ids: each row samples eot soon
    for seed in range(10):
        out = model.generate(torch.zeros(4, 1, dtype=torch.long), 30, eot=2,
                             generator=torch.Generator().manual_seed(seed))[:, 1:]
        ended = (out == 2).long().cummax(1).values.bool()  # at or after the row's first eot
        assert (out[ended] == 2).all()
        assert out.size(1) == 30 or ended[:, -1].all() and not ended[:, -2].all()


# ----------------------------------------------------------------------------------------
# GPT-2 checkpoints: OpenAI's layout, from the hub or disk, and our export back to it


def gpt2_state_dict(prefix="", n_layer=12):
    """GPT-2's exact key names and shapes (Hugging Face layout, Conv1D weights stored
    (in, out), the attention-mask buffers included), 768 wide, with random values."""
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g) * 0.02
    sd = {"wte.weight": r(50257, 768), "wpe.weight": r(1024, 768),
          "ln_f.weight": 1 + r(768), "ln_f.bias": r(768)}
    for i in range(n_layer):
        p = f"h.{i}."
        sd.update({p + "ln_1.weight": 1 + r(768), p + "ln_1.bias": r(768),
                   p + "attn.bias": torch.tril(torch.ones(1024, 1024)).view(1, 1, 1024, 1024),
                   p + "attn.c_attn.weight": r(768, 2304), p + "attn.c_attn.bias": r(2304),
                   p + "attn.c_proj.weight": r(768, 768), p + "attn.c_proj.bias": r(768),
                   p + "ln_2.weight": 1 + r(768), p + "ln_2.bias": r(768),
                   p + "mlp.c_fc.weight": r(768, 3072), p + "mlp.c_fc.bias": r(3072),
                   p + "mlp.c_proj.weight": r(3072, 768), p + "mlp.c_proj.bias": r(768)})
    return {prefix + k: v for k, v in sd.items()}


def gpt2_config(d, n_layer=12):
    """The config.json that GPT-2 small's shape has, with n_layer layers, written into d."""
    (d / "config.json").write_text(json.dumps(dict(model_type="gpt2", n_layer=n_layer, n_head=12,
                                                   n_embd=768, n_positions=1024, vocab_size=50257)))


def gpt2_by_hand(sd, idx):
    """GPT-2's forward pass written out from the paper and the state dict alone."""
    B, T = idx.shape
    ln = lambda x, n: F.layer_norm(x, (768,), sd[n + ".weight"], sd[n + ".bias"], eps=1e-5)
    x = sd["wte.weight"][idx] + sd["wpe.weight"][:T]
    causal = torch.tril(torch.ones(T, T, dtype=torch.bool))
    for i in range(len({k.split(".")[1] for k in sd if k.startswith("h.")})):
        p = f"h.{i}."
        q, k, v = (ln(x, p + "ln_1") @ sd[p + "attn.c_attn.weight"] + sd[p + "attn.c_attn.bias"]).split(768, -1)
        q, k, v = (t.view(B, T, 12, 64).transpose(1, 2) for t in (q, k, v))
        att = ((q @ k.transpose(-1, -2)) / 8.0).masked_fill(~causal, float("-inf")).softmax(-1)
        y = (att @ v).transpose(1, 2).reshape(B, T, 768)
        x = x + y @ sd[p + "attn.c_proj.weight"] + sd[p + "attn.c_proj.bias"]
        h = F.gelu(ln(x, p + "ln_2") @ sd[p + "mlp.c_fc.weight"] + sd[p + "mlp.c_fc.bias"], approximate="tanh")
        x = x + h @ sd[p + "mlp.c_proj.weight"] + sd[p + "mlp.c_proj.bias"]
    return ln(x, "ln_f") @ sd["wte.weight"].t()


@pytest.mark.parametrize("prefix,n_layer", [("", 2), ("transformer.", 12)])
def test_from_pretrained_maps_every_gpt2_tensor(tmp_path, prefix, n_layer):
    sd = gpt2_state_dict(prefix, n_layer)
    path = str(tmp_path / "pytorch_model.bin")
    torch.save(sd, path)
    gpt2_config(tmp_path, n_layer)
    model = gpt2.from_pretrained(path).eval()
    if n_layer == 12:
        assert sum(p.numel() for p in model.parameters()) == 124_475_904  # 50304-row wte, tied
    assert (model.cfg.n_head, model.cfg.vocab_size, model.n_vocab) == (12, 50304, 50257)
    plain = {k.removeprefix(prefix): v for k, v in sd.items()}
    assert torch.equal(model.h[1].attn.c_attn.weight, plain["h.1.attn.c_attn.weight"].t())
    assert torch.equal(model.wte.weight[50257:], torch.zeros(47, 768))  # padding rows are 0
    idx = torch.randint(0, 50257, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = model(idx)
        want = gpt2_by_hand(plain, idx)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_padding_ids_take_no_probability_from_gpt2(tmp_path):
    """OpenAI's GPT-2 puts every logit near -60; the 47 zeroed padding rows of the 50304-row
    embedding would score exactly 0 and swamp every softmax (log-probs near -64, not -11).
    The same here: every real row of wte gets a component 1 along channel 0, and ln_f puts
    -60 there in every h (gain 0, bias -60), so each real logit is -60 + h[1:] . wte_v[1:]."""
    sd = gpt2_state_dict(n_layer=2)
    sd["wte.weight"][:, 0] = 1.0
    sd["ln_f.weight"][0], sd["ln_f.bias"][0] = 0.0, -60.0
    torch.save(sd, tmp_path / "pytorch_model.bin")
    gpt2_config(tmp_path, n_layer=2)
    model = gpt2.from_pretrained(str(tmp_path / "pytorch_model.bin")).eval()
    idx, need, y = ids_and_targets(50257, 2, 12)
    # float64 shows the normalisation exact; in fp32 a logit near -60 is only good to its
    # ulp, 4e-6, and a 768-term dot product with a -60 term in it to about 4e-5
    for dtype, tol in ((torch.float64, 1e-5), (torch.float32, 1e-4)):
        with torch.no_grad():
            model.to(dtype)
            h = model.hidden(idx)[need].double()
            logits = h @ sd["wte.weight"].double().t()  # (N, 50257), independently of the model
            assert -61 < logits.mean() < -59
            want = logits.log_softmax(-1).gather(1, y[:, None])[:, 0]
            got = model(idx, need, y)
            via_logits = model(idx, need).log_softmax(-1).gather(1, y[:, None])[:, 0]
        assert -13 < want.mean() < -9  # about -log(50257): with the padding ids, -64
        torch.testing.assert_close(got.double(), want, rtol=0, atol=tol)
        torch.testing.assert_close(via_logits.double(), want, rtol=0, atol=tol)


def small_gpt(n_vocab, vocab_size, n_embd=64, n_head=4):
    """A random GPT with random biases and LayerNorm gains too (init leaves them 0 and 1)."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=32, vocab_size=vocab_size, n_vocab=n_vocab, n_layer=2,
                          n_head=n_head, n_embd=n_embd)).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    return model


def same_logits(a, b, n_vocab):
    idx = torch.randint(0, n_vocab, (2, 32), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(a(idx), b(idx))


HF_KEYS = ["wte.weight", "wpe.weight", "ln_f.weight", "ln_f.bias"] + [
    f"h.{i}.{m}.{p}" for i in range(2) for m in ("ln_1", "attn.c_attn", "attn.c_proj", "ln_2",
                                                 "mlp.c_fc", "mlp.c_proj") for p in ("weight", "bias")]


@pytest.mark.parametrize("n_vocab,vocab_size", [(50257, 50304), (50, 50)])
def test_export_hf_writes_what_gpt2_lm_head_model_loads(tmp_path, n_vocab, vocab_size):
    model = small_gpt(n_vocab, vocab_size)
    gpt2.export_hf(model, str(tmp_path), eot=n_vocab - 1)
    with open(tmp_path / "config.json") as f:
        config = json.load(f)
    assert config["model_type"] == "gpt2" and config["architectures"] == ["GPT2LMHeadModel"]
    want = dict(n_layer=2, n_head=4, n_embd=64, n_positions=32, n_ctx=32, vocab_size=n_vocab,
                activation_function="gelu_new", layer_norm_epsilon=1e-5, tie_word_embeddings=True,
                bos_token_id=n_vocab - 1, eos_token_id=n_vocab - 1)
    assert {k: config[k] for k in want} == want
    sd = torch.load(tmp_path / "pytorch_model.bin", weights_only=True)
    assert set(sd) == {"transformer." + k for k in HF_KEYS} | {"lm_head.weight"}
    assert sd["transformer.h.1.attn.c_attn.weight"].shape == (64, 192)  # Conv1D: (in, out)
    assert sd["transformer.h.1.mlp.c_proj.weight"].shape == (256, 64)
    assert sd["transformer.wte.weight"].shape == (n_vocab, 64)  # the padding rows cut
    assert torch.equal(sd["lm_head.weight"], sd["transformer.wte.weight"])
    back = gpt2.from_pretrained(str(tmp_path), block_size=32).eval()
    assert (back.cfg.vocab_size, back.n_vocab, back.cfg.n_head) == (-(-n_vocab // 64) * 64, n_vocab, 4)
    same_logits(model, back, n_vocab)


@pytest.mark.parametrize("name", ["", "pytorch_model.bin", "model.safetensors"])
def test_export_hf_reads_back_from_each_file(tmp_path, name):
    if name == "model.safetensors":
        st = pytest.importorskip("safetensors")
        gpt2.safetensors_torch or pytest.skip("machinery/gpt2.py did not import safetensors")
    model = small_gpt(50, 50)
    gpt2.export_hf(model, str(tmp_path))
    if name == "model.safetensors":
        with st.safe_open(str(tmp_path / name), "pt") as f:
            assert f.metadata() == {"format": "pt"}  # transformers refuses a file without it
    same_logits(model, gpt2.from_pretrained(str(tmp_path / name), block_size=32).eval(), 50)


def test_export_hf_gives_back_the_gpt2_it_loaded(tmp_path):
    """Loading OpenAI's layout and exporting it again is the identity, tensor for tensor:
    the same names, the Conv1D layout, the 50257 rows (the causal-mask buffers aside)."""
    sd = gpt2_state_dict("transformer.", n_layer=2)
    torch.save(sd, tmp_path / "in.bin")
    gpt2_config(tmp_path, n_layer=2)
    gpt2.export_hf(gpt2.from_pretrained(str(tmp_path / "in.bin")), str(tmp_path / "out"))
    out = torch.load(tmp_path / "out" / "pytorch_model.bin", weights_only=True)
    sd = {k: v for k, v in sd.items() if not k.endswith(".attn.bias")}
    assert set(out) == set(sd) | {"lm_head.weight"}
    assert all(torch.equal(out[k], v) for k, v in sd.items())
    assert torch.equal(out["lm_head.weight"], sd["transformer.wte.weight"])


def test_a_sharded_checkpoint_loads(tmp_path):
    """save_pretrained shards a checkpoint over its max_shard_size (gpt2-xl's 6 GB, say):
    pytorch_model.bin.index.json maps each tensor to its shard."""
    model = small_gpt(50, 50)
    gpt2.export_hf(model, str(tmp_path))
    (tmp_path / "model.safetensors").unlink(missing_ok=True)
    sd = torch.load(tmp_path / "pytorch_model.bin", weights_only=True)
    (tmp_path / "pytorch_model.bin").unlink()
    shard = {k: f"pytorch_model-0000{1 + ('.h.1.' in k)}-of-00002.bin" for k in sd}
    for name in set(shard.values()):
        torch.save({k: v for k, v in sd.items() if shard[k] == name}, tmp_path / name)
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": shard}))
    same_logits(model, gpt2.from_pretrained(str(tmp_path), block_size=32).eval(), 50)


def test_without_safetensors_bin_serves_and_safetensors_asks_for_it(tmp_path, monkeypatch):
    monkeypatch.setattr(gpt2, "safetensors_torch", None)
    model = small_gpt(50, 50)
    (tmp_path / "model.safetensors").write_bytes(b"stale")
    gpt2.export_hf(model, str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["config.json", "pytorch_model.bin"]
    same_logits(model, gpt2.from_pretrained(str(tmp_path), block_size=32).eval(), 50)
    os.rename(tmp_path / "pytorch_model.bin", tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="pip install safetensors"):
        gpt2.from_pretrained(str(tmp_path), block_size=32)


def test_export_hf_needs_biases(tmp_path):
    with pytest.raises(ValueError, match="bias=True"):
        gpt2.export_hf(tiny_model(bias=False), str(tmp_path))


def test_from_pretrained_hub_names_read_their_own_config(tmp_path, monkeypatch):
    """gpt2-medium through huggingface_hub (faked: no network here), its shape from its own
    config.json."""
    hub = pytest.importorskip("huggingface_hub")
    model = small_gpt(50257, 50304)
    gpt2.export_hf(model, str(tmp_path))
    calls = []

    def download(repo, filename):
        calls.append((repo, filename))
        return str(tmp_path / filename)

    monkeypatch.setattr(hub, "hf_hub_download", download)
    back = gpt2.from_pretrained("gpt2-medium", block_size=32).eval()
    weights = "model.safetensors" if gpt2.safetensors_torch else "pytorch_model.bin"
    assert calls == [("openai-community/gpt2-medium", "config.json"),
                     ("openai-community/gpt2-medium", weights)]
    assert back.cfg.n_head == 4
    same_logits(model, back, 50257)


EDITS = {  # a state dict broken in place
    "lacks": lambda sd: sd.pop("transformer.h.1.mlp.c_fc.bias"),
    "extra": lambda sd: sd.update({"transformer.h.9.ln_1.bias": torch.zeros(64)}),
    "shape": lambda sd: sd.update({"transformer.h.0.attn.c_proj.weight": torch.zeros(64, 63)}),
    "untied": lambda sd: sd.update({"lm_head.weight": sd["lm_head.weight"] + 1}),
}
WANT = dict(missing="no such file", name="not one of gpt2", garbage="not a readable weights file",
            truncated="not a readable weights file", tensor="not a state dict",
            safetensors="not a readable weights file", config="not a readable JSON file",
            bert="describes a bert", bare="no config.json beside the weights", empty="no model.safetensors or pytorch_model.bin",
            lacks=r"lacks \['h.1.mlp.c_fc.bias'\]", extra="'h.9.ln_1.bias' has no place",
            shape=r"h.0.attn.c_proj.weight: shape \(63, 64\) does not fit \(64, 64\)",
            untied="lm_head.weight differs", block="block_size 64 exceeds the checkpoint's 32")


def broken(tmp_path, case):
    """The path of a GPT-2 that cannot be loaded, broken as `case` says."""
    if case == "name":
        return "gpt3"
    d = tmp_path / "m"
    gpt2.export_hf(small_gpt(50, 50), str(d))
    (d / "model.safetensors").unlink(missing_ok=True)  # the .bin alone: edits to it are read
    b = d / "pytorch_model.bin"
    if case == "missing":
        return str(d / "nothing.bin")
    elif case == "garbage":
        b.write_bytes(b"not a checkpoint")
    elif case == "truncated":
        b.write_bytes(b.read_bytes()[:2000])
    elif case == "tensor":
        torch.save(torch.zeros(3), b)
    elif case == "empty":
        b.unlink()
    elif case == "safetensors":  # read before the .bin beside it
        (d / "model.safetensors").write_bytes(b"not a checkpoint")
    elif case == "config":
        (d / "config.json").write_text("{not json")
    elif case == "bert":
        (d / "config.json").write_text('{"model_type": "bert"}')
    elif case == "bare":  # the weights alone, as a file
        (d / "config.json").unlink()
        return str(b)
    elif case in EDITS:
        sd = torch.load(b, weights_only=True)
        EDITS[case](sd)
        torch.save(sd, b)
    return str(d)


@pytest.mark.parametrize("case", list(WANT))
def test_from_pretrained_fails_with_a_one_line_value_error_naming_the_path(tmp_path, case):
    if case == "safetensors" and gpt2.safetensors_torch is None:
        pytest.skip("safetensors is not installed")
    path = broken(tmp_path, case)
    with pytest.raises(ValueError, match=WANT[case]) as e:
        gpt2.from_pretrained(path, block_size=64 if case == "block" else 32)
    assert str(e.value).startswith(path) and "\n" not in str(e.value)


def test_from_pretrained_hub_failure_is_a_value_error(monkeypatch):
    hub = pytest.importorskip("huggingface_hub")

    def offline(repo, filename):
        raise OSError("no network")

    monkeypatch.setattr(hub, "hf_hub_download", offline)
    with pytest.raises(ValueError, match=r"^gpt2-xl: could not download it from the Hugging Face hub"):
        gpt2.from_pretrained("gpt2-xl")


def test_kv_cache_logits_equal_full_recompute_at_every_position():
    """Fed a token at a time through the cache, the model gives at each position the logits
    that running the whole sequence gives there (forward, no cache), within fp32 rounding."""
    model = tiny_model().eval()
    idx = torch.randint(0, 50, (3, 20), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want = model(idx)  # (3, 20, vocab): every position at once
        kv = [[] for _ in model.h]
        got = [F.linear(model.hidden(idx[:, :5], kv), model.lm_head.weight)]  # a 5-token prompt
        got += [F.linear(model.hidden(idx[:, t:t + 1], kv), model.lm_head.weight)
                for t in range(5, 20)]  # then one token at a time
        with pytest.raises(AssertionError, match="one token at a time"):
            model.hidden(idx[:, :2], kv)  # after the first pass, no more than one
    assert kv[0][0].shape == (3, model.cfg.n_head, 20, model.cfg.n_embd // model.cfg.n_head)
    torch.testing.assert_close(torch.cat(got, 1), want, rtol=1e-5, atol=1e-5)


def test_kv_cache_greedy_samples_equal_uncached_token_for_token():
    """Greedy decoding (temperature 0) with and without the cache: the same tokens, for
    prompts of two lengths, past block_size (32) where the window slides."""
    model = tiny_model().eval()
    for T in (1, 7):
        idx = torch.randint(0, 50, (4, T), generator=torch.Generator().manual_seed(T))
        got = model.generate(idx, 40, temperature=0)
        want = model.generate(idx, 40, temperature=0, cache=False)
        assert got.shape == (4, T + 40) and torch.equal(got, want)
