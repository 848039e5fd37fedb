"""The graded assignment, from the project's root (course/TEACHING.md says how to use it):

    python -m course.assignment make DIR         # the handout, a student copy, into DIR (new or empty)
    python -m course.assignment grade DIR        # grade the copy in DIR: a table, DIR/results.json
    python -m course.assignment autograder OUT   # the grader for Gradescope, OUT/autograder.zip
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
import traceback
import zipfile
from functools import partial
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F

from machinery.safe import atomic_write, die, one_line

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the project's root
REF = os.path.join(ROOT, "tests", "assignment_ref.json")  # frozen by tests/assignment_freeze.py
TEACHER = os.path.join(ROOT, "course", "teacher")  # the teacher's kit: never in a handout

# ----------------------------------------------------------------------------------------
# The handout: the graded functions' bodies cut out of orpo.py with ast, so that the cut
# follows the code wherever the functions sit

HOLES = {  # function (or Class.method) -> the message its NotImplementedError carries
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
# Left out of the handout: the worked solutions, the teacher's kit, the tests that hold the
# solution's lines, and the results and figures, which state what exercises 5-11 ask about
LEAVE_OUT = ("GRADIENT.md", "course/TEACHING.md", "course/teacher/", "tests/test_assignment.py",
             "tests/assignment_freeze.py", "tests/test_exercises.py", "experiments/RESULTS.md",
             "tests/test_docs.py")  # it checks documents that a handout leaves out
STUDENT_README = os.path.join(TEACHER, "handout-README.md")  # the handout's README.md
KEY = os.path.join(TEACHER, "answers.txt")  # answers.txt, filled in; the handout's is blank
LINK = re.compile(r"\[([^\]]+)\]\(([^)#\s]+)[^)]*\)")  # a Markdown link: [text](target#part)
DROP_TESTS = {  # the tests that spell answers out
    "tests/test_loss.py": ("test_loss_matches_the_paper_by_hand", "test_probability_ratio_and_summed_logp",
                           "test_dpo_loss_by_hand", "test_dpo_gradient_agrees_with_finite_differences",
                           "test_dpo_forward_scores_summed_logps"),
    "tests/test_train.py": ("test_dpo_trains_the_policy_and_never_touches_the_reference",),
    "tests/test_scale.py": ("test_gpt2_125m_from_a_hugging_face_directory_reports_the_true_l_sft",)}
HOLES_LEFT = '''\
def holes_left(cfg):
    """Stop with one line, naming the first, if a run of cfg would reach a hole."""
    with open(__file__) as f:  # a hole's line: raise NotImplementedError('exercise N: ...')
        left = [l.strip()[27:-2] for l in f if l.strip().startswith("raise NotImplementedError(")]
    number = lambda m: int(m.split()[1][:-1])
    flag = {4: cfg.hand_grad, 10: cfg.loss == "simpo", 11: cfg.loss == "dpo"}
    left = [m for m in left if flag.get(number(m), True)]
    if left:
        die(f"fill the holes first, from {min(left, key=number)}; "
            "`python -m course.assignment grade .` checks them")

def hole_reached(kind, value, tb, hook=sys.excepthook):
    """A hole reached with no run to check first (sample.py, a test): one line, exit 2."""
    if issubclass(kind, NotImplementedError) and str(value).startswith("exercise "):
        die(f"this needs a hole filled first, {value}; `python -m course.assignment grade .` checks it")
    return hook(kind, value, tb)

sys.excepthook = hole_reached  # the handout's holes, wherever a command reaches one
'''

def cut(src):
    """orpo.py's source -> the handout's: the edits (first line, last line, new lines), 1-based
    and inclusive, made from the bottom up, so that the line numbers above each hold."""
    tree, lines, edits = ast.parse(src), src.splitlines(), []
    defs = {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef)}  # and Class.method's
    defs.update({f"{c.name}.{n.name}": n for c in tree.body if isinstance(c, ast.ClassDef)
                 for n in c.body if isinstance(n, ast.FunctionDef)})
    for qualname, msg in HOLES.items():
        node = defs.get(qualname)
        if node is None:
            die(f"orpo.py has no {qualname}: the handout cannot be cut")
        doc = ast.get_docstring(node) is not None  # kept; what follows it goes, comments too
        a, b = (node.body[0].end_lineno + 1 if doc else node.body[0].lineno), node.end_lineno
        pad = " " * node.body[0].col_offset
        tags = [pad + l[l.index("#"):] for l in lines[a - 1:b] if TAG.search(l)]
        edits.append((a, b, tags + [f"{pad}raise NotImplementedError({msg!r})"]))
        if qualname == "orpo_grad":  # the derivation: the comment block right above the def
            top = node.lineno - 1
            while top > 0 and lines[top - 1].startswith("#"):
                top -= 1
            rule = [lines[top]] if lines[top].startswith("# ---") else []  # a section's rule stays
            edits.append((top + 1, node.lineno - 1, rule + ["# The gradient by hand: exercise 4."]))
    sets = [n for n in ast.walk(defs["make_batch"]) if isinstance(n, ast.Assign) and any(
        isinstance(t, ast.Subscript) and getattr(t.value, "id", "") in MASKS for t in n.targets)]
    if len(sets) != len(MASKS):
        die(f"make_batch does not set {' and '.join(MASKS)} one line each: the handout cannot be cut")
    hole = [" " * sets[0].col_offset + f"raise NotImplementedError({MASK_HOLE!r})"]
    edits += [(n.lineno, n.end_lineno, hole if n is sets[0] else []) for n in sets]
    train = defs["train"]  # a run that would reach a hole: one line, before any work
    edits.append((train.lineno, train.lineno - 1, HOLES_LEFT.splitlines() + [""]))
    first = train.body[1]  # after the docstring
    edits.append((first.lineno, first.lineno - 1,
                  [" " * first.col_offset + "holes_left(cfg)  # the handout's holes: one line"]))
    for a, b, new in sorted(edits, reverse=True):
        lines[a - 1:b] = new
    out = "\n".join(lines) + "\n"
    ast.parse(out)  # still Python
    return out

def drop_tests(src, name):
    lines = src.splitlines()
    for node in sorted((n for n in ast.parse(src).body if getattr(n, "name", "") in DROP_TESTS[name]),
                       key=lambda n: -n.lineno):
        a = min([n.lineno for n in node.decorator_list] + [node.lineno]) - 1
        while a > 0 and not lines[a - 1].strip():
            a -= 1
        del lines[a:node.end_lineno]
    return "\n".join(lines) + "\n"

def project_files():
    """The project's files: those git tracks, so that no run's output or scratch file goes."""
    r = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True)
    if r.returncode != 0 or not r.stdout.strip():
        die(f"{ROOT} is not a git checkout: the handout is made of the files git tracks")
    return [f for f in r.stdout.splitlines() if os.path.isfile(os.path.join(ROOT, f))]

def left_out(name):
    """Whether the handout leaves out the project's file `name` (a figure: it shows a result)."""
    return name.endswith(".png") or name.startswith(LEAVE_OUT)

def unlink(md, name):
    """The Markdown file `name`, its links to what the handout leaves out made plain text."""
    gone = lambda t: left_out(os.path.normpath(os.path.join(os.path.dirname(name), t)))
    return LINK.sub(lambda m: f"{m[1]} (not in the handout)" if gone(m[2]) else m[0], md)

def write_handout(dst):
    """The handout into the new folder dst (the student's README, a blank answers.txt); how many."""
    with open(os.path.join(ROOT, "orpo.py")) as f, open(KEY) as k, open(STUDENT_README) as r:
        own = {"orpo.py": cut(f.read()), "answers.txt": re.sub(r"(?m)^(\w+) =.*$", r"\1 =", k.read()),
               "README.md": unlink(r.read(), "README.md")}  # the student's, for the project's
    files = list(dict.fromkeys([n for n in project_files() if not left_out(n)] + list(own)))
    for name in files:
        path = os.path.join(dst, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        if name not in own and (name.endswith(".md") or name in DROP_TESTS):
            with open(os.path.join(ROOT, name)) as f:
                own[name] = (unlink if name.endswith(".md") else drop_tests)(f.read(), name)
        if name in own:
            with open(path, "w") as f:
                f.write(own[name])
        else:
            shutil.copy2(os.path.join(ROOT, name), path)
    return len(files)

def fresh(dst, write, what):
    """write(folder) into a folder beside dst, renamed to dst when whole: dst (new or empty)
    holds all of it or nothing. Only the full project can write it: a handout has no key."""
    if os.path.exists(dst) and os.listdir(dst):
        die(f"{dst} is not empty: write {what} into a new or empty folder")
    if not os.path.isfile(STUDENT_README):
        die(f"{STUDENT_README} is missing: write {what} from the full project, not from a handout")
    tmp = os.path.abspath(dst) + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        os.makedirs(tmp)
        n = write(tmp)
        if os.path.isdir(dst):
            os.rmdir(dst)  # empty, as checked
        os.rename(tmp, dst)
        return n
    except (OSError, KeyboardInterrupt) as e:
        ctrl_c = isinstance(e, KeyboardInterrupt)
        die(f"could not write {what} to {dst}: {'interrupted' if ctrl_c else one_line(e)}; "
            "nothing was left there", 130 if ctrl_c else 2)
    finally:  # whatever stopped it (a die of cut's too), no half a copy stays
        shutil.rmtree(tmp, ignore_errors=True)

def make(dst):
    n = fresh(dst, write_handout, "the handout")
    print(f"wrote the handout to {dst}: {n} files, {len(HOLES) + 1} holes in orpo.py; "
          f"grade it with `python -m course.assignment grade {dst}`")

# ----------------------------------------------------------------------------------------
# Grading, inside a worker process: each graded function runs alone, on frozen inputs

class Fail(Exception):
    """A graded value is wrong, or a stand-in was asked for one the reference does not hold."""

def standins(refs):
    """The graded functions as the others see them, so that one wrong or missing function costs
    its own points only: the frozen values, element by element, at the frozen inputs only."""
    def stand_in(name, n_in, **defaults):
        table = {tuple(r[:n_in]): r[n_in:] for r in refs["standins"][name]}

        def fn(x, *args, **kw):
            if not kw.items() <= defaults.items():
                raise Fail(f"{name} was called with {kw}, not with its defaults {defaults}")
            keys = list(zip(*(a.detach().double().flatten().tolist() if torch.is_tensor(a) else
                              [float(a)] * x.numel() for a in (x, *args))))  # a number: everywhere
            if missing := [k for k in keys if k not in table]:
                raise Fail(f"{name} was called at {missing[0]}, not at an input the reference "
                           "holds: pass it l_w, l_l (or l) as they are")
            cols = [torch.tensor(c, dtype=x.dtype).view_as(x) for c in zip(*(table[k] for k in keys))]
            return cols[0] if len(cols) == 1 else tuple(cols)
        return fn
    return dict(log1mexp=stand_in("log1mexp", 1), odds_ratio_loss=stand_in("odds_ratio_loss", 2),
                simpo_loss=stand_in("simpo_loss", 2, beta=2.0, gamma=1.0),
                orpo_grad=stand_in("orpo_grad", 3))

def load_graded(path, refs, qualname):
    """One graded function of the student's orpo.py, with torch, numpy, math, the data's column
    numbers, the student's own helpers and imports, and stand-ins; no other code of the copy runs."""
    try:
        with open(path) as f:
            tree = ast.parse(f.read())
    except (OSError, SyntaxError, ValueError) as e:
        raise Fail(f"orpo.py cannot be read: {one_line(e, typed=True)}")
    top = {n.name: n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
    graded = {q.split(".")[0] for q in HOLES} | {"make_batch"}
    imports = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom)) and not {
        (getattr(n, "module", None) or a.name).split(".")[0] for a in n.names} & {
            "model", "prepare_data", "machinery", "orpo"}]  # the student's, but of no file of ours
    name, _, method = qualname.partition(".")
    if name not in top:
        raise Fail(f"orpo.py has no {name}")
    ns = dict(torch=torch, F=F, np=np, math=math, **refs["columns"])
    exec(compile(ast.Module(imports, []), path, "exec"), ns)
    ns.update({k: v for k, v in standins(refs).items() if k != name})
    todo, done = [name], set()
    while todo:  # the graded function, and the helpers of the student's it names
        n = top[todo.pop()]
        done.add(n.name)
        exec(compile(ast.Module([n], []), path, "exec"), ns)
        todo += [x.id for x in ast.walk(n) if isinstance(x, ast.Name) and x.id in top and
                 x.id not in done and x.id not in graded]
    return getattr(ns[name], method) if method else ns[name]

def compare(what, got, want, at="", rtol=1e-9, atol=1e-12):
    """got (a tensor) against the frozen want; a Fail names the first element that differs and
    where: at is a text, or a function of its flat index (None: of them all) that says it."""
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
        if not isinstance(at, str):
            where = at(i)
        elif want.dim():  # the element's index, as [row, position]
            where = f" {[int(v) for v in torch.unravel_index(torch.tensor(i), want.shape)]}{at}"
        raise Fail(f"{what}{where}: expected {want.flatten()[i].item():.10g}, "
                   f"got {got.flatten()[i].item():.10g}")

def T(v, dtype="float64"):
    return torch.tensor(v, dtype=getattr(torch, dtype))

def pairs(c, extra=""):
    w, l, B = c["ell_w"], c["ell_l"], len(c["ell_w"])
    return lambda i: (f" in a batch of {B} pair(s){extra}" if i is None else
                      f" at pair {i} (l_w={w[i]!r}, l_l={l[i]!r}) of a batch of {B}{extra}")

def sealed(key, text):
    """An answer as the reference file keeps it (a number's three significant digits, or
    tokens), hashed: a handout holds the file, and so can check answers.txt, not the answers."""
    return hashlib.sha256(f"{key} = {' '.join(text.split())}".encode()).hexdigest()[:20]

def check_answers(d, want):
    """The copy's answers.txt (the full project's is the key, in course/teacher/)."""
    paths = [os.path.join(d, "answers.txt"), os.path.join(d, "course", "teacher", "answers.txt")]
    if not (paths := [p for p in paths if os.path.exists(p)]):
        raise Fail("no answers.txt in the copy")
    with open(paths[0]) as f:
        got = dict((k.strip(), v.strip()) for k, _, v in (
            l.partition("=") for l in f if "=" in l and not l.lstrip().startswith("#")))
    for k, (kind, seal) in want.items():
        v = got.get(k)
        if not v:
            raise Fail(f"answers.txt: {k} is blank")
        if kind == "tokens":
            if sealed(k, v) != seal:
                raise Fail(f"answers.txt: {k} = {v} is not right (compare with your other rows)")
            continue
        try:  # arithmetic of numbers only, as 3/7 (TypeError: no match)
            x = float(eval(re.fullmatch(r"[-+*/().0-9eE ]+", v)[0], {"__builtins__": {}}))
        except (TypeError, SyntaxError, ZeroDivisionError):
            raise Fail(f"answers.txt: {k} = {v} is not a number")
        if all(sealed(k, f"{x * (1 + e):.3g}") != seal for e in (0, -2e-3, 2e-3)):  # rounded or cut
            raise Fail(f"answers.txt: {k} = {v} is not right to three significant digits")

def check_odds(load, cases):
    fn = load("odds_ratio_loss")
    for c in cases:
        l_or, log_or = fn(T(c["ell_w"]), T(c["ell_l"]))
        compare("odds_ratio_loss: log OR", log_or, c["log_or"], pairs(c))
        compare("odds_ratio_loss: L_OR", l_or, c["l_or"], pairs(c))

def check_objective(load, cases):
    for c in cases:
        name = c["fn"]
        loss, parts = load(name)(T(c["ell"]), T(c["l_sft"]), lam=c["lam"])
        at = f" with lam={c['lam']!r}, B={len(c['l_sft'])}" + (
            ", L_SFT over the prompt too (sft_on_prompt)" if c["sft_on_prompt"] else "")
        compare(f"{name}: the loss", loss, c["loss"], at)
        for k, v in c["parts"].items():
            if k not in parts:
                raise Fail(f"{name}: parts has no {k!r}{at}")
            compare(f"{name}: parts[{k!r}]", parts[k], v, at)

def check_log1mexp(load, c):
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
    fn = load("make_batch")
    split = np.array(c["tokens"], np.uint16), np.array(c["index"], np.int64)
    for call in c["calls"]:
        for k, g in zip(("x", "y", "resp_mask", "seq_mask"), fn(split, call["rows"], "cpu")):
            compare(f"make_batch: {k}", g, call[k], f" (row, position) for the pairs (prompt, "
                    f"chosen, rejected) {[c['rows'][r] for r in call['rows']]}", rtol=0, atol=0)

def check_response_logps(load, cases):
    fn = load("response_logps")
    for c in cases:
        logp, ell = fn(T(c["tok"]), T(c["resp"]), T(c["scored"]).bool(), mean=c["mean"])
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
    fn = load("HandORPO.backward")
    for c in cases:
        saved = (T(c["logits"]), T(c["y"], "int64"), T(c["resp"]), T(c["seq"]), T(c["scored"]).bool(),
                 T(c["ell"]))
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
        compare("simpo_loss", loss, c["loss"], pairs(c, f", {c['kw'] or 'the default beta, gamma'}"))

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

ROWS = [  # what is graded, one row per check: (id, exercise, what, points, check); 100 in all
    ("1a", 1, "odds ratio by hand (answers.txt)", 5, check_answers),
    ("1b", 1, "odds_ratio_loss: Eqs. 4, 5, 7", 10, check_odds),
    ("1c", 1, "orpo_loss and prob_ratio_loss: Eq. 6", 10, check_objective),
    ("2", 2, "log1mexp: stable in float64 and float32", 10, check_log1mexp),
    ("3a", 3, "masks by hand (answers.txt)", 5, check_answers),
    ("3b", 3, "make_batch: x, y and the masks", 10, check_masks),
    ("3c", 3, "response_logps: Eq. 3, mean and sum", 10, check_response_logps),
    ("4a", 4, "orpo_grad: dL/dl_w, dL/dl_l", 10, check_grad),
    ("4b", 4, "HandORPO.backward: down to the logits", 10, check_backward),
    ("10a", 10, "simpo_loss", 5, check_simpo),
    ("10b", 10, "simpo_objective", 5, check_objective),
    ("11", 11, "dpo_loss", 10, check_dpo),
]
BY_HAND = [r[0] for r in ROWS if r[4] is check_answers]  # the rows of answers.txt, given the copy

def grade_rows(d, ids, ref):
    """Grade the copy in d against the reference file ref: yields (row, points scored, message)."""
    torch.set_num_threads(1)
    with open(ref) as f:
        refs = json.load(f)
    load = partial(load_graded, os.path.join(d, "orpo.py"), refs)  # load(qualname)
    for i, _, _, points, check in [r for r in ROWS if r[0] in ids]:
        try:
            check(d if i in BY_HAND else load, refs["rows"][i])
            yield i, points, ""
        except NotImplementedError as e:
            yield i, 0, f"NotImplementedError: {one_line(e, 300)}"
        except Fail as e:
            yield i, 0, one_line(e, 400)
        except Exception as e:  # the student's code raised: say what and where
            tb = [f for f in traceback.extract_tb(e.__traceback__) if f.filename.endswith("orpo.py")]
            where = f" (orpo.py line {tb[-1].lineno}: {tb[-1].line})" if tb else ""
            yield i, 0, f"{one_line(e, 300, typed=True)}{where}"

# ----------------------------------------------------------------------------------------
# Grading, from the outside: workers, which a crash or an endless loop cannot take down

WORKER_TIMEOUT = 60  # seconds for one worker; the whole grade takes a few seconds

def run_workers(d, ref):
    """A row whose worker dies or hangs scores 0, and a new worker grades the rows after it."""
    todo, got = [r[0] for r in ROWS], {}
    while todo:
        cmd = [sys.executable, "-m", "course.assignment", "_worker", d, ref, *todo]
        try:
            p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=WORKER_TIMEOUT)
            out, err, why = p.stdout, p.stderr, f"the grader's worker stopped (exit {p.returncode})"
        except subprocess.TimeoutExpired as e:
            out, err = (e.stdout or b"").decode(), (e.stderr or b"").decode()
            why = f"no result in {WORKER_TIMEOUT} s (an endless loop?)"
        rows = [json.loads(line[3:]) for line in out.splitlines() if line.startswith("@@ ")]
        got.update({i: (score, msg) for i, score, msg in rows})
        todo = [i for i in todo if i not in got]
        if todo:  # the first row left is the one that stopped the worker
            tail = [l for l in err.splitlines() if l.strip()][-1:]
            got[todo.pop(0)] = (0, why + (f": {one_line(tail[0])}" if tail else ""))
    return got

def grade(d):
    if not os.path.isfile(os.path.join(d, "orpo.py")):
        die(f"{d} has no orpo.py: give the folder of a copy made by `python -m course.assignment make`")
    if not os.path.isfile(REF):
        die(f"no reference values at {REF}: run `python -m tests.assignment_freeze` in the full project")
    t0 = time.time()
    got = run_workers(os.path.abspath(d), REF)
    seconds = time.time() - t0
    tests, total = [], 0
    print(f"{'exercise':<9}{'row':<5}{'what':<42}{'points':>7}  result")
    for i, ex, what, pts, _ in ROWS:
        score, msg = got[i]
        total += score
        print(f"{ex:<9}{i:<5}{what:<42}{f'{score}/{pts}':>7}  {'pass' if score == pts else 'FAIL'}")
        if msg:
            print(f"{'':14}{msg}")
        tests.append(dict(name=f"exercise {ex} ({i}): {what}", score=score, max_score=pts,
                          output=msg or "pass"))
    print(f"total {total}/{sum(r[3] for r in ROWS)} ({seconds:.1f} s)")
    path = os.path.join(d, "results.json")
    with atomic_write(path) as tmp, open(tmp, "w") as f:  # as Gradescope reads it
        json.dump(dict(score=total, tests=tests, execution_time=round(seconds, 1)), f, indent=1)
    print(f"wrote {path}")

# ----------------------------------------------------------------------------------------
# Gradescope: the zip it takes, its two scripts (teacher/gradescope/) and the handout they grade with

def write_package(out):
    n = write_handout(os.path.join(out, "handout"))
    for name in ("setup.sh", "run_autograder"):
        shutil.copy2(os.path.join(TEACHER, "gradescope", name), os.path.join(out, name))
    files = sorted(os.path.relpath(os.path.join(d, f), out) for d, _, fs in os.walk(out) for f in fs)
    with zipfile.ZipFile(os.path.join(out, "autograder.zip"), "w", zipfile.ZIP_DEFLATED) as z:
        for name in files:  # each file with its mode: run_autograder stays executable
            z.write(os.path.join(out, name), name)
    return n

def autograder(out):
    n = fresh(out, write_package, "the autograder")
    print(f"wrote {os.path.join(out, 'autograder.zip')}: setup.sh, run_autograder and a handout "
          f"of {n} files; upload it to Gradescope as course/TEACHING.md says")

def main():
    args = sys.argv[1:]
    commands = dict(make=make, grade=grade, autograder=autograder)
    if args[:1] == ["_worker"]:  # _worker DIR REF ROW...: grade_rows in a process of its own
        for row in grade_rows(args[1], args[3:], args[2]):
            print("@@ " + json.dumps(row), flush=True)
    elif args[:1] in (["-h"], ["--help"]):
        print(__doc__.rstrip())
    elif len(args) != 2 or args[0] not in commands:
        die("usage: python -m course.assignment make DIR | grade DIR | autograder OUT")
    else:
        commands[args[0]](args[1])


if __name__ == "__main__":
    main()  # Ctrl-C: boot's one line, exit status 130
