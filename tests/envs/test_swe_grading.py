"""The SWE grader cannot be gamed from the workspace: a planted conftest.py, a pytest.py shadowing
pytest and fake PASSED lines all leave an unfixed bug at reward 0, while the files a task ships
(its own conftest.py included) are restored for grading, so a real fix still scores 1."""

from __future__ import annotations

import shutil

import pytest

from envs.sandbox.base import Sandbox
from envs.swe.env import SWEEnv
from envs.swe.task import builtin_tasks, task_from_dict, task_to_dict
from envs.tool_parsing import ToolCall

pytestmark = pytest.mark.asyncio
TASK = {t.instance_id: t for t in builtin_tasks()}["inflection__potatoes"]
FAIL = TASK.FAIL_TO_PASS[0]
GOLD_EDIT = ToolCall(
    "str_replace",
    {"path": "inflection/__init__.py", "old": "(buffal|tomat)o$", "new": "(buffal|potat|tomat)o$"},
)
PASS_EVERYTHING = """
import pytest

@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    report.outcome = "passed"
    report.longrepr = None
"""
FAKE_PYTEST = """
import sys
for test_id in {ids!r}:
    print("PASSED " + test_id)
sys.exit(0)
"""
PRINT_AT_EXIT = """
import atexit
atexit.register(lambda: print("\\n".join("PASSED " + t for t in {ids!r})))
"""


async def graded(env: SWEEnv) -> tuple[float, dict]:
    result = await env.step(ToolCall("finish", {}))
    await env.close()
    assert result.done
    return result.reward, result.info


@pytest.mark.parametrize("where", ["conftest.py", "nested/conftest.py"])
async def test_planted_conftest_does_not_pass_an_unfixed_bug(backend, where):
    env = SWEEnv(backend.create, max_turns=5)
    await env.reset(TASK)
    await env.sandbox.write_file(where, PASS_EVERYTHING)
    await env.sandbox.write_file("nested/test_more.py", "def test_x():\n    assert False\n")
    r = await env.step(
        ToolCall("bash", {"command": "python -m pytest -q -p no:cacheprovider nested/test_more.py | tail -1"})
    )
    assert "\n1 passed in" in r.observation  # the plant works on a plain pytest run
    reward, info = await graded(env)
    assert reward == 0.0 and FAIL in info["failed_tests"], info


async def test_pytest_shadowed_by_a_module_in_the_repo_is_not_run(backend):
    env = SWEEnv(backend.create, max_turns=5)
    await env.reset(TASK)
    ids = TASK.FAIL_TO_PASS + TASK.PASS_TO_PASS
    for name in ("pytest.py", "sitecustomize.py", "pluggy.py"):  # pluggy: imported by pytest
        await env.sandbox.write_file(name, FAKE_PYTEST.format(ids=ids))
    r = await env.step(ToolCall("bash", {"command": "python -m pytest -rA test_inflection.py | head -1"}))
    assert r.observation.startswith(f"PASSED {FAIL}")  # the plant works on a plain pytest run
    reward, info = await graded(env)
    assert reward == 0.0 and info["failed_tests"] == TASK.FAIL_TO_PASS, info


async def test_fake_passed_lines_are_not_read(backend):
    env = SWEEnv(backend.create, max_turns=5)
    await env.reset(TASK)
    ids = TASK.FAIL_TO_PASS + TASK.PASS_TO_PASS
    plant = f"cat >> inflection/__init__.py <<'EOF'\n{PRINT_AT_EXIT.format(ids=ids)}\nEOF"
    await env.step(ToolCall("bash", {"command": plant}))
    r = await env.step(
        ToolCall(
            "bash",
            {
                "command": "python -m pytest -q -rA -p no:cacheprovider test_inflection.py | grep -e potatoes -e ' passed'"
            },
        )
    )
    assert r.observation.rindex(f"PASSED {FAIL}") > r.observation.rindex(" passed")  # after the summary
    reward, info = await graded(env)
    assert reward == 0.0 and info["failed_tests"] == TASK.FAIL_TO_PASS, info


async def test_edited_tests_and_config_are_restored(backend):
    """The model weakens the failing test and plants a pytest.ini that deselects it: both are undone."""
    env = SWEEnv(backend.create, max_turns=5)
    await env.reset(TASK)
    r = await env.step(
        ToolCall("bash", {"command": "sed -i 's/def test_pluralize_singular(/def _off(/' test_inflection.py"})
    )
    await env.sandbox.write_file("pytest.ini", "[pytest]\naddopts = -k 'not potato'\n")
    await env.sandbox.write_file("__pycache__/test_inflection.cpython-311-pytest-9.2.0.pyc", b"\0" * 64)
    reward, info = await graded(env)
    assert reward == 0.0 and info["failed_tests"] == TASK.FAIL_TO_PASS, (r, info)


async def test_a_shipped_conftest_is_restored_and_a_real_fix_scores_one(backend, tmp_path):
    """tests/ beside the package, as ``python -m pytest`` runs it (the repository root importable)."""
    snapshot = tmp_path / "repo"
    shutil.copytree(TASK.snapshot_dir, snapshot)
    (snapshot / "tests").mkdir()
    (snapshot / "tests/conftest.py").write_text(
        "import pytest\n\n@pytest.fixture\ndef shipped():\n    return 42\n"
    )
    (snapshot / "tests/test_extra.py").write_text(
        "import inflection\n\ndef test_uses_fixture(shipped):\n    assert inflection.pluralize('cat') == 'cats' and shipped == 42\n"
    )
    test_files = ["test_inflection.py", "tests/test_extra.py"]
    obj = dict(task_to_dict(TASK), snapshot=str(snapshot), test_files=test_files)
    obj["PASS_TO_PASS"] = [*TASK.PASS_TO_PASS, "tests/test_extra.py::test_uses_fixture"]
    task = task_from_dict(obj)
    env = SWEEnv(backend.create, max_turns=5)
    await env.reset(task)
    await env.step(GOLD_EDIT)
    await env.step(
        ToolCall("bash", {"command": "rm tests/conftest.py && echo 'import sys' > tests/test_extra.py"})
    )
    reward, info = await graded(env)
    assert reward == 1.0, info


async def test_image_based_task_is_guarded_by_what_the_sandbox_held_at_reset(backend):
    """No snapshot (the repository comes with the pod image): the guarded files are read at reset."""

    async def image(snapshot: str = TASK.snapshot_dir) -> Sandbox:
        sb = await backend.create()
        await sb.upload(snapshot)
        return sb

    task = task_from_dict(dict(task_to_dict(TASK), snapshot=None))
    for plant, edit, want in ((PASS_EVERYTHING, None, 0.0), ("", GOLD_EDIT, 1.0)):
        env = SWEEnv(image, max_turns=5)
        await env.reset(task)
        assert set(env.pristine) == {"test_inflection.py"}
        await env.sandbox.write_file("conftest.py", plant)
        if edit is not None:
            await env.step(edit)
        reward, info = await graded(env)
        assert reward == want, info
