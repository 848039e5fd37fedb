"""The graded assignment: a student copy of this project (the handout) cut from orpo.py, and
an autograder that checks a copy against frozen reference values. TEACHING.md says how to
use both in a class.

    python assignment.py make DIR    # write the handout to DIR (a new or empty folder)
    python assignment.py grade DIR   # grade the copy in DIR: a table, and DIR/results.json
    python assignment.py freeze      # recompute tests/assignment_ref.json from orpo.py

The handout is orpo.py with the bodies of the graded functions replaced by
`raise NotImplementedError("exercise N: ...")` (signature, docstring and the paper's equation
tags kept), without the worked solutions, and with a README of its own for the student
(teacher/handout-README.md). The grader reads only the student's orpo.py
(and answers.txt), runs each graded function alone on the frozen inputs, with every other
graded function it calls replaced by a stand-in that returns the frozen values, so that one
wrong or missing function costs its own points only. It never calls this project's solution:
`freeze` does, once, to write the reference file, and a test checks that file against it.
"""
from machinery import boot  # first: it sets what torch reads as it loads
import ast
import hashlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time

from machinery.safe import atomic_write, die, one_line

ROOT = os.path.dirname(os.path.abspath(__file__))
REF = os.path.join(ROOT, "tests", "assignment_ref.json")

# ----------------------------------------------------------------------------------------
# What is graded: one row per check, (id, exercise, what, points); 100 points in all

ROWS = [
    ("1a", 1, "odds ratio by hand (answers.txt)", 5),
    ("1b", 1, "odds_ratio_loss: Eqs. 4, 5, 7", 10),
    ("1c", 1, "orpo_loss and prob_ratio_loss: Eq. 6", 10),
    ("2", 2, "log1mexp: stable in float64 and float32", 10),
    ("3a", 3, "masks by hand (answers.txt)", 5),
    ("3b", 3, "make_batch: x, y and the masks", 10),
    ("3c", 3, "response_logps: Eq. 3, mean and sum", 10),
    ("4a", 4, "orpo_grad: dL/dl_w, dL/dl_l", 10),
    ("4b", 4, "HandORPO.backward: down to the logits", 10),
    ("10a", 10, "simpo_loss", 5),
    ("10b", 10, "simpo_objective", 5),
    ("11", 11, "dpo_loss", 10),
]

# The holes: function (or Class.method) -> the message its NotImplementedError carries
HOLES = {
    "log1mexp": "exercise 2: log(1 - e^x) for x < 0, stable near 0 and far from it",
    "response_logps": "exercise 3: place tok at `scored`, then Eq. 3's mean (or sum) over resp_mask",
    "odds_ratio_loss": "exercise 1: L_OR per pair and log OR, from the log odds (Eqs. 4, 5, 7)",
    "orpo_loss": "exercise 1: Eq. 6 and its parts (pair_means)",
    "prob_ratio_loss": "exercise 1: Eq. 6 with the probability ratio for the odds ratio",
    "simpo_loss": "exercise 10: SimPO's loss per pair",
    "simpo_objective": "exercise 10: SimPO's loss alone, averaged over the pairs, and its parts",
    "dpo_loss": "exercise 11: DPO's loss, averaged over the pairs",
    "orpo_grad": "exercise 4: dL/dl_w and dL/dl_l from your derivation",
    "HandORPO.backward": "exercise 4: the gradient of the loss with respect to the logits",
}
MASKS = ("resp_mask", "seq_mask")  # make_batch's lines that set these are exercise 3's hole
MASK_HOLE = "exercise 3: set resp_mask and seq_mask for row i"
TAG = re.compile(r"#.*\b(Eqs?|Sec)\. ?\d")  # comments that cite the paper stay
# Left out of the handout: worked solutions, the answer key, the grader's own tests
LEAVE_OUT = ("GRADIENT.md", "TEACHING.md", "teacher/", "tests/test_assignment.py")
STUDENT_README = os.path.join(ROOT, "teacher", "handout-README.md")  # the handout's README.md
LINK = re.compile(r"\[([^\]]+)\]\(([^)#\s]+)[^)]*\)")  # a Markdown link: [text](target#part)
DROP_TESTS = {"tests/test_loss.py": ("test_loss_matches_the_paper_by_hand",  # spell answers out
                                     "test_probability_ratio_and_summed_logp",
                                     "test_dpo_loss_by_hand",
                                     "test_dpo_gradient_agrees_with_finite_differences"),
              "tests/test_train.py": ("test_dpo_trains_the_policy_and_never_touches_the_reference",),
              "tests/test_scale.py": ("test_gpt2_125m_from_a_hugging_face_directory_reports_the_true_l_sft",)}
HOLES_LEFT = '''\
def holes_left(cfg):
    """Stop, with one line naming the first, if a run of cfg would reach a hole: exercises
    1-3 are in every run, 4 in --hand_grad's, 10 in --ratio=simpo's, 11 in --loss=dpo's."""
    with open(__file__) as f:  # a hole's line: raise NotImplementedError('exercise N: ...')
        left = [l.strip()[27:-2] for l in f if l.strip().startswith("raise NotImplementedError(")]
    number = lambda m: int(m.split()[1][:-1])
    flag = {4: cfg.hand_grad, 10: cfg.ratio == "simpo", 11: cfg.loss == "dpo"}
    left = [m for m in left if flag.get(number(m), True)]
    if left:
        die(f"fill the holes first, from {min(left, key=number)}; "
            "`python assignment.py grade .` checks them")
'''
ANSWERS = """\
# Exercises 1 and 3, answered by hand: fill in each value after the `=`.
# Exercise 1: P_w = 0.6, P_l = 0.3. Numbers to at least three significant digits.
odds_w =
odds_l =
odds_ratio =
log_or =
l_or =
delta =
prob_ratio =
# Exercise 3: prompt `a b c`, response `d e <eot>`. Tokens separated by spaces; masks as
# 0s and 1s, one per position of x.
x =
y =
resp_mask =
seq_mask =
"""

# ----------------------------------------------------------------------------------------
# The handout: holes cut into orpo.py with ast, so that the cut follows the code wherever
# the functions sit


def find(tree, qualname):
    """The def node of a top-level function, or of Class.method."""
    *cls, name = qualname.split(".")
    body = tree.body
    if cls:
        body = next((n.body for n in body if isinstance(n, ast.ClassDef) and n.name == cls[0]), [])
    return next((n for n in body if isinstance(n, ast.FunctionDef) and n.name == name), None)


def hole_edits(src, tree):
    """(first line, last line, new lines) of each hole, 1-based and inclusive."""
    lines, edits = src.splitlines(), []
    for qualname, msg in HOLES.items():
        node = find(tree, qualname)
        if node is None:
            die(f"orpo.py has no {qualname}: the handout cannot be cut")
        doc = ast.get_docstring(node) is not None  # kept; what follows it goes, comments too
        a, b = (node.body[0].end_lineno + 1 if doc else node.body[0].lineno), node.end_lineno
        pad = " " * node.body[0].col_offset
        tags = [pad + l[l.index("#"):] for l in lines[a - 1:b] if TAG.search(l)]
        edits.append((a, b, tags + [f"{pad}raise NotImplementedError({msg!r})"]))
        if qualname == "orpo_grad":  # the derivation: the comment block right above the def
            end = node.lineno - 1  # (blank lines between it and the def kept)
            while end > 0 and not lines[end - 1].strip():
                end -= 1
            top = end
            while top > 0 and lines[top - 1].lstrip().startswith("#"):
                top -= 1
            if top < end:  # a section's rule stays
                rule = [lines[top]] if lines[top].startswith("# ---") else []
                edits.append((top + 1, end, rule + ["# The gradient by hand: exercise 4."]))
    sets = [n for n in ast.walk(find(tree, "make_batch")) if isinstance(n, ast.Assign) and any(
        isinstance(t, ast.Subscript) and getattr(t.value, "id", "") in MASKS for t in n.targets)]
    if len(sets) != len(MASKS):
        die(f"make_batch does not set {' and '.join(MASKS)} one line each: the handout cannot be cut")
    pad = " " * sets[0].col_offset
    edits.append((sets[0].lineno, sets[0].end_lineno, [f"{pad}raise NotImplementedError({MASK_HOLE!r})"]))
    edits += [(n.lineno, n.end_lineno, []) for n in sets[1:]]
    train = find(tree, "train")  # a run that would reach a hole: one line, before any work
    edits.append((train.lineno, train.lineno - 1, HOLES_LEFT.splitlines() + [""]))
    first = train.body[1]  # after the docstring
    edits.append((first.lineno, first.lineno - 1,
                  [" " * first.col_offset + "holes_left(cfg)  # the handout's holes: one line"]))
    return edits


def cut(src):
    """orpo.py's source -> the handout's."""
    lines = src.splitlines()
    for a, b, new in sorted(hole_edits(src, ast.parse(src)), reverse=True):
        lines[a - 1:b] = new
    out = "\n".join(lines) + "\n"
    ast.parse(out)  # still Python
    return out


def drop_tests(src, names):
    """A test file without the named test functions (and the blank lines before each)."""
    lines = src.splitlines()
    for node in sorted((n for n in ast.parse(src).body if getattr(n, "name", "") in names),
                       key=lambda n: -n.lineno):
        a = min([n.lineno for n in node.decorator_list] + [node.lineno]) - 1
        while a > 0 and not lines[a - 1].strip():
            a -= 1
        del lines[a:node.end_lineno]
    return "\n".join(lines) + "\n"


def project_files():
    """The project's tracked files (git ls-files), or, outside a git checkout, every file
    but the hidden, the ignored and the generated ones."""
    r = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True)
    if r.returncode == 0 and r.stdout.strip():
        return [f for f in r.stdout.splitlines() if os.path.isfile(os.path.join(ROOT, f))]
    files = []
    for d, dirs, names in os.walk(ROOT):
        dirs[:] = [x for x in dirs if not x.startswith((".", "out", "data", "__pycache__"))]
        files += [os.path.relpath(os.path.join(d, f), ROOT) for f in names if not f.endswith(".pyc")]
    return files


def left_out(name):
    return any(name == x or name.startswith(x) for x in LEAVE_OUT)


def unlink(md):
    """Markdown whose links to the files a handout leaves out are text, saying so."""
    return LINK.sub(lambda m: f"{m[1]} (not in the handout)" if left_out(m[2]) else m[0], md)


def write_files(dst, handout):
    """The project's files into dst, the handout's own (cut) ones instead of theirs; how many."""
    n = 0
    for name in project_files():
        if left_out(name) or name in handout:
            continue
        os.makedirs(os.path.dirname(os.path.join(dst, name)), exist_ok=True)
        shutil.copy2(os.path.join(ROOT, name), os.path.join(dst, name))
        n += 1
    for name, text in handout.items():
        os.makedirs(os.path.dirname(os.path.join(dst, name)), exist_ok=True)
        with open(os.path.join(dst, name), "w") as f:
            f.write(text)
    return n + len(handout)


def make(dst):
    """Write the handout to dst; the solution here is not touched."""
    if os.path.exists(dst) and os.listdir(dst):
        die(f"{dst} is not empty: make writes the handout into a new or empty folder")
    if not os.path.isfile(STUDENT_README):  # a handout has no teacher/: cut from the solution
        die(f"{STUDENT_README} is missing: make a handout from the full project, not from a handout")
    with open(os.path.join(ROOT, "orpo.py")) as f:
        handout = {"orpo.py": cut(f.read()), "answers.txt": ANSWERS}
    for name in project_files():  # the Markdown files, their links to what is left out unlinked
        if name.endswith(".md") and not left_out(name):
            with open(os.path.join(ROOT, name)) as f:
                handout[name] = unlink(f.read())
    with open(STUDENT_README) as f:
        handout["README.md"] = unlink(f.read())  # the student's, for the project's
    for name, tests in DROP_TESTS.items():
        with open(os.path.join(ROOT, name)) as f:
            handout[name] = drop_tests(f.read(), tests)
    tmp = os.path.abspath(dst) + ".tmp"  # beside dst, then renamed: whole or not at all
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        n = write_files(tmp, handout)
        if os.path.isdir(dst):
            os.rmdir(dst)  # empty, as checked
        os.rename(tmp, dst)
    except (OSError, KeyboardInterrupt) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        why = "interrupted" if isinstance(e, KeyboardInterrupt) else one_line(e)
        die(f"could not write the handout to {dst}: {why}; nothing was left there",
            130 if isinstance(e, KeyboardInterrupt) else 2)
    print(f"wrote the handout to {dst}: {n} files, {len(HOLES) + 1} holes in "
          f"orpo.py; grade it with `python assignment.py grade {dst}`")

# ----------------------------------------------------------------------------------------
# Grading, inside a worker process: the student's graded functions, run one at a time


class Frozen(Exception):
    """A stand-in was called at an input the reference file does not hold."""


def standins(torch, refs):
    """The graded functions as the other graded functions see them while graded: each
    returns the frozen reference values at the frozen inputs, and refuses any other input."""
    s = refs["standins"]
    t1 = {x: y for x, y in s["log1mexp"]}
    t2 = {(w, l): (a, b) for w, l, a, b in s["odds_ratio_loss"]}
    t3 = {(w, l): a for w, l, a in s["simpo_loss"]}
    t4 = {(tuple(c["ell_w"]), tuple(c["ell_l"]), c["lam"]): (c["g_w"], c["g_l"])
          for c in refs["rows"]["4a"]}  # orpo_grad's own cases

    def look(table, key, name):
        if key not in table:
            raise Frozen(f"{name} was called at {key}, not at an input the reference holds: "
                         f"pass it l_w, l_l (or l) as they are")
        return table[key]

    def vals(t):
        return t.detach().double().flatten().tolist()

    def log1mexp(x):
        return torch.tensor([look(t1, v, "log1mexp") for v in vals(x)], dtype=x.dtype).view_as(x)

    def odds_ratio_loss(ell_w, ell_l):
        out = [look(t2, k, "odds_ratio_loss") for k in zip(vals(ell_w), vals(ell_l))]
        return tuple(torch.tensor(o, dtype=ell_w.dtype) for o in zip(*out))

    def simpo_loss(ell_w, ell_l, *, beta=2.0, gamma=1.0):
        if (beta, gamma) != (2.0, 1.0):
            raise Frozen("simpo_loss was called with beta, gamma other than its defaults 2, 1")
        return torch.tensor([look(t3, k, "simpo_loss") for k in zip(vals(ell_w), vals(ell_l))],
                            dtype=ell_w.dtype)

    def orpo_grad(ell_w, ell_l, lam):
        g = look(t4, (tuple(vals(ell_w)), tuple(vals(ell_l)), float(lam)), "orpo_grad")
        return tuple(torch.tensor(v, dtype=ell_w.dtype) for v in g)
    return dict(log1mexp=log1mexp, odds_ratio_loss=odds_ratio_loss, simpo_loss=simpo_loss,
                orpo_grad=orpo_grad)


def loader(path, refs):
    """A function that returns one graded function of the student's orpo.py, executed alone:
    with torch, numpy and math, the data's column numbers, the student's own helpers and
    imports, and stand-ins for the other graded functions; no other code of the copy runs."""
    import numpy as np
    import torch
    import torch.nn.functional as F
    with open(path) as f:
        src = f.read()
    tree = ast.parse(src)
    top = {n.name: n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
    graded = {q.split(".")[0] for q in HOLES} | {"make_batch"}
    project = {"model", "prepare_data", "machinery", "orpo"}

    def load(qualname):
        ns = dict(torch=torch, F=F, np=np, math=math, **refs["columns"])
        for n in tree.body:  # the student's imports, but not of the project's other files
            if isinstance(n, (ast.Import, ast.ImportFrom)) and not {
                    (getattr(n, "module", None) or a.name).split(".")[0] for a in n.names} & project:
                exec(compile(ast.Module([n], []), path, "exec"), ns)
        ns.update({k: v for k, v in standins(torch, refs).items() if k != qualname.split(".")[0]})
        name, todo, done = qualname.split(".")[0], [qualname.split(".")[0]], set()
        if name not in top:
            raise Frozen(f"orpo.py has no {name}")
        while todo:  # the graded function, and the helpers of the student's it names
            n = top[todo.pop()]
            done.add(n.name)
            exec(compile(ast.Module([n], []), path, "exec"), ns)
            todo += [x.id for x in ast.walk(n) if isinstance(x, ast.Name) and x.id in top and
                     x.id not in done and x.id not in graded]
        return getattr(ns[name], qualname.split(".")[1]) if "." in qualname else ns[name]
    return load


class Fail(Exception):
    """A graded value is wrong: the message says which, where, and by how much."""


def compare(what, got, want, at="", rtol=1e-9, atol=1e-12):
    """got (a tensor) against the frozen want; a Fail names the first element that differs,
    and where: at is a text, or a function of that element's flat index that says which
    input it belongs to."""
    import torch
    want = torch.tensor(want, dtype=torch.float64)
    where = at if isinstance(at, str) else at(None)
    if not isinstance(got, torch.Tensor):
        raise Fail(f"{what}{where}: expected a tensor, got {type(got).__name__}")
    got = got.detach().double()
    if got.shape != want.shape:
        raise Fail(f"{what}{where}: expected shape {tuple(want.shape)}, got {tuple(got.shape)}")
    bad = ~(torch.isfinite(got) & ((got - want).abs() <= atol + rtol * want.abs()))
    if bad.any():
        i = int(bad.flatten().nonzero()[0])
        if isinstance(at, str) and want.dim():
            where = f" [{', '.join(str(int(v)) for v in torch.unravel_index(torch.tensor(i), want.shape))}]{at}"
        elif not isinstance(at, str):
            where = at(i)
        raise Fail(f"{what}{where}: expected {want.flatten()[i].item():.10g}, "
                   f"got {got.flatten()[i].item():.10g}")


def T(v, dtype="float64"):
    import torch
    return None if v is None else torch.tensor(v, dtype=getattr(torch, dtype))


def pairs(c, extra=""):
    """Where a per-pair value was wrong: its pair, and the batch it came in."""
    w, l, B = c["ell_w"], c["ell_l"], len(c["ell_w"])
    return lambda i: (f" in a batch of {B} pair(s){extra}" if i is None else
                      f" at pair {i} (l_w={w[i]!r}, l_l={l[i]!r}) of a batch of {B}{extra}")


def read_answers(d):
    """answers.txt of the copy (the solution keeps its key in teacher/): key -> text."""
    for path in (os.path.join(d, "answers.txt"), os.path.join(d, "teacher", "answers.txt")):
        if os.path.exists(path):
            with open(path) as f:
                return dict((k.strip(), v.strip()) for k, _, v in (
                    l.partition("=") for l in f if "=" in l and not l.lstrip().startswith("#")))
    raise Fail("no answers.txt in the copy")


def sealed(key, text):
    """An answer as the reference file keeps it: a hash of the key and its text (a number's
    three significant digits, or tokens), so that a handout, which holds the file, can check
    answers.txt without holding the answers."""
    return hashlib.sha256(f"{key} = {' '.join(text.split())}".encode()).hexdigest()[:20]


def check_answers(d, want):
    got = read_answers(d)
    for k, (kind, seal) in want.items():
        if not got.get(k):
            raise Fail(f"answers.txt: {k} is blank")
        if kind == "tokens":
            if sealed(k, got[k]) != seal:
                raise Fail(f"answers.txt: {k} = {got[k]} is not right (compare with your other rows)")
            continue
        if not re.fullmatch(r"[-+*/().0-9eE ]+", got[k]):
            raise Fail(f"answers.txt: {k} = {got[k]} is not a number")
        try:
            x = float(eval(got[k], {"__builtins__": {}}))
        except (SyntaxError, ZeroDivisionError, TypeError):
            raise Fail(f"answers.txt: {k} = {got[k]} is not a number")
        if all(sealed(k, f"{x * (1 + e):.3g}") != seal for e in (0, -2e-3, 2e-3)):  # rounded or cut
            raise Fail(f"answers.txt: {k} = {got[k]} is not right to three significant digits")


def check_odds(load, cases):
    fn = load("odds_ratio_loss")
    for c in cases:
        l_or, log_or = fn(T(c["ell_w"]), T(c["ell_l"]))
        compare("odds_ratio_loss: log OR", log_or, c["log_or"], pairs(c))
        compare("odds_ratio_loss: L_OR", l_or, c["l_or"], pairs(c))


LOSS_OF = {"odds": "orpo_loss", "prob": "prob_ratio_loss", "simpo": "simpo_objective"}  # --ratio


def check_orpo_loss(load, cases):
    """orpo_loss and its ablation prob_ratio_loss (row 1c), or simpo_objective (10b)."""
    for c in cases:
        name = LOSS_OF[c["ratio"]]
        kw = {k: c[k] for k in ("lam", "sft_on_prompt")}
        loss, parts = load(name)(T(c["logp"]), T(c["ell"]), T(c["seq"]), **kw)
        at = f" with {', '.join(f'{k}={v!r}' for k, v in kw.items())}, B={len(c['ell']) // 2}"
        compare(f"{name}: the loss", loss, c["loss"], at)
        for k, v in c["parts"].items():
            if k not in parts:
                raise Fail(f"{name}: parts has no {k!r}{at}")
            compare(f"{name}: parts[{k!r}]", parts[k], v, at)


def check_log1mexp(load, c):
    import torch
    fn = load("log1mexp")
    for x, y in zip(c["x"], c["y"]):
        compare("log1mexp", fn(T([x])), [y], f" at x={x!r} (float64)", rtol=1e-12, atol=1e-30)
    for x, y in zip(c["x32"], c["y32"]):
        v = torch.tensor([x], dtype=torch.float32, requires_grad=True)
        out = fn(v)
        compare("log1mexp", out, [y], f" at x={x!r} (float32)", rtol=1e-5, atol=1e-30)
        out.sum().backward()
        if not torch.isfinite(v.grad).all():
            raise Fail(f"log1mexp: its gradient at x={x!r} (float32) is {v.grad.item()}, not finite")


def check_masks(load, c):
    import numpy as np
    fn = load("make_batch")
    split = np.array(c["tokens"], np.uint16), np.array(c["index"], np.int64)
    for call in c["calls"]:
        got = fn(split, call["rows"], "cpu")
        for k, g in zip(("x", "y", "resp_mask", "seq_mask"), got):
            compare(f"make_batch: {k}", g, call[k], f" (row, position) for the pairs (prompt, "
                    f"chosen, rejected) {[c['rows'][r] for r in call['rows']]}", rtol=0, atol=0)


def check_response_logps(load, cases):
    fn = load("response_logps")
    for c in cases:
        scored = T(c["scored"]).bool()
        logp, ell = fn(T(c["tok"]), T(c["resp"]), scored, mean=c["mean"])
        at = f" with mean={c['mean']}, resp_mask={c['resp']}, scored={c['scored']}"
        compare("response_logps: logp", logp, c["logp"], at, rtol=1e-12)
        compare("response_logps: ell", ell, c["ell"], at, rtol=1e-12)


def check_grad(load, cases):
    fn = load("orpo_grad")
    for c in cases:
        g_w, g_l = fn(T(c["ell_w"], c["dtype"]), T(c["ell_l"], c["dtype"]), c["lam"])
        at = pairs(c, f", lam={c['lam']} ({c['dtype']})")
        tol = dict(rtol=1e-8, atol=1e-300) if c["dtype"] == "float64" else dict(rtol=1e-3, atol=1e-30)
        compare("orpo_grad: dL/dl_w", g_w, c["g_w"], at, **tol)
        compare("orpo_grad: dL/dl_l", g_l, c["g_l"], at, **tol)


def check_backward(load, cases):
    from types import SimpleNamespace
    fn = load("HandORPO.backward")
    for c in cases:
        scored = T(c["scored"]).bool()
        saved = (T(c["logits"]), T(c["y"], "int64"), T(c["resp"]), T(c["seq"]), scored, T(c["ell"]))
        ctx = SimpleNamespace(saved_tensors=saved, lam=c["lam"], sft_on_prompt=c["sft_on_prompt"])
        out = fn(ctx, T(c["g_loss"]), None, None)
        at = f" with lam={c['lam']}, sft_on_prompt={c['sft_on_prompt']}, g_loss={c['g_loss']}, " \
             f"B={len(c['ell']) // 2}, resp_mask={c['resp']}"
        compare("HandORPO.backward: the gradient of the logits", out[0], c["grad"], at, rtol=1e-10)
        if len(out) != 7 or any(g is not None for g in out[1:]):
            raise Fail("HandORPO.backward: return the logits' gradient, then None for each of "
                       "forward's 6 other inputs")


def check_simpo(load, cases):
    fn = load("simpo_loss")
    for c in cases:
        loss = fn(T(c["ell_w"]), T(c["ell_l"]), **c["kw"])
        compare("simpo_loss", loss, c["loss"], pairs(c, f", {c['kw']}" if c["kw"] else
                                                     " (beta, gamma: the defaults)"))


def check_dpo(load, cases):
    fn = load("dpo_loss")
    for c in cases:
        pi = T(c["pi"]).requires_grad_()
        loss = fn(pi, T(c["ref"]), beta=c["beta"])
        at = f" at pi={c['pi']}, ref={c['ref']}, beta={c['beta']}"
        compare("dpo_loss", loss, c["loss"], at)
        if not loss.requires_grad:
            raise Fail(f"dpo_loss: the loss has no gradient{at}")
        loss.backward()
        compare("dpo_loss: its gradient with respect to pi", pi.grad, c["grad"], at)


CHECKS = {  # row -> its check, given the copy's folder, the loader, and the row's references
    "1a": lambda d, load, ref: check_answers(d, ref),
    "1b": lambda d, load, ref: check_odds(load, ref),
    "1c": lambda d, load, ref: check_orpo_loss(load, ref),
    "2": lambda d, load, ref: check_log1mexp(load, ref),
    "3a": lambda d, load, ref: check_answers(d, ref),
    "3b": lambda d, load, ref: check_masks(load, ref),
    "3c": lambda d, load, ref: check_response_logps(load, ref),
    "4a": lambda d, load, ref: check_grad(load, ref),
    "4b": lambda d, load, ref: check_backward(load, ref),
    "10a": lambda d, load, ref: check_simpo(load, ref),
    "10b": lambda d, load, ref: check_orpo_loss(load, ref),
    "11": lambda d, load, ref: check_dpo(load, ref),
}


def grade_rows(d, ids, refs):
    """Grade the copy in d, row by row: yields (row, points scored, message)."""
    import torch
    torch.set_num_threads(1)
    points = {r[0]: r[3] for r in ROWS}
    try:
        load = loader(os.path.join(d, "orpo.py"), refs)
    except (OSError, SyntaxError, ValueError) as e:
        load = None
        why = f"orpo.py cannot be read: {one_line(e, typed=True)}"
    for i in ids:
        if load is None and i not in ("1a", "3a"):
            yield i, 0, why
            continue
        try:
            CHECKS[i](d, load, refs["rows"][i])
            yield i, points[i], ""
        except NotImplementedError as e:
            yield i, 0, f"NotImplementedError: {one_line(e, 300)}"
        except (Fail, Frozen) as e:
            yield i, 0, one_line(e, 400)
        except Exception as e:  # the student's code raised: say what and where
            import traceback
            tb = [f for f in traceback.extract_tb(e.__traceback__) if f.filename.endswith("orpo.py")]
            where = f" (orpo.py line {tb[-1].lineno}: {tb[-1].line})" if tb else ""
            yield i, 0, f"{one_line(e, 300, typed=True)}{where}"

# ----------------------------------------------------------------------------------------
# Grading, from the outside: workers that a crash or an endless loop cannot take down with
# the grader; the table, and results.json in the shape Gradescope's autograder reads

WORKER_TIMEOUT = 60  # seconds for one worker; the whole grade takes a few seconds


def run_workers(d, ref):
    """Grade every row in worker processes; a row whose worker dies or hangs scores 0, and
    a new worker grades the rows after it."""
    todo, got = [r[0] for r in ROWS], {}
    while todo:
        cmd = [sys.executable, os.path.abspath(__file__), "_worker", d, ref, *todo]
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=WORKER_TIMEOUT)
            out, err, why = p.stdout, p.stderr, f"the grader's worker stopped (exit {p.returncode})"
        except subprocess.TimeoutExpired as e:
            out, err = (e.stdout or b"").decode(), (e.stderr or b"").decode()
            why = f"no result in {WORKER_TIMEOUT} s (an endless loop?)"
        for line in out.splitlines():
            if line.startswith("@@ "):
                i, score, msg = json.loads(line[3:])
                got[i] = (score, msg)
        todo = [i for i in todo if i not in got]
        if todo:  # the first row left is the one that stopped the worker
            tail = [l for l in err.splitlines() if l.strip()][-1:]
            got[todo.pop(0)] = (0, why + (f": {one_line(tail[0])}" if tail else ""))
    return got


def report(d, got, seconds):
    tests, total = [], 0
    print(f"{'exercise':<9}{'row':<5}{'what':<42}{'points':>7}  result")
    for i, ex, what, pts in ROWS:
        score, msg = got[i]
        total += score
        print(f"{ex:<9}{i:<5}{what:<42}{f'{score}/{pts}':>7}  {'pass' if score == pts else 'FAIL'}")
        if msg:
            print(f"{'':14}{msg}")
        tests.append(dict(name=f"exercise {ex} ({i}): {what}", score=score, max_score=pts,
                          output=msg or "pass"))
    full = sum(r[3] for r in ROWS)
    print(f"total {total}/{full} ({seconds:.1f} s)")
    res = dict(score=total, tests=tests, execution_time=round(seconds, 1))
    path = os.path.join(d, "results.json")
    with atomic_write(path) as tmp, open(tmp, "w") as f:
        json.dump(res, f, indent=1)
    print(f"wrote {path}")
    return res


def grade(d, ref=REF):
    if not os.path.isfile(os.path.join(d, "orpo.py")):
        die(f"{d} has no orpo.py: give the folder of a copy made by `python assignment.py make`")
    if not os.path.isfile(ref):
        die(f"no reference values at {ref}: run `python assignment.py freeze` in the full project")
    t0 = time.time()
    return report(d, run_workers(os.path.abspath(d), ref), time.time() - t0)

# ----------------------------------------------------------------------------------------
# The reference values: computed once from the solution, in float64, and checked in

EXT = [-1e-12, -1e-6, -1e-3, -0.5, -3.0, -20.0, -200.0]  # l: P near 1 ... P near 0
TOY = [([1, 2, 3], [4, 5, 0], [4, 0]),  # a b c | d e <eot> | d <eot>: exercise 3's pair (3a)
       ([2, 1], [3, 5, 4, 0], [0]),
       ([7], [8, 9, 10, 11, 0], [12, 13, 0]),
       ([2, 2, 2, 2, 2], [3, 0], [5, 5, 5, 0])]
LETTERS = {0: "<eot>", 1: "a", 2: "b", 3: "c", 4: "d", 5: "e"}
LENGTHS = [(1, 6), (2, 4), (0, 3), (3, 6)]  # (prompt, prompt + response) per row, B = 2


def ell_pairs(torch):
    """(l_w, l_l) batches: one pair, a random batch, and every pairing of the extremes."""
    g = torch.Generator().manual_seed(0)
    rand = (-3 * torch.rand(5, generator=g, dtype=torch.float64)).tolist()
    rand_l = (-3 * torch.rand(5, generator=g, dtype=torch.float64)).tolist()
    ext = [(w, l) for w in EXT for l in EXT]
    return [([-0.7], [-1.3]), (rand, rand_l), ([w for w, _ in ext], [l for _, l in ext])]


def padded(torch, B, lengths, seed, V=7, T=6):
    """Random logits (2B, T, V), targets, and the masks of rows padded to unequal lengths."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(2 * B, T, V, generator=g, dtype=torch.float64)
    y = torch.randint(0, V, (2 * B, T), generator=g)
    resp, seq = torch.zeros(2, 2 * B, T, dtype=torch.float64)
    for i, (p, n) in enumerate(lengths):
        seq[i, :n], resp[i, p:n] = 1, 1
    return logits, y, resp, seq


def freeze_losses(orpo, torch, batches):
    """Rows 1b, 1c, 10a, 10b: the losses at the pairs, as the solution computes them."""
    t = lambda v: torch.tensor(v, dtype=torch.float64)
    odds, loss, simpo, branch = [], [], [], []
    logp, _, _, seq = padded(torch, 2, LENGTHS, 1)
    logp = torch.log_softmax(logp, -1)[..., 0] * seq
    for n, (w, l) in enumerate(batches):
        l_or, log_or = orpo.odds_ratio_loss(t(w), t(l))
        odds.append(dict(ell_w=w, ell_l=l, l_or=l_or.tolist(), log_or=log_or.tolist()))
        simpo.append(dict(ell_w=w, ell_l=l, kw={}, loss=orpo.simpo_loss(t(w), t(l)).tolist()))
        kws = [dict(lam=lam, sft_on_prompt=False, ratio="odds") for lam in (0.0, 0.1, 1.0)]
        kws += [dict(lam=1.0, sft_on_prompt=False, ratio="prob")]
        if len(w) == 2:
            kws += [dict(lam=0.3, sft_on_prompt=True, ratio="odds")]
        for kw in kws + [dict(lam=lam, sft_on_prompt=False, ratio="simpo") for lam in (0.0, 1.0, 5.0)]:
            lp, sq = (logp, seq) if len(w) == 2 else (None, None)
            fn = getattr(orpo, LOSS_OF[kw["ratio"]])
            out, parts = fn(lp, t(w + l), sq, lam=kw["lam"], sft_on_prompt=kw["sft_on_prompt"])
            case = dict(ell=w + l, logp=None if lp is None else lp.tolist(),
                        seq=None if sq is None else sq.tolist(), **kw, loss=out.item(),
                        parts={k: v.item() for k, v in parts.items()})
            if kw["ratio"] == "simpo":
                case["parts"].pop("l_sft")  # logged only; exercise 10 leaves it open
            (branch if kw["ratio"] == "simpo" else loss).append(case)
    w, l = batches[1]
    simpo.append(dict(ell_w=w, ell_l=l, kw=dict(beta=2.5, gamma=0.5),
                      loss=orpo.simpo_loss(t(w), t(l), beta=2.5, gamma=0.5).tolist()))
    return {"1b": odds, "1c": loss, "10a": simpo, "10b": branch}


def freeze_grads(orpo, torch, batches):
    """Rows 4a and 4b: the hand gradient per pair, and down to the logits."""
    grads = []
    for w, l in batches + [([w], [l]) for w in EXT for l in EXT]:
        for lam in (0.0, 0.1, 1.0):
            g_w, g_l = orpo.orpo_grad(torch.tensor(w, dtype=torch.float64),
                                      torch.tensor(l, dtype=torch.float64), lam)
            grads.append(dict(ell_w=w, ell_l=l, lam=lam, dtype="float64", g_w=g_w.tolist(),
                              g_l=g_l.tolist()))
    w32, l32 = (torch.tensor(v, dtype=torch.float32).double() for v in batches[-1])
    g_w, g_l = orpo.orpo_grad(w32, l32, 1.0)  # float32's inputs, their gradient in float64
    grads.append(dict(ell_w=w32.tolist(), ell_l=l32.tolist(), lam=1.0, dtype="float32",
                      g_w=g_w.tolist(), g_l=g_l.tolist()))
    back = []
    for B, lengths, lam, sft, g_loss in ((1, [(1, 5), (2, 4)], 1.0, False, 1.0),
                                         (2, LENGTHS, 0.0, False, 1.0), (2, LENGTHS, 1.0, False, 0.5),
                                         (1, [(1, 5), (2, 4)], 0.5, True, 1.0), (2, LENGTHS, 0.5, True, 1.0)):
        logits, y, resp, seq = padded(torch, B, lengths, B)
        need = (seq if sft else resp).bool()
        lg = logits[need].requires_grad_()
        _, ell = orpo.response_logps(orpo.logps_from_logits(lg.detach(), y[need]), resp, need)
        loss = orpo.HandORPO.apply(lg, y, resp, seq, need, lam, sft)[0]
        (grad,) = torch.autograd.grad(loss * g_loss, lg)
        back.append(dict(logits=lg.tolist(), y=y.tolist(), resp=resp.tolist(), seq=seq.tolist(),
                         scored=need.int().tolist(), ell=ell.tolist(), lam=lam, sft_on_prompt=sft,
                         g_loss=g_loss, grad=grad.tolist()))
        g_w, g_l = orpo.orpo_grad(ell[:B], ell[B:], lam)
        grads.append(dict(ell_w=ell[:B].tolist(), ell_l=ell[B:].tolist(), lam=lam, dtype="float64",
                          g_w=g_w.tolist(), g_l=g_l.tolist()))
    return {"4a": grads, "4b": back}


def freeze_rest(orpo, torch):
    """Rows 1a, 2, 3a, 3b, 3c and 11."""
    import numpy as np
    x = [-1e-12, -1e-8, -1e-6, -1e-3, -0.1, -0.6931, -0.6932, -1.0, -5.0, -20.0, -200.0, -1e4]
    x32 = torch.tensor(x, dtype=torch.float32).double()
    log1mexp = dict(x=x, y=orpo.log1mexp(torch.tensor(x, dtype=torch.float64)).tolist(),
                    x32=x32.tolist(), y32=orpo.log1mexp(x32).tolist())
    tokens, index = [], []
    for p, c, r in TOY:
        index.append((len(tokens), len(p), len(c), len(r)))
        tokens += p + c + r
    split = np.array(tokens, np.uint16), np.array(index, np.int64)
    calls = []
    for rows in ([1], [1, 2, 3], [3, 1]):  # not exercise 3's pair: its masks are 3a's answer
        got = orpo.make_batch(split, rows, "cpu")
        calls.append(dict(zip(("x", "y", "resp_mask", "seq_mask"), (t.tolist() for t in got)), rows=rows))
    x0, y0, resp0, seq0 = (t[0].tolist() for t in orpo.make_batch(split, [0], "cpu"))
    by_hand = dict(x=" ".join(LETTERS[v] for v in x0), y=" ".join(LETTERS[v] for v in y0),
                   resp_mask=" ".join(str(int(v)) for v in resp0),
                   seq_mask=" ".join(str(int(v)) for v in seq0))
    by_hand = {k: ["tokens", sealed(k, v)] for k, v in by_hand.items()}
    logps = []
    for B, lengths, sft, mean in ((1, [(1, 5), (2, 4)], False, True), (2, LENGTHS, False, True),
                                  (2, LENGTHS, False, False), (2, LENGTHS, True, True)):
        logits, y, resp, seq = padded(torch, B, lengths, 10 + B)
        need = (seq if sft else resp).bool()
        tok = orpo.logps_from_logits(logits[need], y[need])
        logp, ell = orpo.response_logps(tok, resp, need, mean=mean)
        logps.append(dict(tok=tok.tolist(), resp=resp.tolist(), scored=need.int().tolist(),
                          mean=mean, logp=logp.tolist(), ell=ell.tolist()))
    dpo, g = [], torch.Generator().manual_seed(2)
    for B in (1, 4):
        pi, ref = (-1 - 59 * torch.rand(2, 2 * B, generator=g, dtype=torch.float64))
        for beta in (0.01, 0.1, 1.0):
            p = pi.clone().requires_grad_()
            loss = orpo.dpo_loss(p, ref, beta=beta)
            loss.backward()
            dpo.append(dict(pi=pi.tolist(), ref=ref.tolist(), beta=beta, loss=loss.item(),
                            grad=p.grad.tolist()))
    P = torch.tensor([0.6, 0.3], dtype=torch.float64)
    l_or, log_or = orpo.odds_ratio_loss(P[:1].log(), P[1:].log())
    odds = P / (1 - P)
    by_hand_1 = dict(odds_w=odds[0].item(), odds_l=odds[1].item(), odds_ratio=log_or.exp().item(),
                     log_or=log_or.item(), l_or=l_or.item(), delta=torch.sigmoid(-log_or).item(),
                     prob_ratio=(P[0] / P[1]).item())
    by_hand_1 = {k: ["number", sealed(k, f"{v:.3g}")] for k, v in by_hand_1.items()}
    return {"1a": by_hand_1, "2": log1mexp, "3a": by_hand, "3b": dict(tokens=tokens, index=index,
            rows=[[p, c, r] for p, c, r in TOY], calls=calls), "3c": logps, "11": dpo}


def compute_refs():
    """Every reference value, from the solution in this folder, in float64."""
    import torch
    import orpo
    import prepare_data
    batches = ell_pairs(torch)
    rows = {**freeze_losses(orpo, torch, batches), **freeze_grads(orpo, torch, batches),
            **freeze_rest(orpo, torch)}
    ells, prs = set(), set()  # every l and every pair a stand-in may be asked about
    for c in rows["1b"] + rows["4a"]:
        prs.update(zip(c["ell_w"], c["ell_l"]))
        ells.update(c["ell_w"] + c["ell_l"])
    for c in rows["4b"]:
        B = len(c["ell"]) // 2
        prs.update(zip(c["ell"][:B], c["ell"][B:]))
        ells.update(c["ell"])
    ells, prs = sorted(ells), sorted(prs)
    t = lambda v: torch.tensor(v, dtype=torch.float64)
    w, l = t([p[0] for p in prs]), t([p[1] for p in prs])
    l_or, log_or = orpo.odds_ratio_loss(w, l)
    standins = dict(log1mexp=[list(p) for p in zip(ells, orpo.log1mexp(t(ells)).tolist())],
                    odds_ratio_loss=[list(p) for p in zip(w.tolist(), l.tolist(), l_or.tolist(),
                                                          log_or.tolist())],
                    simpo_loss=[list(p) for p in zip(w.tolist(), l.tolist(),
                                                     orpo.simpo_loss(w, l).tolist())])
    columns = {k: getattr(prepare_data, k) for k in ("OFF", "PROMPT", "CHOSEN", "REJECTED")}
    return dict(about="assignment.py's frozen reference values, from `python assignment.py "
                "freeze` (the solution, float64); the grader reads them and nothing else",
                columns=columns, rows=rows, standins=standins)


def freeze():
    refs = compute_refs()
    with atomic_write(REF) as tmp, open(tmp, "w") as f:
        json.dump(refs, f, separators=(",", ":"))
        f.write("\n")
    print(f"wrote {REF} ({os.path.getsize(REF) // 1024} KiB)")


def main():
    args = sys.argv[1:]
    if args[:1] == ["_worker"]:  # grade_rows in a process of its own (run_workers)
        d, ref, ids = args[1], args[2], args[3:]
        with open(ref) as f:
            refs = json.load(f)
        for i, score, msg in grade_rows(d, ids, refs):
            print("@@ " + json.dumps([i, score, msg]), flush=True)
        return
    if args[:1] == ["freeze"] and len(args) == 1:
        return freeze()
    if len(args) == 2 and args[0] in ("make", "grade"):
        return make(args[1]) if args[0] == "make" else grade(args[1]) and None
    die("usage: python assignment.py make DIR | grade DIR | freeze")


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        die("interrupted", 130)
