"""Grading a SWE episode so that the model cannot forge its reward.

The model had a shell in the workspace, so every file there is suspect. Before the tests run, the
files that decide how tests are collected and judged are put back as the task shipped them (the
test files, the test patch's files, ``__init__.py`` beside the tests, and pytest's configuration:
``conftest.py``, ``pytest.ini``, ``setup.cfg``, ``tox.ini``, ``pyproject.toml`` anywhere); copies
the task does not ship of those names, and of modules that Python or pytest would load instead of
their own (``pytest.py``, ``sitecustomize.py``, bytecode caches), are removed. pytest is imported
with ``-P`` (the working directory cannot shadow it or its dependencies), and the outcome is read
from a JUnit XML report written under a fresh random name in a directory emptied just before the
run, never from what the run printed (which the model's code can fake).

Limit: the code under test runs inside the pytest process, so code that rewrites pytest itself at
import time is not caught here; that needs the tests re-run out of reach of the model's code.
"""

from __future__ import annotations

import functools
import os
import re
import secrets
import shlex
import xml.etree.ElementTree as ET
from dataclasses import dataclass

from envs.sandbox.base import Sandbox
from envs.sandbox.client import SandboxError
from envs.swe.task import SWETask, TaskError
from envs.swe.tools import ToolError, model_caused, quote_all, read_bytes, refusal

CONFIG_NAMES = ("conftest.py", "pytest.ini", ".pytest.ini", "setup.cfg", "tox.ini", "pyproject.toml")
# files by these names are restored from the task wherever it has them and removed everywhere else
GUARDED_NAMES = (*CONFIG_NAMES, "pytest.py", "py.py", "sitecustomize.py", "usercustomize.py")
REPORT_BYTES = 64 << 20  # the largest JUnit report read back
MAX_GUARDED_FILES = 10_000
SCRATCH = ".mopd"
# The evaluator's scratch directory is the model's to break: whatever it left there (a symlink out of
# the sandbox, a FIFO, a directory it cannot enter) is removed, without following links, before use.
_CLEAN_SCRATCH = (
    f"rm -f {SCRATCH} 2>/dev/null; "
    f"if [ -d {SCRATCH} ] && [ ! -L {SCRATCH} ]; then chmod -R u+rwX {SCRATCH} 2>/dev/null; rm -rf {SCRATCH}; fi; "
    f"! [ -e {SCRATCH} ] && ! [ -L {SCRATCH} ] && mkdir {SCRATCH}"
)
_NAME_TEST = " -o ".join(f"-name {shlex.quote(n)}" for n in GUARDED_NAMES)
# every guarded file and every bytecode cache, without following links (find -P), skipping the scratch
_FIND_GUARDED = f"find . -path ./{SCRATCH} -prune -o \\( {_NAME_TEST} -o -name __pycache__ \\)"
_LIST_GUARDED = (
    f"find . -path ./{SCRATCH} -prune -o -name __pycache__ -prune -o -type f \\( {_NAME_TEST} \\) -print"
)
# pytest and what it imports are loaded with the working directory off sys.path (-P), so no module
# the model left there stands in for them; then the directory goes first on sys.path, as with
# ``python -m pytest``, for the repository's own imports
RUN_PYTEST = 'import sys, pytest; sys.path.insert(0, ""); sys.exit(pytest.console_main())'  # python -P -c
_DIFF_PATH = re.compile(r"^(?:---|\+\+\+) [ab]/(.+?)\s*$", re.MULTILINE)


@dataclass
class Evaluation:
    reward: float
    passed: list[str]
    failed: list[str]  # required tests that did not pass
    output: str
    error: str = ""  # why the tests could not run (the model broke the workspace), else empty


def patch_paths(patch: str) -> list[str]:
    """The files a unified diff touches (relative paths, as ``patch -p1`` reads them)."""
    return sorted({p for p in _DIFF_PATH.findall(patch) if p != "/dev/null"})


def test_paths(task: SWETask) -> list[str]:
    """The task's test files and the files its test patch touches, with the ``__init__.py`` files
    of their directories (imported before the tests are), as relative paths."""
    paths = set(task.tests_to_run()) | set(patch_paths(task.test_patch))
    for path in list(paths):
        parent = os.path.dirname(path)
        while parent:
            paths.add(os.path.join(parent, "__init__.py"))
            parent = os.path.dirname(parent)
    for path in paths:
        if os.path.isabs(path) or ".." in path.split("/"):
            raise TaskError(f"task {task.instance_id}: test path {path!r} leaves the repository")
    return sorted(paths)


@functools.lru_cache(maxsize=64)
def _snapshot_files(snapshot_dir: str, paths: tuple[str, ...]) -> tuple[tuple[str, bytes], ...]:
    found: dict[str, bytes] = {}

    def add(rel: str) -> None:
        with open(os.path.join(snapshot_dir, rel), "rb") as f:
            found[os.path.normpath(rel)] = f.read()

    for root, dirs, files in os.walk(snapshot_dir):
        dirs[:] = [d for d in dirs if d != "__pycache__"]
        for name in files:
            if name in GUARDED_NAMES:
                add(os.path.relpath(os.path.join(root, name), snapshot_dir))
    for path in paths:
        full = os.path.join(snapshot_dir, path)
        if os.path.isfile(full):
            add(path)
        elif os.path.isdir(full):
            for root, dirs, files in os.walk(full):
                dirs[:] = [d for d in dirs if d != "__pycache__"]
                for name in files:
                    add(os.path.relpath(os.path.join(root, name), snapshot_dir))
    return tuple(sorted(found.items()))


async def pristine_files(sb: Sandbox, task: SWETask) -> dict[str, bytes]:
    """The guarded files as the task ships them: from its snapshot, else (an image-based task) read
    from the sandbox before the model has touched it."""
    paths = tuple(test_paths(task))
    if task.snapshot_dir:
        return dict(_snapshot_files(task.snapshot_dir, paths))
    res = await sb.exec(
        f"{_LIST_GUARDED}; "
        f'for p in {quote_all(list(paths))}; do [ -e "$p" ] && find "$p" -type f; done; true',
        timeout=60.0,
        max_output=4 << 20,
    )
    names = sorted({os.path.normpath(n) for n in res.output.splitlines() if n and "__pycache__" not in n})
    if len(names) > MAX_GUARDED_FILES:
        raise ToolError(f"the repository has {len(names)} test and config files; at most {MAX_GUARDED_FILES}")
    return {name: await read_bytes(sb, name, REPORT_BYTES) for name in names}


async def restore(sb: Sandbox, task: SWETask, pristine: dict[str, bytes]) -> None:
    """Put the guarded files back as shipped and remove the rest (raises ToolError if it cannot)."""
    res = await sb.exec(_CLEAN_SCRATCH, timeout=60.0)
    if res.exit_code != 0:
        raise ToolError(f"the scratch directory {SCRATCH} could not be reset:\n{res.output[-500:]}")
    drop = sorted(set(test_paths(task)) | set(pristine))
    res = await sb.exec(
        "chmod -R u+rwX . 2>/dev/null; "
        f"{_FIND_GUARDED} -prune -exec rm -rf -- {{}} + && rm -rf -- {quote_all(drop)}",
        timeout=120.0,
    )
    if res.exit_code != 0:
        raise ToolError(f"the test and config files could not be reset:\n{res.output[-500:]}")
    for path, content in pristine.items():
        await sb.write_file(path, content)


def junit_key(test_id: str) -> tuple[str, str]:
    """A pytest node id -> the (classname, name) pytest writes for it in a JUnit report: the file
    path dotted without ``.py``, then any classes, joined by dots; ``name`` keeps the parameters."""
    path_and_names, bracket, params = test_id.partition("[")
    names = path_and_names.split("::")
    names[0] = re.sub(r"\.py$", "", names[0].replace("/", "."))
    return ".".join(names[:-1]), names[-1] + bracket + params


def junit_outcomes(report: bytes) -> dict[tuple[str, str], bool]:
    """(classname, name) -> passed, from a JUnit XML report; a test reported twice (a teardown error
    adds an entry) passes only if every entry does."""
    outcomes: dict[tuple[str, str], bool] = {}
    for case in ET.fromstring(report).iter("testcase"):
        key = (case.get("classname", ""), case.get("name", ""))
        ok = not any(child.tag in ("failure", "error", "skipped") for child in case)
        outcomes[key] = outcomes.get(key, True) and ok
    return outcomes


async def apply_patch(sb: Sandbox, patch: str, name: str, timeout: float = 60.0) -> None:
    """Apply a unified diff inside the sandbox (git apply, else patch -p1)."""
    if not patch.strip():
        return
    path = f"{SCRATCH}/{name}.diff"
    await sb.write_file(path, patch)
    res = await sb.exec(
        f"(git apply --whitespace=nowarn {path} 2>&1 || patch -p1 --forward --batch < {path}) "
        f"&& rm -f {path}",
        timeout=timeout,
    )
    if res.exit_code != 0:
        raise ToolError(f"{name} does not apply:\n{res.output[-2000:]}")


async def evaluate(
    sb: Sandbox, task: SWETask, pristine: dict[str, bytes], python: str, timeout: float = 300.0
) -> Evaluation:
    """Restore the tests, apply the test patch, run the task's tests and compare the JUnit report with
    FAIL_TO_PASS / PASS_TO_PASS.

    Anything the model did to the workspace that makes evaluation impossible scores 0 with the reason;
    only infrastructure failures raise.
    """
    required = task.FAIL_TO_PASS + task.PASS_TO_PASS
    report = f"{SCRATCH}/{secrets.token_hex(16)}.xml"
    try:
        await restore(sb, task, pristine)
        await apply_patch(sb, task.test_patch, "test_patch")
        res = await sb.exec(
            f"PYTHONDONTWRITEBYTECODE=1 PYTEST_DISABLE_PLUGIN_AUTOLOAD=1 {python} -P -c {shlex.quote(RUN_PYTEST)} "
            f"-q -p no:cacheprovider --no-header --junitxml={report} -o junit_logging=no "
            f"{quote_all(task.tests_to_run())} > {SCRATCH}/stdout.txt 2>&1; tail -c 4000 {SCRATCH}/stdout.txt",
            timeout=timeout,
            max_output=8192,
        )
        outcomes = junit_outcomes(await read_bytes(sb, report, REPORT_BYTES))
    except ToolError as exc:
        return Evaluation(0.0, [], required, str(exc), str(exc))
    except ET.ParseError as exc:
        why = f"the test report is not valid JUnit XML: {exc}"
        return Evaluation(0.0, [], required, res.output[-4000:], why)
    except SandboxError as exc:
        if not model_caused(exc):
            raise
        why = f"the tests could not be run or left no report: {refusal(exc)}"
        return Evaluation(0.0, [], required, why, why)
    passed = [t for t in required if outcomes.get(junit_key(t)) is True]
    failed = [t for t in required if outcomes.get(junit_key(t)) is not True]
    return Evaluation(1.0 if not failed else 0.0, passed, failed, res.output[-4000:])
