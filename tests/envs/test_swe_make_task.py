"""A task built by ``python -m envs.swe.make_task`` from a working package, a bug diff and tests is a
task the config accepts and the grader scores: its gold patch 1, the untouched bug 0."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from envs.config import EnvConfig
from envs.registry import kind_tasks
from envs.swe.env import SWEEnv
from envs.swe.grading import apply_patch
from envs.swe.make_task import main, make_task
from envs.swe.task import TaskError
from envs.tool_parsing import ToolCall

BUG = """--- a/calc/__init__.py
+++ b/calc/__init__.py
@@ -1,4 +1,4 @@
 def add(a, b):
-    return a + b
+    return a - b if b > 1 else a + b


"""
HIDDEN_TESTS = """--- a/tests/test_calc.py
+++ b/tests/test_calc.py
@@ -6,2 +6,6 @@
 def test_mul():
     assert mul(2, 3) == 6
+
+
+def test_add_hidden():
+    assert add(5, 5) == 10
"""


@pytest.fixture
def source(tmp_path):
    src = tmp_path / "calc-src"
    (src / "calc").mkdir(parents=True)
    (src / "tests").mkdir()
    (src / "calc/__init__.py").write_text(
        "def add(a, b):\n    return a + b\n\n\ndef mul(a, b):\n    return a * b\n"
    )
    (src / "tests/test_calc.py").write_text(
        "import pytest\n\nfrom calc import add, mul\n\n\n"
        "def test_mul():\n    assert mul(2, 3) == 6\n"
        "\n\n@pytest.mark.parametrize('a,b', [(1, 1), (2, 2)])\ndef test_add(a, b):\n    assert add(a, b) == a + b\n"
    )
    return src


def test_cli_builds_a_task_the_config_accepts(source, tmp_path):
    bug = tmp_path / "bug.diff"
    bug.write_text(BUG)
    out = tmp_path / "tasks/calc__add"
    args = [str(source), "--bug", str(bug), "--problem", "add(2, 2) is 0", "--out", str(out)]
    assert main(args) == 0
    task = json.loads((out / "task.json").read_text())
    assert task["FAIL_TO_PASS"] == ["tests/test_calc.py::test_add[2-2]"]
    assert task["PASS_TO_PASS"] == ["tests/test_calc.py::test_add[1-1]", "tests/test_calc.py::test_mul"]
    assert "a - b" in (out / "repo/calc/__init__.py").read_text() and task["patch"].startswith("--- a/calc/")
    EnvConfig(kind="swe", max_turns=4, tasks=[str(out)]).validate()
    assert [t.instance_id for t in kind_tasks("swe", [str(out)])] == ["calc__add"]
    assert main(args) == 2  # the output directory is not empty any more
    res = subprocess.run(
        [sys.executable, "-m", "envs.swe.make_task", "--help"], capture_output=True, text=True, check=False
    )
    assert res.returncode == 0 and "--bug" in res.stdout


def test_a_bug_no_test_catches_is_refused(source, tmp_path):
    harmless = BUG.replace("a - b if b > 1 else a + b", "b + a")
    with pytest.raises(TaskError, match="do not catch it"):
        make_task(str(source), harmless, "nothing", str(tmp_path / "out"))
    for tests in (["."], ["calc"], ["calc/__init__.py"]):  # the grader would restore the bug
        with pytest.raises(TaskError, match="apart from the source"):
            make_task(str(source), BUG, "nothing", str(tmp_path / "out"), tests=tests)


@pytest.mark.asyncio
async def test_built_task_is_graded_in_a_sandbox(source, tmp_path, backend):
    task = make_task(
        str(source), BUG, "add() is wrong for b > 1", str(tmp_path / "out"), test_patch=HIDDEN_TESTS,
        tests=["tests"],
    )  # fmt: skip
    assert "tests/test_calc.py::test_add_hidden" in task.FAIL_TO_PASS
    assert (
        "add_hidden" not in (tmp_path / "out/repo/tests/test_calc.py").read_text()
    )  # the model does not see it
    for patch, want in (("", 0.0), (task.patch, 1.0)):
        env = SWEEnv(backend.create, max_turns=3)
        await env.reset(task)
        await apply_patch(env.sandbox, patch, "gold")
        result = await env.step(ToolCall("finish", {}))
        await env.close()
        assert result.reward == want, result.info
    assert not os.path.exists(tmp_path / "out/repo/.mopd-junit.xml")
