"""The scale path on the CPU: DDP through torchrun (gloo), the gpt2-125m preset's shape,
bf16 autocast, a GradScaler, and torch.compile."""
import json
import os
import subprocess
import sys

import pytest
import torch

from machinery import cli as configurator
import orpo
import prepare_data
from conftest import ROOT, assert_same_losses, losses, run
from model import GPT, GPTConfig


def test_ddp_two_processes_match_one_with_the_same_global_batch(tmp_path, data_dir):
    """2 ranks x 1 micro-step of 8 pairs against 1 process x 2 micro-steps: the same pairs,
    the same gradient (averaged over ranks instead of summed over micro-steps)."""
    kw = ["--config=tiny", f"--data_dir={data_dir}", "--grad_accum=2", "--max_iters=6",
          "--eval_interval=6", "--n_samples=2"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    one = subprocess.run([sys.executable, "orpo.py", *kw, f"--out_dir={tmp_path / 'one'}"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                          "--nproc_per_node=2", "orpo.py", *kw, f"--out_dir={tmp_path / 'two'}"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr
    assert "2 process(es) x 1 micro-steps" in two.stdout
    read = lambda d: [json.loads(l) for l in open(tmp_path / d / "log.jsonl")]
    a, b = losses(read("one")), losses(read("two"))
    assert len(a) == 6
    assert_same_losses(a, b, rtol=1e-4)  # float summation order differs (all-reduce vs sum)



def test_ddp_resume_with_dropout_is_bit_exact(tmp_path, data_dir):
    """Dropout draws from each process's own RNG: every process's state is saved and
    restored, so a 2-process run stopped and resumed logs what the uninterrupted run logs."""
    kw = ["--config=tiny", f"--data_dir={data_dir}", "--grad_accum=2", "--dropout=0.1",
          "--lr_decay_iters=6", "--eval_interval=3", "--n_samples=2", "--eval_pairs=8"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    ddp = lambda *a: subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                                     "--nproc_per_node=2", "orpo.py", *kw, *a], cwd=ROOT, env=env,
                                    capture_output=True, text=True, timeout=300)
    for args in ([f"--out_dir={tmp_path / 'whole'}", "--max_iters=6"],
                 [f"--out_dir={tmp_path / 'cut'}", "--max_iters=3"],
                 [f"--out_dir={tmp_path / 'cut'}", "--max_iters=6", "--init_from=resume"]):
        r = ddp(*args)
        assert r.returncode == 0, r.stderr
    read = lambda d: [json.loads(l) for l in open(tmp_path / d / "log.jsonl")]
    assert_same_losses(losses(read("whole")), losses(read("cut")))  # bit for bit



def test_ddp_on_data_not_yet_prepared_prepares_it_once(tmp_path):
    """The first process prepares data/synthetic while the others wait for it (each taking
    the data folder's lock at once would stop the second)."""
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                        "--nproc_per_node=2", os.path.join(ROOT, "orpo.py"), "--config=tiny",
                        "--grad_accum=2", "--max_iters=2", "--n_samples=2", "--eval_pairs=8"],
                       cwd=tmp_path, env=dict(os.environ, OMP_NUM_THREADS="1"),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("preparing") == 1 and "2 process(es)" in r.stdout


def test_gpt2_125m_preset_runs_two_iterations_on_cpu(tmp_path, data_dir):
    recs = run(tmp_path, data_dir, preset="gpt2-125m", batch_size=1, block_size=128, max_iters=2,
               grad_accum=2, eval_interval=2, eval_pairs=2, n_samples=1, max_new_tokens=2,
               init_from="scratch", dataset="synthetic", vocab_size=50304, warmup_iters=1)
    assert len(losses(recs)) == 2
    ck = torch.load(tmp_path / "ckpt.pt", weights_only=False)
    n = sum(v.numel() for k, v in ck["model"].items() if k != "lm_head.weight")  # tied
    n -= ck["model"]["wpe.weight"].numel() - 1024 * 768  # count wpe at GPT-2's 1024 positions
    assert abs(n - 124_475_904) / 124_475_904 < 0.01, n  # GPT-2 small with a 50304 vocab


@pytest.mark.parametrize("hand_grad", [False, True])
def test_bf16_autocast_on_cpu_trains_with_fp32_loss(tmp_path, data_dir, hand_grad):
    recs = run(tmp_path, data_dir, dtype="bfloat16", max_iters=10, hand_grad=hand_grad)
    evals = [r for r in recs if r["kind"] == "eval"]
    assert evals[-1]["l_sft"] < evals[0]["l_sft"]
    _, _, dtype, ctx = configurator.setup_device("cpu", "bfloat16")
    model = GPT(GPTConfig(block_size=16, vocab_size=64, n_layer=1, n_head=2, n_embd=16))
    x = torch.randint(0, 64, (4, 8))
    resp = torch.ones(4, 8)
    with ctx:
        logits = model(x, resp.bool())
        tok = model(x, resp.bool(), x.flatten())
    assert logits.dtype == torch.bfloat16  # the matmuls ran in bf16 ...
    assert tok.dtype == torch.float32      # ... the log-probs in fp32
    logp, ell = orpo.response_logps(tok, resp, resp.bool())
    assert logp.dtype == ell.dtype == torch.float32  # and the loss


def test_grad_scaler_on_cpu_device(tmp_path, data_dir):
    """fp16 autocast with torch.amp.GradScaler('cpu'): the scaler's state is checkpointed
    and the run resumes from it."""
    recs = run(tmp_path, data_dir, dtype="float16", max_iters=4, lr_decay_iters=6, eval_interval=4)
    assert len(losses(recs)) == 4
    ck = torch.load(tmp_path / "ckpt.pt", weights_only=False)
    assert ck["scaler"]["scale"] > 0  # an enabled scaler's state
    recs = run(tmp_path, data_dir, dtype="float16", max_iters=6, lr_decay_iters=6, eval_interval=2,
               init_from="resume")
    assert len(losses(recs)) == 6


def test_compile_trains_like_eager(tmp_path, data_dir):
    """--compile=true (torch.compile, inductor on the CPU) logs the eager run's losses, and
    its checkpoint holds the plain model's keys, so it resumes without compile."""
    kw = dict(max_iters=6, log_interval=1, eval_interval=100, n_samples=2)
    eager = losses(run(tmp_path / "eager", data_dir, **kw))
    comp = losses(run(tmp_path / "comp", data_dir, compile=True, **kw))
    assert len(eager) == 6
    assert_same_losses(eager, comp, rtol=1e-5)
    ck = torch.load(tmp_path / "comp" / "ckpt.pt", weights_only=False)
    assert not any(k.startswith("_orig_mod") for k in ck["model"])


def test_gpt2_125m_from_a_hugging_face_directory_reports_the_true_l_sft(tmp_path, gpt2):
    """OpenAI-like weights, every real logit near -60, as save_pretrained writes them: the
    preset's iteration-0 held-out L_SFT is the NLL over the 50,257 real ids, computed here
    independently from the state dict (the 47 padding ids would make it about 65)."""
    import torch.nn.functional as F
    from test_model import gpt2_by_hand, gpt2_state_dict
    sd = gpt2_state_dict()
    sd["ln_f.weight"][0], sd["ln_f.bias"][0] = 0.0, -60.0  # h[0] = -60 in every position
    sd["wte.weight"][:, 0] = 1.0                            # so every logit is -60 + ...
    hf = tmp_path / "hf"
    hf.mkdir()
    torch.save({"transformer." + k: v for k, v in sd.items()}, hf / "pytorch_model.bin")
    json.dump(dict(model_type="gpt2", n_layer=12, n_head=12, n_embd=768, n_positions=1024,
                   vocab_size=50257), open(hf / "config.json", "w"))
    words = "red green blue cat dog owl sun rain".split()
    rows = [dict(prompt=f"Name a thing like {a}.", chosen=f" {b}, like {a}.", rejected=f" no {b}")
            for a in words for b in words[:3] if a != b]
    f = tmp_path / "pairs.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out, data = tmp_path / "out", tmp_path / "data"
    r = subprocess.run([sys.executable, "orpo.py", "--config", "gpt2-125m", f"--init_from={hf}",
                        "--dataset=mine", f"--data_file={f}", f"--data_dir={data}",
                        f"--out_dir={out}", "--block_size=32", "--batch_size=2", "--grad_accum=1",
                        "--max_iters=2", "--eval_interval=2", "--eval_pairs=2", "--n_samples=1",
                        "--max_new_tokens=2", "--warmup_iters=1", "--dtype=float32"],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    printed = next(l for l in r.stdout.splitlines() if l.startswith("eval     0"))
    logged = [json.loads(l) for l in open(out / "log.jsonl")][0]["l_sft"]
    _, splits = prepare_data.load(str(data), "mine")
    tokens, index = splits["val"]
    want = []
    for off, p, c, _ in index[:2]:
        ids = torch.from_numpy(tokens[off:off + p + c].astype("int64"))[None]
        with torch.no_grad():
            logp = F.log_softmax(gpt2_by_hand({k: v.double() for k, v in sd.items()}, ids[:, :-1]), -1)
        want.append(-logp[0, p - 1:].gather(-1, ids[0, p:, None]).mean().item())
    want = sum(want) / len(want)
    assert abs(logged - want) < 1e-4 * want, (logged, want)
    assert f"L_SFT {want:.4f}" in printed, (printed, want)
    print(f"iteration-0 L_SFT: printed {printed.split('|')[1].strip()}, independent {want:.6f}")
    assert len([l for l in open(out / "log.jsonl") if '"kind": "train"' in l]) == 2


@pytest.mark.parametrize("amx, avx512_bf16, want", [(True, False, "bfloat16"),
                                                    (False, True, "bfloat16"),
                                                    (False, False, "float32")])
def test_dtype_auto_on_the_cpu_is_bf16_only_where_the_cpu_has_it(monkeypatch, amx, avx512_bf16, want):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16, raising=False)
    assert configurator.setup_device("cpu", "auto")[2] == want
    assert configurator.setup_device("cpu", "float32")[2] == "float32"
    assert orpo.PRESETS["small"]["dtype"] == "float32"  # the demo prints the same everywhere
