"""course/assignment.py: the handout it cuts from orpo.py, with no answer in any of its files,
written or coded, each exercise checkable once it and the earlier ones are filled, and a
hole reached anywhere in it one line; the grader on the solution (full marks), on the
handout as made (0, each row with its exercise's message) and on a catalogue of typical
wrong answers (each costs its own row's points, and only those); the Gradescope package,
end to end; and the frozen reference values against the solution that computed them."""
import ast
import json
import math
import os
import re
import shlex
import subprocess
import sys
import zipfile

import pytest

import assignment_freeze
from conftest import ROOT
from course import assignment

FULL = {r[0]: r[3] for r in assignment.ROWS}
with open(os.path.join(ROOT, "orpo.py")) as f:
    SOLUTION = f.read()
with open(assignment.KEY) as f:
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
    ("4b", "sft_on_prompt: the response-only L_SFT left in",
     [("g_tok[:B] += (per_tok(resp_mask[:B]) - per_tok(seq_mask[:B])) / B", "pass")]),
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


def course(*args, cwd=ROOT, timeout=300):
    """python -m course.assignment ARGS, as a teacher or a student runs it, from cwd."""
    return subprocess.run([sys.executable, "-m", "course.assignment", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)


def wrong(row, edits):
    """The solution's orpo.py and answers.txt with one catalogued wrong answer made."""
    src, key = SOLUTION, KEY
    for old, new in edits:
        text = key if row in assignment.BY_HAND else src
        assert text.count(old) == 1, f"the catalogue no longer matches orpo.py: {old!r}"
        if row in assignment.BY_HAND:
            key = key.replace(old, new)
        else:
            src = src.replace(old, new)
    return src, key


def copy(d, src=SOLUTION, key=KEY):
    """A copy as the grader reads it: orpo.py and answers.txt."""
    os.makedirs(d, exist_ok=True)
    for name, text in (("orpo.py", src), ("answers.txt", key)):
        with open(os.path.join(d, name), "w") as f:
            f.write(text)
    return str(d)


def grade(d):
    """The grader's rows, in this process: row -> (points, message)."""
    return {i: (s, m) for i, s, m in assignment.grade_rows(d, list(FULL), assignment.REF)}


@pytest.mark.parametrize("row, what, edits", WRONG, ids=[w[1] for w in WRONG])
def test_each_wrong_answer_costs_its_row_only(tmp_path, row, what, edits):
    got = grade(copy(tmp_path, *wrong(row, edits)))
    assert got[row][0] == 0 and got[row][1], (what, got[row])
    assert {i: s for i, (s, _) in got.items() if i != row} == {i: p for i, p in FULL.items() if i != row}, got


def test_solution_full_marks_handout_zero_from_the_command_line(tmp_path):
    sol = copy(tmp_path / "solution")
    r = course("grade", sol)
    assert r.returncode == 0 and "total 100/100" in r.stdout, r.stdout + r.stderr
    hand = str(tmp_path / "handout")
    r = course("make", hand)
    assert r.returncode == 0, r.stderr
    r = course("grade", hand)
    assert r.returncode == 0 and "total 0/100" in r.stdout, r.stdout + r.stderr
    with open(os.path.join(hand, "results.json")) as f:
        res = json.load(f)
    assert res["score"] == 0 and len(res["tests"]) == len(FULL)
    for t, (i, ex, _, pts, _) in zip(res["tests"], assignment.ROWS):
        assert t["score"] == 0 and t["max_score"] == pts and t["name"].startswith(f"exercise {ex} ")
        want = ["is blank"] if i in assignment.BY_HAND else ["NotImplementedError: ", f"exercise {ex}:"]
        assert all(w in t["output"] for w in want), t
    r = course("grade", hand, cwd=hand)  # the handout grades itself
    assert r.returncode == 0 and "total 0/100" in r.stdout, r.stdout + r.stderr
    r = course("make", hand)  # never over a copy
    assert r.returncode == 2 and r.stderr.startswith("error: ") and "not empty" in r.stderr
    r = course("make", str(tmp_path / "again"), cwd=hand)  # nor from a handout
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "from the full project" in r.stderr
    assert not (tmp_path / "again").exists()


# Each graded exercise's answers as a student could find them written down: a pattern, over
# text with − as -, ℓ as l and the whitespace collapsed, and an example that it matches
CATALOGUE = [
    # 1: the worked numbers (P_w = 0.6, P_l = 0.3), and the code of Eqs. 4-7
    (1, r"odds_l = (3/7|0\.428)", "odds_l = 3/7"),
    (1, r"(odds_ratio|\bOR) = 3\.5\b", "OR = 3.5"),
    (1, r"\b1\.252[78]", "log OR ≈ 1.2528"),
    (1, r"\b0\.2513", "L_OR ≈ 0.2513"),
    (1, r"log\(9/7\)", "L_OR = log(9/7)"),
    (1, r"(δ|delta) = (2/9|0\.222)", "δ = 2/9"),
    (1, r"log_odds_w - log_odds_l", "log_or = log_odds_w - log_odds_l"),
    (1, r"ell_w - log1mexp\(ell_w\)", "log_odds_w = ell_w - log1mexp(ell_w)"),
    (1, r"-F\.logsigmoid\(log_or\)", "return -F.logsigmoid(log_or), log_or"),
    (1, r"\(l_sft \+ lam \* l_or\)\.mean\(\)", "return (l_sft + lam * l_or).mean(), ..."),
    # 2: the stable form, and where the naive one breaks
    (2, r"log\(-(torch\.|math\.|np\.)?expm1", "torch.log(-torch.expm1(x))"),
    (2, r"\w = -math\.log\(2\)", "a = -math.log(2)"),
    (2, r"M(ae|ä)chler", "Maechler 2012"),
    (2, r"\bk = 7\b.{0,40}\bk = 8\b", "off by 1% at k = 7, -inf from k = 8"),
    # 3: the masks by hand, the mask line, Eq. 3's code
    (3, r"resp_mask = 0 0 1 1 1", "resp_mask = 0 0 1 1 1"),
    (3, r"\by = b c d e <eot>", "y = b c d e <eot>"),
    (3, r"\bp - 1:", "resp_mask[i, p - 1:n] = 1.0"),
    (3, r"seq_mask\[i, :n\] = 1", "seq_mask[i, :n] = 1.0"),
    (3, r"(target|token) `?p - 1", "the response starts at target p - 1"),
    (3, r"masked_scatter\(scored", "torch.zeros_like(resp_mask).masked_scatter(scored, tok)"),
    (3, r"resp_mask\.sum\(1\) if mean", "(resp_mask.sum(1) if mean else 1)"),
    # 4: the gradient, the sign the paper drops, and the code
    (4, r"-δ\(d\) ?[·*]? ?h\(d\)", "∇L_OR = −δ(d)·h(d)"),
    (4, r"h\(d?\)? = ∇", "h(d) = ∇ℓ_w/(1 − P_w) − ∇ℓ_l/(1 − P_l)"),
    (4, r"∇ ?l_w ?/ ?\(1 - P_w\)", "∇ℓ_w/(1 − P_w)"),
    (4, r"-1 - (λ|lam) ?[·*]? ?(δ|delta)", "∂L/∂ℓ_w = −1 − λ·δ/(1 − P_w)"),
    (4, r"\+ ?(λ|lam) ?[·*]? ?(δ|delta) ?/ ?\(1 - P_l\)", "∂L/∂ℓ_l = +λ·δ/(1 − P_l)"),
    (4, r"(δ|delta) ?/ ?\(1 ?- ?P_w\)", "dL_OR/dℓ_w = -delta/(1-P_w)"),
    (4, r"-1 ?/ ?(torch\.)?expm1\(", "inv_w = -1 / torch.expm1(ell_w)"),
    (4, r"drops? (the|its|a) minus", "the paper's Eqs. 8 and 20 drop the minus"),
    (4, r"minus sign that its Eqs", "with the minus sign that its Eqs. 8 and 20 drop"),
    (4, r"per_tok\(resp_mask\[:B\]\) - per_tok\(seq_mask", "(per_tok(resp_mask[:B]) - per_tok(seq_mask[:B])) / B"),
    (4, r"onehot\(y_t\) - softmax", "dlogp_t/dlogits_t = onehot(y_t) - softmax_t"),
    # 10: SimPO's code, and the written answer
    (10, r"logsigmoid\(beta \* \(ell_w - ell_l\) - gamma\)", "-F.logsigmoid(beta * (ell_w - ell_l) - gamma)"),
    (10, r"return l_or\.mean\(\), pair_means", "return l_or.mean(), pair_means(...)"),
    (10, r"pushing both down", "it widens the margin by pushing both down"),
    # 11: DPO's code, and the written answers
    (11, r"\(pi\[:B\] - ref\[:B\]\) - \(pi\[B:\] - ref\[B:\]\)",
     "z = beta * ((pi[:B] - ref[:B]) - (pi[B:] - ref[B:]))"),
    (11, r"logsigmoid\(z\)\.mean\(\)", "return -F.logsigmoid(z).mean()"),
    (11, r"log ?2 ?(≈|=) ?0\.69", "the loss is log 2 ≈ 0.693 for every β"),
    (11, r"\bL = log ?2\b", "step 1: policy = reference, so L = log 2"),
    (11, r"1 \+ 1/3\)", "300 × (1 + 1/3) = 400"),
    (11, r"β ?/ ?2 ?[×*] ?∇", "the gradient is about β/2 × ∇(π_w − π_l)"),
]
# The written answers of course/teacher/rubric.md, and the findings of the runs that the
# exercises ask the student to predict or explain, as the rubric or experiments/RESULTS.md
# state them
WRITTEN = [
    (1, r"1/\(1 - P\)`?,? which grows with `?P", "multiplies each P by 1/(1 − P), which grows with P"),
    (2, r"lost in `?exp\(x\)`? itself", "the digits are lost in exp(x) itself"),
    (5, r"\bshare most (of their )?tokens", "chosen and rejected answers share most tokens"),
    (5, r"raises those shared tokens|shared template", "SFT learns the shared template"),
    (5, r"rejected answers,? (which )?carry (the flaw much more|more of it)", "the rejected answers carry more of it"),
    (6, r"does most of the work|gives a good part of the (λ|lam) = 1", "λ = 0.1 does most of the work"),
    (6, r"likelihood over every token", "a likelihood over every token, flaws included"),
    (6, r"2\.98, 4\.98, 5\.74, 6\.18", "final margin 2.98, 4.98, 5.74, 6.18"),
    (7, r"share of `?L_SFT`?'s pull", "the response's share of L_SFT's pull falls"),
    (8, r"log OR`? (has the wider spread|spreads about twice)", "log OR has the wider spread"),
    (8, r"\b2\.56\b.{0,20}\b1\.41\b", "standard deviation 2.56 against 1.41"),
    (8, r"log\(1 - P\) ≈ -P|nearly coincide", "there log(1 − P) ≈ −P ≈ 0"),
    (8, r"(probability ratio|narrower contrast) needs the rejected", "the narrower contrast needs the rejected answer pushed further"),
    (9, r"prefers whichever answer is shorter|sum measures length", "the sum measures length first"),
    (9, r"(right|100%) (for every pair whose|of the time when the) chosen answer is shorter",
     "right 100% of the time when the chosen answer is shorter"),
    (9, r"saturates early|σ\(-contrast\)`?,? vanishes", "L_OR saturates early and stops pushing"),
    (11, r"`?L_SFT`? (has no counterpart|trains the end-of-text)", "ORPO's L_SFT has no counterpart in DPO"),
    (11, r"answers stop ending", "DPO's answers stop ending"),
    (11, r"constant drops out", "the reference's constant drops out"),
]


def norm(text):
    return " ".join(text.replace("−", "-").replace("ℓ", "l").split())


def answers_in(folder, names=None):
    """(file, exercise, pattern) for each catalogue entry that a text file in folder (or the
    files `names` of it) holds."""
    if names is None:
        names = [os.path.relpath(os.path.join(d, n), folder) for d, _, ns in os.walk(folder) for n in ns]
    hits = []
    for name in names:
        try:
            with open(os.path.join(folder, name), encoding="utf-8") as f:
                text = norm(f.read())
        except UnicodeDecodeError:
            continue
        hits += [(name, ex, pat) for ex, pat, _ in CATALOGUE + WRITTEN if re.search(pat, text)]
    return sorted(hits)


def test_the_handout_holds_no_answer_and_a_planted_one_is_found(tmp_path):
    assert {ex for ex, _, _ in CATALOGUE} == {1, 2, 3, 4, 10, 11}
    assert {ex for ex, _, _ in WRITTEN} == {1, 2, 5, 6, 7, 8, 9, 11}
    assert [e for e in CATALOGUE + WRITTEN if not re.search(e[1], norm(e[2]))] == []
    hand = tmp_path / "handout"
    assignment.make(str(hand))
    assert answers_in(hand) == []
    readme = hand / "README.md"
    clean = readme.read_text()
    for ex, pat, example in CATALOGUE + WRITTEN:  # each entry, planted in the README, is found
        readme.write_text(f"{clean}\n{example}\n")
        hits = answers_in(hand)
        assert ("README.md", ex, pat) in hits and {h[0] for h in hits} == {"README.md"}, example
    # the catalogue is of this project's answers: each is in a file the handout leaves out
    # or cuts (orpo.py, README.md, GRADIENT.md, course/teacher/, experiments/RESULTS.md)
    found = {pat for _, _, pat in answers_in(ROOT, assignment.project_files())}
    assert [pat for _, pat, _ in CATALOGUE + WRITTEN if pat not in found] == []
    written = {pat for _, _, pat in answers_in(ROOT, ["course/teacher/rubric.md"])}
    assert {ex for ex, pat, _ in WRITTEN if pat in written} == {ex for ex, _, _ in WRITTEN}


def test_handout_leaves_out_the_solutions_and_keeps_the_rest(tmp_path):
    hand = str(tmp_path / "handout")
    assignment.make(hand)
    for name in ("GRADIENT.md", "course/TEACHING.md", "course/teacher", "tests/test_assignment.py",
                 "tests/assignment_freeze.py", "tests/test_exercises.py", "experiments/RESULTS.md"):
        assert not os.path.exists(os.path.join(hand, name)), name
    assert [n for d, _, ns in os.walk(hand) for n in ns if n.endswith(".png")] == []  # results
    with open(os.path.join(hand, "orpo.py")) as f:
        src = f.read()
    for answer in ("per_tok(seq_mask", "-1 / torch.expm1", "dL_OR/dℓ_w", "p - 1:n", "logsigmoid"):
        assert answer not in src and answer in SOLUTION, answer
    with open(os.path.join(hand, "README.md")) as f:  # the student's, with links that resolve
        readme = f.read()
    with open(assignment.STUDENT_README) as f:
        assert readme == f.read()
    for d, _, names in os.walk(hand):
        for name in (n for n in names if n.endswith(".md")):
            with open(os.path.join(d, name)) as f:
                for target in assignment.LINK.findall(f.read()):
                    assert target[1].startswith("https://") or os.path.exists(
                        os.path.join(d, target[1])), (name, target)
    for name, tests in assignment.DROP_TESTS.items():  # each named test exists, and goes
        with open(os.path.join(ROOT, name)) as f, open(os.path.join(hand, name)) as g:
            full, kept = f.read(), g.read()
        assert all(f"def {t}(" in full and f"def {t}(" not in kept for t in tests), name
    assert "test_masks_cover_exactly_the_response_tokens" in open(os.path.join(hand, "tests", "test_loss.py")).read()
    # outside the holes the handout is the solution, statement for statement, and the code
    # that names a hole reached
    holes = {q.split(".")[0] for q in assignment.HOLES} | {"make_batch", "train"}
    rest = lambda s: [ast.dump(n) for n in ast.parse(s).body if getattr(n, "name", "") not in holes]
    injected = rest(assignment.HOLES_LEFT)
    assert [n for n in rest(src) if n not in injected] == rest(SOLUTION) and len(injected) == 3
    r = subprocess.run([sys.executable, "orpo.py", "--help"], cwd=hand, capture_output=True, text=True)
    assert r.returncode == 0 and "--lam" in r.stdout  # what needs no hole runs


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
    answer fails here (then rerun `python -m tests.assignment_freeze`, on purpose)."""
    with open(assignment.REF) as f:
        frozen = json.load(f)
    same(json.loads(json.dumps(assignment_freeze.compute_refs())), frozen)
    assert os.path.getsize(assignment.REF) < 200_000
    cases = frozen["rows"]["1c"]  # every objective, at lam 0, 0.1 and 1, and L_SFT over the prompt
    assert {c["fn"] for c in cases} == {"orpo_loss", "prob_ratio_loss"} and any(c["sft_on_prompt"] for c in cases)
    assert {c["lam"] for c in cases} >= {0.0, 0.1, 1.0} and {c["fn"] for c in frozen["rows"]["10b"]} == {"simpo_objective"}


def test_grade_refuses_a_folder_without_orpo_and_a_bad_command(tmp_path):
    r = course("grade", str(tmp_path))
    assert r.returncode == 2 and r.stderr.startswith("error: ") and "no orpo.py" in r.stderr
    assert os.listdir(tmp_path) == []
    r = course("freeze")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "usage: python -m course.assignment" in r.stderr


def test_a_hole_reached_in_a_handout_is_one_line_naming_its_exercise(tmp_path):
    """A run stops before any work naming the first hole, and so does a figure; a hole that
    another command reaches is one line too; any other error keeps its traceback."""
    d = tmp_path / "handout"
    assert course("make", str(d)).returncode == 0
    run = lambda *args: subprocess.run([sys.executable, *args], cwd=d, capture_output=True,
                                       text=True, timeout=300)
    for args in (["orpo.py", "--config", "tiny"], ["-m", "experiments.figures", "sft-vs-orpo", "--config", "tiny"]):
        r = run(*args)  # the handout's own orpo.py, and a figure that trains with it
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr
        assert r.stderr.startswith("error: fill the holes first, from exercise 1: ")
        assert not (d / "out-tiny").exists()  # before any work
    r = run("-c", "import orpo, torch; orpo.log1mexp(-torch.ones(1))")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "exercise 2: log(1 - e^x)" in r.stderr
    r = run("-c", "import orpo; raise NotImplementedError('not a hole')")
    assert r.returncode == 1 and "Traceback" in r.stderr  # anything else: Python's own report
    r = run("orpo.py", "--help")
    assert r.returncode == 0 and "--lam" in r.stdout


def fill(src, names):
    """A handout's orpo.py with the top-level definitions `names` as the solution has them."""
    sol_lines, lines = SOLUTION.splitlines(), src.splitlines()
    sol = {n.name: n for n in ast.parse(SOLUTION).body if hasattr(n, "name")}
    for n in sorted((n for n in ast.parse(src).body if getattr(n, "name", "") in names),
                    key=lambda n: -n.lineno):
        lines[n.lineno - 1:n.end_lineno] = sol_lines[sol[n.name].lineno - 1:sol[n.name].end_lineno]
    return "\n".join(lines) + "\n"


def checks(exercises, n):
    """The checks that section n of EXERCISES.md names: its pytest, python -c and grade lines."""
    text = exercises.split(f"\n## {n}. ")[1].split("\n## ")[0]
    lines = [l for b in re.findall(r"```bash\n(.*?)```", text, re.S) for l in b.splitlines()]
    return [shlex.split(l.split("  #")[0]) for l in lines if l.startswith((
        "python -m pytest", "python -c", "python -m course.assignment grade", "python assignment.py"))]


def test_each_exercise_checks_out_once_it_and_the_earlier_ones_are_filled(tmp_path):
    hand = tmp_path / "handout"
    assignment.make(str(hand))
    exercises = (hand / "course" / "EXERCISES.md").read_text()
    names, rows = {}, {r[0]: r[1] for r in assignment.ROWS}
    for q, msg in assignment.HOLES.items():
        names.setdefault(int(msg.split()[1][:-1]), set()).add(q.split(".")[0])
    names[3].add("make_batch")  # its mask lines
    key = dict(l.split(" = ", 1) for l in KEY.splitlines() if " = " in l and l[0] != "#")
    by_hand = {1: ("odds_w", "odds_l", "odds_ratio", "log_or", "l_or", "delta", "prob_ratio"),
               3: ("x", "y", "resp_mask", "seq_mask")}
    src, answers = (hand / "orpo.py").read_text(), (hand / "answers.txt").read_text()
    assert sorted(names) == [1, 2, 3, 4, 10, 11]
    for n in sorted(names):  # in order, each exercise's holes filled as the solution has them
        src = fill(src, names[n])
        (hand / "orpo.py").write_text(src)
        for k in by_hand.get(n, ()):
            answers = answers.replace(f"\n{k} =\n", f"\n{k} = {key[k]}\n")
        (hand / "answers.txt").write_text(answers)
        assert n in (1, 11) or [c for c in checks(exercises, n) if "grade" not in c], n
        for cmd in checks(exercises, n):
            r = subprocess.run([sys.executable, *cmd[1:]], cwd=hand, capture_output=True,
                               text=True, timeout=600)
            assert r.returncode == 0, (n, cmd, r.stdout[-3000:] + r.stderr[-2000:])
        got = grade(str(hand))  # this exercise's rows and the earlier ones', and no other
        assert {i: s for i, (s, _) in got.items()} == {
            i: FULL[i] if rows[i] <= n else 0 for i in FULL}, (n, got)
    r = subprocess.run([sys.executable, "orpo.py", "--config", "tiny", "--n_samples=8"], cwd=hand,
                       capture_output=True, text=True, timeout=300)  # filled: it trains
    assert r.returncode == 0 and "== summary" in r.stdout, r.stderr


def test_what_the_handout_readme_says_runs_before_the_holes_runs(tmp_path):
    hand = tmp_path / "handout"
    assignment.make(str(hand))
    text = (hand / "README.md").read_text().split("## What runs before the holes are filled")[1]
    block = re.search(r"```bash\n(.*?)```", text, re.S)[1]
    cmds = [shlex.split(l.split("  #")[0]) for l in block.splitlines() if l.strip()]
    assert len(cmds) >= 4 and all(c[0] == "python" for c in cmds)
    for cmd in cmds:
        r = subprocess.run([sys.executable, *cmd[1:]], cwd=hand, capture_output=True, text=True,
                           timeout=600)
        assert r.returncode == 0 and "Traceback" not in r.stderr, (cmd, r.stdout[-2000:] + r.stderr)


def test_gradescope_package_grades_a_solution_a_blank_handout_and_a_mistake(tmp_path):
    """The package as Gradescope unpacks it (AUTOGRADER_ROOT for /autograder; this Python
    for the one setup.sh installs), run on three submissions."""
    r = course("autograder", str(tmp_path / "package"))
    assert r.returncode == 0 and "autograder.zip" in r.stdout, r.stderr
    with zipfile.ZipFile(tmp_path / "package" / "autograder.zip") as z:
        names = z.namelist()
        assert {"setup.sh", "run_autograder", "handout/orpo.py", "handout/tests/assignment_ref.json"} <= set(names)
        assert {n.split("/")[0] for n in names} == {"setup.sh", "run_autograder", "handout"}
        assert z.getinfo("run_autograder").external_attr >> 16 & 0o111  # executable
        hand = {n: z.read(f"handout/{n}").decode() for n in ("orpo.py", "answers.txt")}
    assert subprocess.run(["bash", "-n", str(tmp_path / "package" / "setup.sh")]).returncode == 0
    mistake = wrong("4a", WRONG[0][2])  # the paper's sign: row 4a's 10 points
    for name, (src, key), want in (("solution", (SOLUTION, KEY), 100), ("mistake", mistake, 90),
                                   ("blank", (hand["orpo.py"], hand["answers.txt"]), 0)):
        root = tmp_path / name  # /autograder
        with zipfile.ZipFile(tmp_path / "package" / "autograder.zip") as z:
            z.extractall(root / "source")
        copy(root / "submission", src, key)
        r = subprocess.run(["bash", str(root / "source" / "run_autograder")], capture_output=True, text=True,
                           env={**os.environ, "AUTOGRADER_ROOT": str(root), "PYTHON": sys.executable}, timeout=300)
        assert r.returncode == 0, r.stdout + r.stderr
        text = (root / "results" / "results.json").read_text()
        res = json.loads(text)
        assert res["score"] == want and "Traceback" not in text, (name, res)
        assert [(t["score"], t["max_score"]) for t in res["tests"] if t["score"] < t["max_score"]] == (
            [] if want == 100 else [(0, 10)] if want == 90 else [(0, p) for p in FULL.values()])
