"""The sibling scripts as a user runs them: sample.py (experiments/: tests/test_experiments.py)."""
import json
import os

import pytest
import torch

from conftest import ROOT, cli, run
from machinery import checkpoint, gpt2


def test_sample_from_a_checkpoint_for_a_typed_prompt(tmp_path, data_dir):
    run(tmp_path, data_dir, max_iters=2, eval_interval=2)
    r = cli("sample.py", f"--out_dir={tmp_path}", "--prompt=user: 3 more like cat and dog\\nassistant:",
            "--n_samples=2", "--max_new_tokens=4")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 2 and all(l.startswith("'user: 3 more like cat and dog\\nassistant:' ->")
                                   for l in lines)
    assert "judge" in lines[0]


def test_sample_errors(tmp_path):
    r = cli("sample.py", f"--out_dir={tmp_path}", "--prompt=")
    assert r.returncode == 2 and "give --prompt=TEXT" in r.stderr  # no training started
    r = cli("sample.py", f"--out_dir={tmp_path / 'none'}", "--prompt=hi")
    assert r.returncode == 2 and "no checkpoint at" in r.stderr
    r = cli("sample.py", "--temperature=-1", "--prompt=hi")
    assert r.returncode == 2 and "--temperature must be a number >= 0" in r.stderr
    assert not os.listdir(tmp_path)


def test_export_then_load_gives_the_same_logits(tmp_path, data_dir):
    run(tmp_path, data_dir, max_iters=2, eval_interval=2)
    r = cli("sample.py", f"--out_dir={tmp_path}", f"--export={tmp_path / 'hf'}")
    assert r.returncode == 0, r.stderr
    assert "not GPT-2's" in r.stdout  # the synthetic task's tokenizer, said plainly
    ck = checkpoint.load_checkpoint(str(tmp_path / "ckpt.pt"))
    mine = checkpoint.model_from_checkpoint(ck, "ckpt").eval()
    back = gpt2.from_pretrained(str(tmp_path / "hf"), block_size=mine.cfg.block_size).eval()
    cfg = json.load(open(tmp_path / "hf" / "config.json"))
    assert cfg["vocab_size"] == ck["meta"]["vocab_size"] == 546  # cut back to the tokenizer's
    x = torch.randint(0, 546, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(back(x), mine(x), rtol=0, atol=1e-6)


def test_the_code_reads_forward_and_fits_on_a_screen():
    """Every file reads top to bottom: a top-level name is used only below its definition
    (main() excepted), and no function is over 60 lines; the reference and the machinery
    never import the course or the experiments."""
    import ast
    py = lambda d: [os.path.join(d, f) for f in os.listdir(os.path.join(ROOT, d)) if f.endswith(".py")]
    machinery = py("machinery")
    core = [f for f in os.listdir(ROOT) if f.endswith(".py")] + machinery  # the reference
    for name in sorted(core + py("course") + py("experiments") + py("tests")):
        tree = ast.parse(open(os.path.join(ROOT, name)).read())
        defined = {}
        for node in tree.body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                defined.setdefault(node.name, node.lineno)
            elif isinstance(node, ast.Assign):
                for t in node.targets:
                    defined.setdefault(getattr(t, "id", None), node.lineno)
        for node in tree.body:
            for n in ast.walk(node):
                if isinstance(n, ast.Name) and n.id != "main" and defined.get(n.id, 0) > node.lineno:
                    pytest.fail(f"{name}:{n.lineno} uses {n.id}, defined further down")
                if isinstance(n, ast.FunctionDef):
                    assert n.end_lineno - n.lineno < 60, f"{name}: {n.name} is over 60 lines"
                if isinstance(n, (ast.Import, ast.ImportFrom)) and name in core:
                    mods = [a.name for a in n.names] if isinstance(n, ast.Import) else [n.module]
                    assert not {m.split(".")[0] for m in mods} & {"course", "experiments"}, \
                        f"{name} imports {mods}: the reference never imports the course or the experiments"
