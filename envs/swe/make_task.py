"""Build a SWE task directory from a working package, a diff that puts a bug into it, and its tests.

    python -m envs.swe.make_task SOURCE --bug BUG.diff --problem TEXT --out DIR
        [--id NAME] [--tests PATH ...] [--test-patch TESTS.diff] [--repo NAME] [--image IMAGE]

SOURCE is the package at a state where its tests pass. The task's repository is SOURCE with the bug
applied (what the model starts from), and the gold patch undoes the bug. FAIL_TO_PASS are the tests
that pass on SOURCE and fail with the bug; PASS_TO_PASS those that pass on both. ``--test-patch``
adds tests the model does not see, applied before grading (SWE-bench's ``test_patch``). The tests are
run here, with this interpreter, the way the grader runs them (envs/swe/grading.py); the result is
a directory that ``env.tasks=[DIR]`` takes.
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
import shutil
import subprocess
import sys
import tempfile

from envs.swe.grading import RUN_PYTEST, junit_key, junit_outcomes, patch_paths
from envs.swe.task import SWETask, TaskError, load_task

_SKIP = shutil.ignore_patterns(".git", "__pycache__", ".pytest_cache", "*.egg-info", ".mopd", ".venv")


def _apply(repo: str, patch: str, what: str) -> None:
    if not patch.strip():
        return
    res = subprocess.run(
        ["patch", "-p1", "--forward", "--batch"],
        cwd=repo,
        input=patch,
        capture_output=True,
        text=True,
        check=False,
    )
    if res.returncode != 0:
        raise TaskError(f"{what} does not apply to the source:\n{res.stdout[-2000:]}{res.stderr[-1000:]}")


def _lines(path: str) -> list[str]:
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines(keepends=True)
    if lines and not lines[-1].endswith("\n"):
        lines[-1] += "\n\\ No newline at end of file\n"
    return lines


def unified_diff(old_root: str, new_root: str, paths: list[str]) -> str:
    """A ``patch -p1`` / ``git apply`` diff turning ``paths`` under ``old_root`` into ``new_root``'s."""
    out = []
    for path in paths:
        old, new = os.path.join(old_root, path), os.path.join(new_root, path)
        a = f"a/{path}" if os.path.exists(old) else "/dev/null"
        b = f"b/{path}" if os.path.exists(new) else "/dev/null"
        out.extend(difflib.unified_diff(_lines(old), _lines(new), a, b))
    return "".join(out)


def test_outcomes(repo: str, tests: list[str], python: str = sys.executable) -> dict[str, bool]:
    """node id -> passed, for the tests pytest collects in ``repo`` (all, or those under ``tests``)."""
    env = dict(os.environ, PYTEST_DISABLE_PLUGIN_AUTOLOAD="1", PYTHONDONTWRITEBYTECODE="1")
    base = [python, "-P", "-c", RUN_PYTEST, "-q", "-p", "no:cacheprovider"]
    collected = subprocess.run(
        [*base, "--collect-only", *tests],
        cwd=repo,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    ids = [line.strip() for line in collected.stdout.splitlines() if "::" in line]
    if not ids:
        raise TaskError(
            f"pytest collected no tests in {repo}:\n{collected.stdout[-2000:]}{collected.stderr[-1000:]}"
        )
    report = os.path.join(repo, ".mopd-junit.xml")
    subprocess.run(
        [*base, f"--junitxml={report}", *tests],
        cwd=repo,
        env=env,
        capture_output=True,
        timeout=3600,
        check=False,
    )
    with open(report, "rb") as f:
        outcomes = junit_outcomes(f.read())
    os.remove(report)
    return {test_id: outcomes.get(junit_key(test_id)) is True for test_id in ids}


def make_task(
    source: str,
    bug: str,
    problem: str,
    out_dir: str,
    *,
    instance_id: str | None = None,
    tests: list[str] | None = None,
    test_patch: str = "",
    repo: str | None = None,
    image: str = "python:3.11-slim",
) -> SWETask:
    """Write ``out_dir/task.json`` and ``out_dir/repo`` (see the module docstring); returns the task."""
    if not os.path.isdir(source):
        raise TaskError(f"source {source!r} is not a directory")
    if not bug.strip():
        raise TaskError("the bug diff is empty")
    if os.path.exists(out_dir) and os.listdir(out_dir):
        raise TaskError(f"output directory {out_dir!r} is not empty")
    changed = patch_paths(bug)
    tests = [os.path.normpath(t) for t in tests or []]
    for test in tests:
        if test == "." or any(c == test or c.startswith(test + "/") for c in changed):
            # the grader restores the test paths as shipped (envs/swe/grading.py): a fix there is undone
            raise TaskError(
                f"test path {test!r} holds files the bug changes; name the tests apart from the source"
            )
    with tempfile.TemporaryDirectory(prefix="mopd-make-task-") as tmp:
        fixed, buggy = os.path.join(tmp, "fixed"), os.path.join(tmp, "buggy")
        shutil.copytree(source, fixed, ignore=_SKIP, symlinks=True)
        shutil.copytree(fixed, buggy, symlinks=True)
        _apply(buggy, bug, "the bug diff")
        gold = unified_diff(buggy, fixed, changed)
        outcomes = {}
        for name, tree in (("fixed", fixed), ("buggy", buggy)):
            run = os.path.join(tmp, f"run-{name}")
            shutil.copytree(tree, run, symlinks=True)
            _apply(run, test_patch, "the test patch")
            outcomes[name] = test_outcomes(run, tests)
        fail_to_pass = sorted(t for t, ok in outcomes["fixed"].items() if ok and not outcomes["buggy"].get(t))
        pass_to_pass = sorted(t for t, ok in outcomes["fixed"].items() if ok and outcomes["buggy"].get(t))
        if not fail_to_pass:
            raise TaskError("no test that passes on the source fails with the bug: the tests do not catch it")
        os.makedirs(out_dir, exist_ok=True)
        shutil.copytree(buggy, os.path.join(out_dir, "repo"), symlinks=True)
    name = instance_id or os.path.basename(os.path.abspath(out_dir))
    task = {
        "instance_id": name,
        "repo": repo or os.path.basename(os.path.abspath(source)),
        "base_commit": f"{os.path.abspath(source)} with the bug applied",
        "problem_statement": problem,
        "patch": gold,
        "test_patch": test_patch,
        "FAIL_TO_PASS": fail_to_pass,
        "PASS_TO_PASS": pass_to_pass,
        "image": image,
        "snapshot": "repo",
        "test_files": tests,
    }
    with open(os.path.join(out_dir, "task.json"), "w", encoding="utf-8") as f:
        json.dump(task, f, indent=1, ensure_ascii=False)
    return load_task(out_dir)


def _text(value: str) -> str:
    """``@FILE`` -> the file's text, else the value itself."""
    if value.startswith("@"):
        with open(value[1:], encoding="utf-8") as f:
            return f.read()
    return value


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m envs.swe.make_task", description=__doc__.split("\n\n")[0])
    p.add_argument("source", help="the package at a state where its tests pass")
    p.add_argument("--bug", required=True, help="unified diff (-p1) that puts the bug into SOURCE")
    p.add_argument("--problem", required=True, help="the issue text the model reads, or @FILE")
    p.add_argument("--out", required=True, help="the task directory to write (must be empty)")
    p.add_argument("--id", help="instance_id (default: the --out directory's name)")
    p.add_argument("--tests", nargs="*", default=[], help="test files or directories to run (default: all)")
    p.add_argument("--test-patch", help="unified diff adding tests the model does not see")
    p.add_argument("--repo", help="the repository's name (default: SOURCE's directory name)")
    p.add_argument("--image", default="python:3.11-slim", help="pod image for the kubernetes backend")
    args = p.parse_args(argv)
    try:
        with open(args.bug, encoding="utf-8") as f:
            bug = f.read()
        test_patch = ""
        if args.test_patch:
            with open(args.test_patch, encoding="utf-8") as f:
                test_patch = f.read()
        task = make_task(
            args.source, bug, _text(args.problem), args.out,
            instance_id=args.id, tests=args.tests, test_patch=test_patch, repo=args.repo, image=args.image,
        )  # fmt: skip
    except (OSError, TaskError) as exc:
        print(f"make_task: {exc}", file=sys.stderr)
        return 2
    print(
        f"{args.out}: {task.instance_id}: {len(task.FAIL_TO_PASS)} FAIL_TO_PASS, {len(task.PASS_TO_PASS)} PASS_TO_PASS"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
