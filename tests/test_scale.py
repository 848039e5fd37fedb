"""The scale path on the CPU: DDP (gloo) through --nproc and through torchrun, the gpt2-125m
preset's shape, bf16 autocast, a GradScaler, and torch.compile."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from machinery import cli as configurator, safe
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



def ddp(*args, nproc=2, **kw):
    """`python orpo.py --nproc=N ...`: the script starts its own workers."""
    return subprocess.run([sys.executable, "orpo.py", f"--nproc={nproc}", *args], cwd=ROOT,
                          env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True,
                          text=True, timeout=300, **kw)


def test_ddp_resume_with_dropout_is_bit_exact_and_other_process_counts_say_so(tmp_path, data_dir):
    """Dropout draws from each process's own RNG: every process's state is saved and
    restored, so a 2-process run stopped and resumed logs what the uninterrupted run logs.
    Resumed on 1 or 3 processes, the batches are the same, the masks are not, and a line
    says so."""
    kw = ["--config=tiny", f"--data_dir={data_dir}", "--grad_accum=6", "--batch_size=4",
          "--dropout=0.1", "--lr_decay_iters=6", "--eval_interval=3", "--n_samples=2",
          "--eval_pairs=8"]
    for args in ([f"--out_dir={tmp_path / 'whole'}", "--max_iters=6"],
                 [f"--out_dir={tmp_path / 'cut'}", "--max_iters=3"],
                 [f"--out_dir={tmp_path / 'cut'}", "--max_iters=6", "--init_from=resume"]):
        r = ddp(*kw, *args)
        assert r.returncode == 0 and "note:" not in r.stdout, r.stderr
    read = lambda d: [json.loads(l) for l in open(tmp_path / d / "log.jsonl")]
    assert_same_losses(losses(read("whole")), losses(read("cut")))  # bit for bit
    for n in (1, 3):
        shutil.copytree(tmp_path / "cut", tmp_path / f"on{n}")
        r = ddp(*kw, f"--out_dir={tmp_path / f'on{n}'}", "--max_iters=7", "--init_from=resume", nproc=n)
        assert r.returncode == 0, r.stderr
        assert f"note: 2 process(es) wrote it, {n} go on: the same batches, but the dropout " \
               "masks differ" in r.stdout


def test_ddp_errors_are_one_line_said_once_and_a_dead_worker_stops_the_rest(tmp_path, data_dir):
    """Errors under --nproc are said once, by one process, in one line, with no launcher
    traceback; a worker that dies stops the others within seconds; no worker is left."""
    kw = ["--config=tiny", f"--data_dir={data_dir}", "--n_samples=2", "--eval_pairs=8"]
    r = ddp(*kw, "--grad_accum=3", f"--out_dir={tmp_path / 'a'}")
    assert r.returncode == 2 and r.stderr == "error: --grad_accum=3 must be a multiple of the 2 " \
                                             "processes\n", r.stderr
    with safe.lock(str(tmp_path / "held")):  # another run holds the folder
        r = ddp(*kw, "--grad_accum=2", f"--out_dir={tmp_path / 'held'}")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "is in use by pid" in r.stderr, r.stderr
    p = subprocess.Popen([sys.executable, "orpo.py", "--nproc=2", *kw, "--grad_accum=2",
                          "--max_iters=100000", f"--out_dir={tmp_path / 'b'}"], cwd=ROOT,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in p.stdout:  # training has begun
        if line.startswith("iter"):
            break
    kids = [int(c) for c in open(f"/proc/{p.pid}/task/{p.pid}/children").read().split()]
    os.kill(kids[1], signal.SIGKILL)  # a worker dies
    t0 = time.time()
    _, err = p.communicate(timeout=60)
    assert p.returncode != 0 and time.time() - t0 < 30 and "Traceback" not in err, err
    assert not any(os.path.exists(f"/proc/{k}") for k in kids)  # none left running


def test_ctrl_c_under_ddp_is_one_line_from_the_first_worker(tmp_path, data_dir):
    """The terminal sends SIGINT to the whole foreground group: the launcher and its workers."""
    p = subprocess.Popen([sys.executable, "orpo.py", "--nproc=2", "--config=tiny", f"--data_dir={data_dir}",
                          "--grad_accum=2", "--max_iters=100000", "--eval_interval=5",
                          f"--out_dir={tmp_path}"], cwd=ROOT, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, start_new_session=True,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    for line in p.stdout:
        if line.startswith("eval    10"):  # the checkpoint at 5 is written
            break
    os.killpg(p.pid, signal.SIGINT)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 130 and err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith("error: interrupted; ") and "holds iteration" in err, err


DDP_EXIT = """
import os, sys, torch
from machinery import procs
from types import SimpleNamespace
rank, world, dev = procs.start(SimpleNamespace(nproc=1, device="cpu", grad_accum=2))
m = procs.wrap(torch.nn.Linear(4, 1), world, dev, "cpu")
m(torch.randn(3, 4)).sum().backward()
procs.rng_states(world, "cpu")
del m  # as orpo.train lets go of its model
procs.stop(world)
left = [open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task")]
assert not [t for t in left if "gloo" in t], left
"""


def test_ddp_exits_clean_twenty_times_beside_a_busy_process(tmp_path):
    """The abort at exit ('terminate called without an active exception'): gloo's threads
    were torn down as Python exited, the group kept alive by defaults that modules imported
    after init hold. Now none is left at exit, and 20 two-process runs beside a CPU-bound
    process end cleanly."""
    (tmp_path / "ddp_exit.py").write_text(DDP_EXIT)
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        for i in range(20):  # two workers, as --nproc starts them (torchrun's agent: more time)
            env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT, WORLD_SIZE="2",
                       MASTER_ADDR="127.0.0.1", MASTER_PORT=str(29500 + os.getpid() % 5000 + i))
            ranks = [subprocess.Popen([sys.executable, str(tmp_path / "ddp_exit.py")], cwd=ROOT,
                                      env=dict(env, RANK=str(r), LOCAL_RANK=str(r)), text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE) for r in (0, 1)]
            for p in ranks:
                _, err = p.communicate(timeout=120)
                assert p.returncode == 0 and "terminate called" not in err, err
    finally:
        hog.kill()



def test_ddp_on_data_not_yet_prepared_prepares_it_once(tmp_path):
    """The first process prepares data/synthetic while the others wait for it (each taking
    the data folder's lock at once would stop the second)."""
    r = subprocess.run([sys.executable, os.path.join(ROOT, "orpo.py"), "--nproc=2", "--config=tiny",
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
