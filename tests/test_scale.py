"""The scale path on the CPU: DDP through torchrun (gloo), the gpt2-125m preset's shape,
bf16 autocast, a GradScaler, and torch.compile."""
import json
import os
import subprocess
import sys

import pytest
import torch

import orpo
from conftest import ROOT, assert_same_losses, losses, run


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
    _, _, dtype, ctx = orpo.setup_device("cpu", "bfloat16")
    model = orpo.GPT(orpo.GPTConfig(block_size=16, vocab_size=64, n_layer=1, n_head=2, n_embd=16))
    x = torch.randint(0, 64, (4, 8))
    resp = torch.ones(4, 8)
    with ctx:
        logits = model(x, resp.bool())
        tok = model.token_logps(x, resp.bool(), x.flatten())
    assert logits.dtype == torch.bfloat16  # the matmuls ran in bf16 ...
    assert tok.dtype == torch.float32      # ... the log-probs in fp32
    logp, ell = orpo.response_logps(tok, resp, resp.bool())
    assert logp.dtype == ell.dtype == torch.float32  # and the loss


def test_grad_scaler_on_cpu_device(tmp_path, data_dir):
    """fp16 autocast with torch.amp.GradScaler('cpu'): the scaler's state is checkpointed
    and the run resumes from it."""
    recs = run(tmp_path, data_dir, dtype="float16", max_iters=4, eval_interval=4)
    assert len(losses(recs)) == 4
    ck = torch.load(tmp_path / "ckpt.pt", weights_only=False)
    assert ck["scaler"]["scale"] > 0  # an enabled scaler's state
    recs = run(tmp_path, data_dir, dtype="float16", max_iters=6, eval_interval=2, init_from="resume")
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
