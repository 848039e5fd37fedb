"""assignment.py: the handout it cuts from orpo.py; the grader on the solution (full marks),
on the handout as made (0, each row with its exercise's message) and on a catalogue of
typical wrong answers (each costs its own row's points, and only those); and the frozen
reference values against the solution that computed them."""
import ast
import json
import math
import os
import subprocess
import sys

import pytest

import assignment
from conftest import ROOT, cli

FULL = {r[0]: r[3] for r in assignment.ROWS}
with open(os.path.join(ROOT, "orpo.py")) as f:
    SOLUTION = f.read()
with open(os.path.join(ROOT, "teacher", "answers.txt")) as f:
    KEY = f.read()

# (the row it must cost, the wrong answer, [(the solution's text, the wrong text), ...]);
# "answers.txt:" edits the answer key instead of orpo.py
WRONG = [
    ("4a", "the paper's sign (Eq. 8) in the gradient",
     [("(-1 - lam * delta * inv_w)", "(-1 + lam * delta * inv_w)"),
      ("(lam * delta * inv_l) / B", "(-lam * delta * inv_l) / B")]),
    ("4a", "the rejected term's sign alone", [("(lam * delta * inv_l) / B", "(-lam * delta * inv_l) / B")]),
    ("4a", "no 1/(1 - P)", [("inv_w = -1 / torch.expm1(ell_w)", "inv_w = 1"),
                            ("inv_l = -1 / torch.expm1(ell_l)", "inv_l = 1")]),
    ("4a", "no 1/B", [("(-1 - lam * delta * inv_w) / B", "(-1 - lam * delta * inv_w)"),
                      ("(lam * delta * inv_l) / B", "(lam * delta * inv_l)")]),
    ("4a", "1/(1 - e^l) computed naively", [("-1 / torch.expm1(ell_w)", "1 / (1 - torch.exp(ell_w))"),
                                           ("-1 / torch.expm1(ell_l)", "1 / (1 - torch.exp(ell_l))")]),
    ("4b", "sft_on_prompt: the response-only L_SFT left in", [("g_w = g_w + 1 / B", "g_w = g_w")]),
    ("2", "the naive log(1 - e^l)", [("    a = -math.log(2)\n", "    return torch.log(1 - torch.exp(x))\n")]),
    ("3b", "the response mask one position late", [("resp_mask[i, p - 1:n]", "resp_mask[i, p:n]")]),
    ("3c", "the sum in place of the mean (Eq. 3)", [("(resp_mask.sum(1) if mean else 1)", "1")]),
    ("1b", "chosen and rejected swapped", [("log_or = log_odds_w - log_odds_l", "log_or = log_odds_l - log_odds_w")]),
    ("11", "DPO's beta on one side only", [("beta * ((pi[:B] - ref[:B]) - (pi[B:] - ref[B:]))",
                                           "beta * (pi[:B] - ref[:B]) - (pi[B:] - ref[B:])")]),
    ("10a", "SimPO's margin gamma with the wrong sign", [("(ell_w - ell_l) - gamma", "(ell_w - ell_l) + gamma")]),
    ("10b", "SimPO with L_SFT left in", [("return l_or.mean(), pair_means(",
                                          "return (l_sft + l_or).mean(), pair_means(")]),
    ("1a", "answers.txt: delta as sigma(log OR)", [("delta = 2/9", "delta = 7/9")]),
    ("3a", "answers.txt: the response mask one late", [("resp_mask = 0 0 1 1 1", "resp_mask = 0 0 0 1 1")]),
]


def copy(d, src=SOLUTION, key=KEY):
    """A copy as the grader reads it: orpo.py and answers.txt."""
    os.makedirs(d, exist_ok=True)
    for name, text in (("orpo.py", src), ("answers.txt", key)):
        with open(os.path.join(d, name), "w") as f:
            f.write(text)
    return str(d)


def grade(d):
    """The grader's rows, in this process: row -> (points, message)."""
    with open(assignment.REF) as f:
        refs = json.load(f)
    return {i: (s, m) for i, s, m in assignment.grade_rows(d, list(FULL), refs)}


@pytest.mark.parametrize("row, what, edits", WRONG, ids=[w[1] for w in WRONG])
def test_each_wrong_answer_costs_its_row_only(tmp_path, row, what, edits):
    src, key = SOLUTION, KEY
    for old, new in edits:
        text = key if row in ("1a", "3a") else src
        assert text.count(old) == 1, f"the catalogue no longer matches orpo.py: {old!r}"
        if row in ("1a", "3a"):
            key = key.replace(old, new)
        else:
            src = src.replace(old, new)
    got = grade(copy(tmp_path, src, key))
    assert got[row][0] == 0 and got[row][1], (what, got[row])
    assert {i: s for i, (s, _) in got.items() if i != row} == {i: p for i, p in FULL.items() if i != row}, got


def test_solution_full_marks_handout_zero_from_the_command_line(tmp_path):
    sol = copy(tmp_path / "solution")
    r = cli("assignment.py", "grade", sol)
    assert r.returncode == 0 and "total 100/100" in r.stdout, r.stdout + r.stderr
    hand = str(tmp_path / "handout")
    r = cli("assignment.py", "make", hand)
    assert r.returncode == 0, r.stderr
    r = cli("assignment.py", "grade", hand)
    assert r.returncode == 0 and "total 0/100" in r.stdout, r.stdout + r.stderr
    with open(os.path.join(hand, "results.json")) as f:
        res = json.load(f)
    assert res["score"] == 0 and len(res["tests"]) == len(FULL)
    for t, (i, ex, _, pts) in zip(res["tests"], assignment.ROWS):
        assert t["score"] == 0 and t["max_score"] == pts and t["name"].startswith(f"exercise {ex} ")
        want = ["is blank"] if i in ("1a", "3a") else ["NotImplementedError: ", f"exercise {ex}:"]
        assert all(w in t["output"] for w in want), t
    r = cli("assignment.py", "make", hand)  # never over a copy
    assert r.returncode == 2 and r.stderr.startswith("error: ") and "not empty" in r.stderr


def test_handout_leaves_out_the_solutions_and_keeps_the_rest(tmp_path):
    hand = str(tmp_path / "handout")
    assignment.make(hand)
    for name in ("GRADIENT.md", "TEACHING.md", "teacher", "tests/test_assignment.py"):
        assert not os.path.exists(os.path.join(hand, name)), name
    with open(os.path.join(hand, "orpo.py")) as f:
        src = f.read()
    for answer in ("g_w + 1 / B", "-1 / torch.expm1", "dL_OR/dℓ_w", "p - 1:n", "logsigmoid"):
        assert answer not in src, answer
    with open(os.path.join(hand, "README.md")) as f:
        assert assignment.README_CUT not in f.read()
    with open(os.path.join(hand, "tests", "test_loss.py")) as f:
        kept = f.read()
    assert all(t not in kept for t in assignment.DROP_TESTS["tests/test_loss.py"])
    assert "test_masks_cover_exactly_the_response_tokens" in kept
    # outside the holes the handout is the solution, statement for statement
    holes = {q.split(".")[0] for q in assignment.HOLES} | {"make_batch", "main"}  # main: below
    rest = lambda s: [ast.dump(n) for n in ast.parse(s).body if getattr(n, "name", "") not in holes]
    assert rest(src) == rest(SOLUTION)
    r = cli("orpo.py", "--help", cwd=hand)  # what needs no hole runs
    assert r.returncode == 0 and "--lam" in r.stdout


def test_a_crash_in_one_function_costs_its_row_only(tmp_path):
    src = SOLUTION.replace("    B = pi.size(0) // 2\n", "    import os; os._exit(3)\n")
    assert src != SOLUTION
    d = copy(tmp_path, src)
    got = assignment.run_workers(d, assignment.REF)
    assert got["11"][0] == 0 and "worker stopped (exit 3)" in got["11"][1]
    assert {i: s for i, (s, _) in got.items() if i != "11"} == {i: p for i, p in FULL.items() if i != "11"}


def same(a, b, path="refs"):
    """The reference file against a fresh computation: floats to 1e-12, the rest exactly."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            same(x, y, f"{path}[{i}]")
    elif isinstance(a, float):
        assert math.isclose(a, b, rel_tol=1e-12, abs_tol=1e-300), (path, a, b)
    else:
        assert a == b, path


def test_frozen_references_agree_with_the_solution():
    """The only place the solution meets the references: a change to orpo.py that changes an
    answer fails here (then rerun `python assignment.py freeze`, on purpose)."""
    with open(assignment.REF) as f:
        frozen = json.load(f)
    same(json.loads(json.dumps(assignment.compute_refs())), frozen)
    assert os.path.getsize(assignment.REF) < 200_000


def test_grade_refuses_a_folder_without_orpo(tmp_path):
    r = cli("assignment.py", "grade", str(tmp_path))
    assert r.returncode == 2 and r.stderr.startswith("error: ") and "no orpo.py" in r.stderr
    assert os.listdir(tmp_path) == []


def test_a_run_in_a_handout_with_holes_is_one_line_naming_the_first_exercise(tmp_path):
    d = tmp_path / "handout"
    assert cli("assignment.py", "make", str(d)).returncode == 0
    r = subprocess.run([sys.executable, "orpo.py", "--config", "tiny"], cwd=d, capture_output=True,
                       text=True, timeout=300)  # the handout's own orpo.py
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.startswith("error: fill the holes first, from exercise 1: ")
    assert not (d / "out-tiny").exists()  # before any work
    r = subprocess.run([sys.executable, "orpo.py", "--help"], cwd=d, capture_output=True, text=True)
    assert r.returncode == 0 and "--lam" in r.stdout
