"""The documents cannot drift from the code: every function, class and option that the README,
GRADIENT.md, course/EXERCISES.md and course/TEACHING.md name exists under that name, and the
README's reading path gives each definition's true length."""
import ast
import builtins
import os
import re
import subprocess
import sys

import pytest

from conftest import ROOT

DOCS = ("README.md", "GRADIENT.md", "course/EXERCISES.md", "course/TEACHING.md")
SCRIPTS = (["orpo.py"], ["sample.py"], ["prepare_data.py"], ["-m", "experiments.figures"],
           ["-m", "experiments.bench"], ["-m", "experiments.plot"])
MODULES = ("orpo|model|prepare_data|sample|report|checkpoint|safe|cli|procs|boot|gpt2|synthetic|"
           "readers|figures|bench|plot|assignment")
FOREIGN = {"P", "exp", "log", "log1p", "expm1", "softmax", "sigma", "sigmoid", "odds", "h", "delta",
           "from_pretrained", "load_dataset", "GPT2LMHeadModel", "onehot", "torch", "E", "safetensors"}  # math, others'
OTHERS = {"--index-url", "--standalone", "--nproc_per_node", "--help", "--config", "--durations",
          "--no-deps", "--upgrade"}  # pip's, torchrun's, pytest's and every script's own


def python_files():
    out = subprocess.run(["git", "ls-files", "*.py"], cwd=ROOT, capture_output=True, text=True)
    return [f for f in out.stdout.split() if os.path.exists(os.path.join(ROOT, f))]


def defined():
    """Every name the project's Python defines: functions, classes, methods, top-level names."""
    names = set()
    for f in python_files():
        for n in ast.walk(ast.parse(open(os.path.join(ROOT, f)).read())):
            if isinstance(n, (ast.FunctionDef, ast.ClassDef)):
                names.add(n.name)
            elif isinstance(n, ast.Assign):
                names |= {t.id for t in n.targets if isinstance(t, ast.Name)}
            elif isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name):
                names.add(n.target.id)  # a dataclass field
    return names


def options():
    """Every option a script's --help lists."""
    opts = set(OTHERS)
    for cmd in SCRIPTS:
        r = subprocess.run([sys.executable, *cmd, "--help"], cwd=ROOT, capture_output=True,
                           text=True, timeout=120)
        assert r.returncode == 0, (cmd, r.stderr)
        opts |= set(re.findall(r"(--[a-z][a-z0-9_-]*)", r.stdout))
    return opts


def code_spans(text):
    """The text inside backticks and fenced code blocks."""
    blocks = re.findall(r"```[a-z]*\n(.*?)```", text, re.S)
    return blocks + re.findall(r"`([^`\n]+)`", re.sub(r"```.*?```", "", text, flags=re.S))


@pytest.mark.parametrize("doc", DOCS)
def test_every_name_and_option_a_document_gives_exists(doc):
    with open(os.path.join(ROOT, doc)) as f:
        spans = code_spans(f.read())
    names, opts = defined(), options()
    called = {m for s in spans for m in re.findall(r"(?<![\w.])([A-Za-z_][A-Za-z0-9_]*)\(", s)}
    dotted = {m for s in spans for m in re.findall(
        rf"(?<![\w/.-])(?:{MODULES})\.([A-Za-z_][A-Za-z0-9_]*)(?![\w.-]*\.(?:gz|json|bin))", s)}
    missing = sorted((called - FOREIGN - set(dir(builtins)) | dotted - FOREIGN) - names)
    assert not missing, f"{doc} names what the code does not define: {missing}"
    flags = {o for s in spans for o in re.findall(r"(?<![\w-])(--[a-z][a-z0-9_-]*)", s)}
    assert not flags - opts, f"{doc} gives options no script takes: {sorted(flags - opts)}"


def test_the_readme_reading_path_counts_lines_as_the_code_has_them():
    """Each `name` (N) in the README's reading path is N lines long in orpo.py or model.py."""
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    path = text[text.index("**A reading path"):text.index("## ORPO in a page")]
    lengths = {}
    for f in ("orpo.py", "model.py"):
        for n in ast.parse(open(os.path.join(ROOT, f)).read()).body:
            if isinstance(n, (ast.FunctionDef, ast.ClassDef)):
                lengths[n.name] = n.end_lineno - n.lineno + 1
    said = [(n, k) for n, k in re.findall(r"`([A-Za-z_][A-Za-z0-9_]*)` \((\d+)", path)
            if n != "generate"]
    assert len(said) >= 15
    wrong = [(n, int(k), lengths.get(n)) for n, k in said if lengths.get(n) != int(k)]
    assert not wrong, f"README's reading path: (name, said, true) {wrong}"
