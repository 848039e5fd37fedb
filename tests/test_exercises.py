"""Each exercise's own checks catch its likely mistakes. For every exercise of
course/EXERCISES.md that names checks (its pytest, python -c and grade lines), a catalogue of
realistic wrong answers, each a set of source edits of orpo.py. A wrong answer is written into
a copy of the project and the exercise's checks run there, as a student runs them: one must
fail, and its failure must name the quantity that is wrong. The solution passes them all.
The grader's own catalogue of wrong answers is tests/test_assignment.py's."""
import ast
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections import namedtuple
from concurrent.futures import ThreadPoolExecutor

import pytest

from conftest import ROOT

with open(os.path.join(ROOT, "course", "EXERCISES.md")) as f:
    EXERCISES = f.read()
with open(os.path.join(ROOT, "orpo.py")) as f:
    SOLUTION = f.read()

# A wrong answer: its exercise, an id, what the failing check must say (in pytest's E lines,
# or in a grade or python -c line's output), and its edits [(function or Class.method, the
# solution's text, the wrong text)]; the solution's text must be in that function, once.
Case = namedtuple("Case", "n id says edits")
M = lambda n, id, says, *edits: Case(n, f"ex{n}-{id}", says, list(edits))
MUTANTS = [
    # 1: odds_ratio_loss, orpo_loss, prob_ratio_loss
    M(1, "log-or-swapped", "log OR",
      ("odds_ratio_loss", "log_odds_w - log_odds_l", "log_odds_l - log_odds_w")),
    M(1, "log-odds-plus", "log OR", ("odds_ratio_loss", "ell_w - log1mexp(ell_w)", "ell_w + log1mexp(ell_w)"),
      ("odds_ratio_loss", "ell_l - log1mexp(ell_l)", "ell_l + log1mexp(ell_l)")),
    M(1, "l-or-sign", "L_OR",
      ("odds_ratio_loss", "-F.logsigmoid(log_or), log_or", "F.logsigmoid(log_or), log_or")),
    M(1, "lam-dropped", "orpo_loss: the loss", ("orpo_loss", "(l_sft + lam * l_or)", "(l_sft + l_or)")),
    M(1, "sum-over-pairs", "orpo_loss: the loss",
      ("orpo_loss", "(l_sft + lam * l_or).mean()", "(l_sft + lam * l_or).sum()")),
    M(1, "sign-slip", "orpo_loss: the loss", ("orpo_loss", "(l_sft + lam * l_or)", "(l_sft - lam * l_or)")),
    M(1, "own-l-sft", "orpo_loss: the loss", ("orpo_loss", "(l_sft + lam * l_or)", "(-ell_w + lam * l_or)")),
    M(1, "prob-swapped", "prob_ratio_loss",
      ("prob_ratio_loss", "log_ratio = ell_w - ell_l", "log_ratio = ell_l - ell_w")),
    M(1, "prob-of-ratio-of-logs", "prob_ratio_loss",
      ("prob_ratio_loss", "log_ratio = ell_w - ell_l", "log_ratio = ell_w / ell_l")),
    # 2: log1mexp
    M(2, "naive-log1p", "log1mexp",
      ("log1mexp", "    a = -math.log(2)\n", "    return torch.log1p(-torch.exp(x))\n")),
    M(2, "naive-log", "log1mexp",
      ("log1mexp", "    a = -math.log(2)\n", "    return torch.log(1 - torch.exp(x))\n")),
    M(2, "unclamped-branch", "log1mexp", ("log1mexp", "torch.exp(x.clamp(max=a))", "torch.exp(x)")),
    M(2, "expm1-everywhere", "log1mexp",
      ("log1mexp", "    a = -math.log(2)\n", "    return torch.log(-torch.expm1(x))\n")),
    # 3: make_batch's mask lines, response_logps
    M(3, "resp-one-late", "resp_mask", ("make_batch", "resp_mask[i, p - 1:n]", "resp_mask[i, p:n]")),
    M(3, "resp-one-early", "resp_mask", ("make_batch", "resp_mask[i, p - 1:n]", "resp_mask[i, p - 2:n]")),
    M(3, "resp-without-eot", "resp_mask", ("make_batch", "resp_mask[i, p - 1:n]", "resp_mask[i, p - 1:n - 1]")),
    M(3, "seq-over-padding", "seq_mask", ("make_batch", "seq_mask[i, :n] = 1.0", "seq_mask[i, :] = 1.0")),
    M(3, "seq-response-only", "seq_mask",
      ("make_batch", "seq_mask[i, :n] = 1.0", "seq_mask[i, p - 1:n] = 1.0")),
    M(3, "logps-summed", "response_logps: ell", ("response_logps", "(resp_mask.sum(1) if mean else 1)", "1")),
    M(3, "logps-over-scored", "response_logps: ell",
      ("response_logps", "(resp_mask.sum(1) if mean else 1)", "(scored.sum(1) if mean else 1)")),
    # 4: orpo_grad, HandORPO.backward
    M(4, "papers-sign", "orpo_grad", ("orpo_grad", "(-1 - lam * delta * inv_w)", "(-1 + lam * delta * inv_w)"),
      ("orpo_grad", "(lam * delta * inv_l) / B", "(-lam * delta * inv_l) / B")),
    M(4, "rejected-sign", "orpo_grad",
      ("orpo_grad", "(lam * delta * inv_l) / B", "(-lam * delta * inv_l) / B")),
    M(4, "no-1/(1-P)", "orpo_grad", ("orpo_grad", "inv_w = -1 / torch.expm1(ell_w)", "inv_w = 1"),
      ("orpo_grad", "inv_l = -1 / torch.expm1(ell_l)", "inv_l = 1")),
    M(4, "no-1/B", "orpo_grad", ("orpo_grad", "(-1 - lam * delta * inv_w) / B", "(-1 - lam * delta * inv_w)"),
      ("orpo_grad", "(lam * delta * inv_l) / B", "(lam * delta * inv_l)")),
    M(4, "lam-dropped", "orpo_grad", ("orpo_grad", "(-1 - lam * delta * inv_w)", "(-1 - delta * inv_w)"),
      ("orpo_grad", "(lam * delta * inv_l)", "(delta * inv_l)")),
    M(4, "naive-1/(1-P)", "orpo_grad", ("orpo_grad", "-1 / torch.expm1(ell_w)", "1 / (1 - torch.exp(ell_w))"),
      ("orpo_grad", "-1 / torch.expm1(ell_l)", "1 / (1 - torch.exp(ell_l))")),
    M(4, "backward-drops-g_loss", "HandORPO.backward",
      ("HandORPO.backward", "(g_loss * g_tok[scored])", "g_tok[scored]")),
    M(4, "backward-response-only-sft", "HandORPO.backward",
      ("HandORPO.backward", "g_tok[:B] += (per_tok(resp_mask[:B]) - per_tok(seq_mask[:B])) / B", "pass")),
    # 7: the test that pins down L_SFT over the prompt too (sft_loss is read, not written)
    M(7, "on-prompt-summed", "sft_loss(on_prompt=True)",
      ("sft_loss", "(logp * seq_mask)[:B].sum(1) / seq_mask[:B].sum(1)", "(logp * seq_mask)[:B].sum(1)")),
    # 10: simpo_loss, simpo_objective
    M(10, "no-gamma", "simpo_loss", ("simpo_loss", "(ell_w - ell_l) - gamma", "(ell_w - ell_l)")),
    M(10, "gamma-sign", "simpo_loss", ("simpo_loss", "(ell_w - ell_l) - gamma", "(ell_w - ell_l) + gamma")),
    M(10, "l-sft-kept", "simpo_objective",
      ("simpo_objective", "return l_or.mean(),", "return (l_sft + l_or).mean(),")),
    M(10, "lam-weighs-it", "simpo_objective",
      ("simpo_objective", "return l_or.mean(),", "return (lam * l_or).mean(),")),
    M(10, "log-or-as-odds", "simpo_objective: parts['log_or']",
      ("simpo_objective", "ell_w, ell_l, ell_w - ell_l)", "ell_w, ell_l, odds_ratio_loss(ell_w, ell_l)[1])")),
    # 11: dpo_loss, and the summed log-probs it is given
    M(11, "sign-slip", "dpo_loss", ("dpo_loss", "-F.logsigmoid(z)", "-F.logsigmoid(-z)")),
    M(11, "beta-one-side", "dpo_loss", ("dpo_loss", "beta * ((pi[:B] - ref[:B]) - (pi[B:] - ref[B:]))",
                                        "beta * (pi[:B] - ref[:B]) - (pi[B:] - ref[B:])")),
    M(11, "sum-over-pairs", "dpo_loss", ("dpo_loss", "-F.logsigmoid(z).mean()", "-F.logsigmoid(z).sum()")),
    M(11, "means-not-sums", "SUMMED", ("forward", "response_logps(t, resp_mask, scored, mean=False)",
                                       "response_logps(t, resp_mask, scored)")),
]
CHECKED = sorted({c.n for c in MUTANTS})
SOLVED = [Case(n, f"solution-{n}", None, []) for n in CHECKED]
CHECK = ("python -m pytest", "python -c", "python -m course.assignment grade")


def checks(n):
    """The checks that section n of EXERCISES.md names, in order, from its bash blocks."""
    text = EXERCISES.split(f"\n## {n}. ")[1].split("\n## ")[0]
    lines = [l for b in re.findall(r"```bash\n(.*?)```", text, re.S) for l in b.splitlines()]
    return [shlex.split(l.split("  #")[0]) for l in lines if l.startswith(CHECK)]


def mutate(src, edits):
    """src with each edit made inside its function (or Class.method)."""
    for qualname, old, new in edits:
        tree = ast.parse(src)
        node = next(n for n in tree.body if getattr(n, "name", "") == qualname.split(".")[0])
        for part in qualname.split(".")[1:]:
            node = next(n for n in node.body if getattr(n, "name", "") == part)
        lines = src.splitlines(keepends=True)
        body = "".join(lines[node.lineno - 1:node.end_lineno])
        assert body.count(old) == 1, f"{qualname} no longer holds {old!r}: update the catalogue"
        src = "".join(lines[:node.lineno - 1]) + body.replace(old, new) + "".join(lines[node.end_lineno:])
    return src


def project_copy(dst, src):
    """What the checks read, with orpo.py's source src: the reference, machinery, the tests,
    the course's grader (no runs, figures or data)."""
    skip = shutil.ignore_patterns("__pycache__", ".pytest_cache", "reference", "data", "*.png")
    for name in ("model.py", "prepare_data.py", "machinery", "tests", "course"):
        (shutil.copytree if os.path.isdir(os.path.join(ROOT, name)) else shutil.copy2)(
            os.path.join(ROOT, name), os.path.join(dst, name), **({} if "." in name else {"ignore": skip}))
    with open(os.path.join(dst, "orpo.py"), "w") as f:
        f.write(src)


def run_case(case, dst):
    """The exercise's checks in a copy: [(command, failed, output)], up to the first that
    fails. A wrong answer's pytest lines get -x: they fail or pass as without it, sooner."""
    project_copy(dst, mutate(SOLUTION, case.edits))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = []
    for cmd in checks(case.n):
        fast = ["-x"] if case.edits and cmd[1:3] == ["-m", "pytest"] else []
        r = subprocess.run([sys.executable, *cmd[1:], *fast], cwd=dst, env=env, capture_output=True,
                           text=True, timeout=600)
        out = r.stdout + r.stderr
        done.append((shlex.join(cmd), r.returncode != 0 or bool(re.search(r"\bFAIL\b", out)), out))
        if done[-1][1]:
            break
    return done


@pytest.fixture(scope="module")
def results(request, tmp_path_factory):
    """Every selected case of this file, run two at a time from the first test on: id -> its
    future run_case."""
    cases = [i.callspec.params["case"] for i in request.session.items
             if i.module.__name__ == __name__ and hasattr(i, "callspec") and "case" in i.callspec.params]
    pool = ThreadPoolExecutor(2)
    try:
        yield {c.id: pool.submit(run_case, c, tmp_path_factory.mktemp("copy")) for c in cases}
    finally:
        pool.shutdown(cancel_futures=True)


def test_the_catalogue_covers_each_exercise_that_names_checks():
    named = [int(m) for m in re.findall(r"\n## (\d+)\. ", EXERCISES) if checks(int(m))]
    assert named == CHECKED
    assert len({c.id for c in MUTANTS + SOLVED}) == len(MUTANTS + SOLVED)
    for c in MUTANTS:
        assert mutate(SOLUTION, c.edits) != SOLUTION, c.id


@pytest.mark.parametrize("case", SOLVED, ids=lambda c: c.id)
def test_the_solution_passes_each_exercises_checks(case, results):
    done = results[case.id].result()
    assert len(done) == len(checks(case.n)), [d[:2] for d in done]
    for cmd, failed, out in done:
        assert not failed, f"exercise {case.n}: `{cmd}` fails on the solution:\n{out[-3000:]}"


@pytest.mark.parametrize("case", MUTANTS, ids=lambda c: c.id)
def test_each_wrong_answer_fails_its_exercises_checks_naming_it(case, results):
    done = results[case.id].result()
    cmd, failed, out = done[-1]
    assert failed, f"exercise {case.n}'s checks all pass with {case.id}: {[d[0] for d in done]}"
    said = "\n".join(l for l in out.splitlines() if l.startswith("E ")) if "pytest" in cmd else out
    assert case.says in said, f"`{cmd}` fails, but never says {case.says!r}:\n{(said or out)[-3000:]}"
