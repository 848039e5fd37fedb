import json
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
SHARED = os.path.join(os.path.dirname(ROOT), "shared", "data")

import orpo  # noqa: E402
import prepare_data  # noqa: E402

torch.set_num_threads(2)  # CI has 2 cores; fixed threads also fix float summation order


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """A small synthetic dataset, prepared once per test session."""
    d = str(tmp_path_factory.mktemp("data"))
    prepare_data.prepare("synthetic", d, n_train=2000, n_val=100)
    return d


def run(out_dir, data_dir, preset="tiny", **overrides):
    """Train in-process with a preset and overrides; return the log.jsonl records."""
    cfg = orpo.Config(**orpo.PRESETS[preset])
    cfg.out_dir, cfg.data_dir = str(out_dir), data_dir
    for k, v in overrides.items():
        assert hasattr(cfg, k), k
        setattr(cfg, k, v)
    orpo.train(cfg, preset)
    with open(os.path.join(str(out_dir), "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def losses(records):
    return [(r["iter"], r["loss"], r["sft"], r["orl"]) for r in records if r["kind"] == "train"]
