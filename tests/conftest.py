import json
import os
import subprocess
import sys

import pytest

# CI has 2 cores. Fixed threads fix float summation order, in this process and in the runs
# it starts; set before torch loads, so that machinery.boot never picks them by the load.
os.environ.setdefault("OMP_NUM_THREADS", "2")
import torch  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
SHARED = os.path.join(os.path.dirname(ROOT), "shared", "data")

import orpo  # noqa: E402
import prepare_data  # noqa: E402

torch.set_num_threads(2)  # CI has 2 cores; fixed threads also fix float summation order


@pytest.fixture(scope="session", autouse=True)
def caches_in_tmp(tmp_path_factory):
    """Every file a test writes stays under pytest's tmp_path: datasets and the hub cache
    too (subprocesses inherit the environment)."""
    d = str(tmp_path_factory.mktemp("hf"))
    old = {k: os.environ.get(k) for k in ("HF_HOME", "HF_DATASETS_CACHE")}
    os.environ.update(HF_HOME=d, HF_DATASETS_CACHE=os.path.join(d, "datasets"))
    yield
    for k, v in old.items():
        os.environ.pop(k) if v is None else os.environ.update({k: v})


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """A small synthetic dataset, prepared once per test session."""
    d = str(tmp_path_factory.mktemp("data"))
    prepare_data.prepare("synthetic", d, n_train=2000, n_val=100)
    return d


@pytest.fixture(scope="session")
def gpt2(tmp_path_factory):
    """tiktoken's gpt2 encoding, offline, from the BPE files in ../shared/data; the CLI runs a
    test starts inherit TIKTOKEN_CACHE_DIR."""
    if not os.path.exists(os.path.join(SHARED, "gpt2-bpe")):
        pytest.skip("../shared/data (GPT-2 BPE files) is absent")
    cache = str(tmp_path_factory.mktemp("tiktoken"))
    subprocess.run([sys.executable, os.path.join(SHARED, "seed_tiktoken_cache.py"), cache], check=True)
    os.environ["TIKTOKEN_CACHE_DIR"] = cache
    return prepare_data.get_encoding("gpt2")


def cli(script, *args, cwd=ROOT, env=None, timeout=300):
    """Run one of the project's scripts (orpo.py, sample.py, ...) as a user would."""
    return subprocess.run([sys.executable, os.path.join(ROOT, script), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def read_log(out_dir):
    with open(os.path.join(str(out_dir), "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def run(out_dir, data_dir, preset="tiny", **overrides):
    """Train in-process with a preset and overrides; return the log.jsonl records."""
    cfg = orpo.Config(**orpo.PRESETS[preset])
    cfg.out_dir, cfg.data_dir = str(out_dir), data_dir
    for k, v in overrides.items():
        assert hasattr(cfg, k), k
        setattr(cfg, k, v)
    orpo.train(cfg, preset)
    return read_log(out_dir)


def losses(records):
    """(iter, loss, L_SFT, L_OR) of each train record."""
    return [(r["iter"], r["loss"], r["l_sft"], r["l_or"]) for r in records if r["kind"] == "train"]


def assert_same_losses(a, b, rtol=0.0):
    """Two runs' loss logs agree, iteration by iteration: exactly, or to rtol."""
    assert len(a) == len(b) and [x[0] for x in a] == [y[0] for y in b], (a, b)
    for x, y in zip(a, b):
        for u, v in zip(x[1:], y[1:]):
            assert abs(u - v) <= rtol * max(1.0, abs(u)), (x, y)
