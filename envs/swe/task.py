"""SWE-style task instances (SWE-bench field names) and the tasks shipped with mopd."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field

TASKS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tasks")
_REQUIRED = {
    "instance_id": str,
    "repo": str,
    "base_commit": str,
    "problem_statement": str,
    "patch": str,
    "test_patch": str,
    "FAIL_TO_PASS": list,
    "PASS_TO_PASS": list,
}


class TaskError(ValueError):
    """A task file is malformed; the message names the field and what was expected."""


@dataclass(frozen=True)
class SWETask:
    instance_id: str
    repo: str
    base_commit: str
    problem_statement: str
    patch: str  # the gold patch (never shown to the model)
    test_patch: str  # applied before evaluation
    FAIL_TO_PASS: list[str]
    PASS_TO_PASS: list[str]
    image: str = "python:3.11-slim"  # pod image (kubernetes backend)
    snapshot_dir: str | None = None  # local directory holding the repository at base_commit
    test_files: list[str] = field(default_factory=list)  # what to run; default: files named in the test ids

    def tests_to_run(self) -> list[str]:
        if self.test_files:
            return list(self.test_files)
        return sorted({t.split("::")[0] for t in self.FAIL_TO_PASS + self.PASS_TO_PASS})


def task_from_dict(obj: dict, base_dir: str | None = None, source: str = "task") -> SWETask:
    """Validate and build a task; raises TaskError naming the offending field."""
    if not isinstance(obj, dict):
        raise TaskError(f"{source}: expected a JSON object, got {type(obj).__name__}")
    for name, kind in _REQUIRED.items():
        if name not in obj:
            raise TaskError(f"{source}: missing field `{name}` (expected {kind.__name__})")
        if not isinstance(obj[name], kind):
            raise TaskError(
                f"{source}: field `{name}` must be a {kind.__name__}, got {type(obj[name]).__name__}"
            )
    for name in ("FAIL_TO_PASS", "PASS_TO_PASS"):
        if not all(isinstance(t, str) and t for t in obj[name]):
            raise TaskError(f"{source}: field `{name}` must be a list of test ids (non-empty strings)")
    if not obj["FAIL_TO_PASS"]:
        raise TaskError(f"{source}: field `FAIL_TO_PASS` must name at least one test")
    snapshot = obj.get("snapshot")
    snapshot_dir = os.path.join(base_dir, snapshot) if snapshot and base_dir else snapshot
    if snapshot_dir is not None and not os.path.isdir(snapshot_dir):
        raise TaskError(f"{source}: field `snapshot` must name a directory, {snapshot_dir!r} does not exist")
    return SWETask(
        obj["instance_id"],
        obj["repo"],
        obj["base_commit"],
        obj["problem_statement"],
        obj["patch"],
        obj["test_patch"],
        list(obj["FAIL_TO_PASS"]),
        list(obj["PASS_TO_PASS"]),
        obj.get("image", "python:3.11-slim"),
        snapshot_dir,
        list(obj.get("test_files", [])),
    )


def task_to_dict(task: SWETask) -> dict:
    """The inverse of ``task_from_dict`` (the form tasks travel in to the Toolbox's workers)."""
    d = dataclasses.asdict(task)
    d["snapshot"] = d.pop("snapshot_dir")
    return d


def load_task(path: str) -> SWETask:
    """Load ``<dir>/task.json`` (or a JSON file path); the snapshot is resolved relative to it."""
    file = os.path.join(path, "task.json") if os.path.isdir(path) else path
    try:
        with open(file, encoding="utf-8") as f:
            obj = json.load(f)
    except FileNotFoundError:
        raise TaskError(f"task file {file!r} does not exist") from None
    except json.JSONDecodeError as exc:
        raise TaskError(f"task file {file!r} is not valid JSON: {exc}") from None
    return task_from_dict(obj, os.path.dirname(file), file)


def builtin_tasks() -> list[SWETask]:
    """The tasks vendored under envs/swe/tasks (real historical bugs of `inflection`, MIT)."""
    return [
        load_task(os.path.join(TASKS_DIR, d))
        for d in sorted(os.listdir(TASKS_DIR))
        if os.path.isfile(os.path.join(TASKS_DIR, d, "task.json"))
    ]
