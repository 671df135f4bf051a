"""
The course kit: the executable lecture runs as a plain script, and the exercise grader grades.
"""

import os
import re
import subprocess
import sys

from tests.helpers import REPO

def test_walkthrough_runs_as_a_plain_script():
    res = subprocess.run([sys.executable, "course/walkthrough.py"], cwd=REPO, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "DIFFER" not in res.stdout and "checks agree" in res.stdout
    cells = open(os.path.join(REPO, "course", "walkthrough.py")).read().count("# %%")
    assert cells >= 15  # opens as a notebook of cells


def grade(package=None, env_extra=None):
    env = {**os.environ, **({"EXERCISES": package} if package else {}), **(env_extra or {})}
    env.pop("TRITON_INTERPRET", None)
    return subprocess.run([sys.executable, "-m", "pytest", "course/exercises", "-q", "-p", "no:cacheprovider"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def test_exercise_grader_accepts_the_key_rejects_the_stubs_and_explains_a_wrong_answer(tmp_path):
    key = grade("solutions")
    assert key.returncode == 0 and "9 passed" in key.stdout, key.stdout[-3000:]
    stubs = grade()
    assert stubs.returncode == 1 and "9 failed" in stubs.stdout
    # each stub named once at least (the short summary may repeat it, depending on terminal width)
    unwritten = set(re.findall(r"(ex\d_\w+)\.\w+ is not written yet", stubs.stdout))
    assert len(unwritten) == 9, stubs.stdout[-3000:]
    wrong = tmp_path / "wrong"  # the key with two bugs in one exercise: ties to the higher index, gates unscaled
    import shutil
    shutil.copytree(os.path.join(REPO, "course", "solutions"), wrong)
    src = (wrong / "ex1_topk.py").read_text()
    src = src.replace("(-row[e], e)", "(-row[e], -e)").replace("return w / w.sum(dim=1, keepdim=True)", "return w")
    (wrong / "ex1_topk.py").write_text(src)
    res = grade("wrong", {"PYTHONPATH": str(tmp_path)})
    assert res.returncode == 1 and "1 failed, 8 passed" in res.stdout, res.stdout[-3000:]
    # one run reports both: every check of the exercise runs before the verdict
    assert "ties go to the lower expert index" in res.stdout and "gates(renormalize=True): differs" in res.stdout


def test_the_exercises_folder_is_the_handout():
    """Handing out = copying course/exercises: it holds the stubs and the grader, and no answer."""
    names = sorted(os.listdir(os.path.join(REPO, "course", "exercises")))
    assert not [n for n in names if "solution" in n]
    stubs = [n for n in names if n.startswith("ex") and n.endswith(".py")]
    assert len(stubs) == 9 and all("raise NotImplementedError"
                                   in open(os.path.join(REPO, "course", "exercises", n)).read()
                                   for n in stubs)
