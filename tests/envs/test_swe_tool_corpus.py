"""Corpus of malformed tool calls, run through the real path: parsing -> SWEEnv.step -> a real local
sandbox. Each case is one line: the model's action (raw text or a parsed call), an optional setup
command the model ran earlier, and the expected outcome. Every case must come back as an observation
the model can read (never an exception), must leave every limit in force, and (unless it ends the
episode) must leave the episode usable: the next call still works.

Adding a case is adding one ``Case(...)`` line below.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import time
from dataclasses import dataclass
from typing import Any

import pytest
import pytest_asyncio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from envs.config import SandboxConfig
from envs.sandbox.local import LocalSandboxBackend
from envs.swe.env import SWEEnv
from envs.swe.task import SWETask
from envs.tool_parsing import ToolCall

pytestmark = pytest.mark.asyncio
LIMIT_S = 2.0  # the configured command time limit of every env in this module
MB = 1 << 20


def hermes(name: Any, args: Any) -> str:
    """A Qwen3/Hermes call; json.dumps writes NaN/Infinity and escapes NUL and surrogates."""
    return "<tool_call>\n" + json.dumps({"name": name, "arguments": args}) + "\n</tool_call>"


def mimo(name: str, **params: str) -> str:
    body = "".join(f"<parameter={k}>\n{v}\n</parameter>\n" for k, v in params.items())
    return f"<tool_call>\n<function={name}>\n{body}</function>\n</tool_call>"


def raw(body: str) -> str:
    return f"<tool_call>\n{body}\n</tool_call>"


@dataclass(frozen=True)
class Case:
    id: str
    action: Any  # model text, a ToolCall, or anything else a caller might pass
    expect: str | tuple[str, ...]  # substring(s) of the observation
    setup: str = ""  # a command run in the sandbox before the action (what the model did earlier)
    error: bool = True  # info["error"] is set (False: the call ran, e.g. with a clamped timeout)
    done: bool = False  # the action ends the episode (finish)
    max_s: float | None = None  # the step must return within this many seconds
    needs: str = ""  # a fix outside the tool layer this case still waits for (xfail until then)


BIG_FILE = "head -c 17000000 /dev/zero > big.bin"  # > the agent's 16 MiB read limit -> HTTP 413
MID_FILE = "{ echo MARK; head -c 10000000 /dev/zero | tr '\\0' a; } > mid.txt"
OUTSIDE = "/tmp/mopd-corpus-outside"  # a host directory a planted symlink points at
SOCKET = "python3 -c \"import socket; socket.socket(socket.AF_UNIX).bind('sock')\""
FILL_DISK = "for i in 1 2 3 4; do head -c 30000000 /dev/zero > fill$i; done 2>/dev/null; true"  # > disk_mb

# one line per case
# fmt: off
CASES = [
    # -- numbers from the model: never disable or exceed the configured limit ----------------------
    Case("timeout-nan-hermes", raw('{"name": "bash", "arguments": {"command": "sleep 20", "timeout": NaN}}'), ("`timeout`", "timed out after 2s"), error=False, max_s=12),
    Case("timeout-nan-mimo", mimo("bash", command="sleep 20", timeout="NaN"), ("`timeout`", "timed out after 2s"), error=False, max_s=12),
    Case("timeout-nan-call", ToolCall("bash", {"command": "sleep 20", "timeout": float("nan")}), ("`timeout`", "timed out after 2s"), error=False, max_s=12),
    Case("timeout-inf-over-limit", ToolCall("bash", {"command": "sleep 20", "timeout": float("inf")}), ("`timeout`", "timed out after 2s"), error=False, max_s=12),
    Case("timeout-infinity", raw('{"name": "bash", "arguments": {"command": "echo hi", "timeout": Infinity}}'), ("hi", "`timeout`"), error=False),
    Case("timeout-neg-infinity", raw('{"name": "bash", "arguments": {"command": "echo hi", "timeout": -Infinity}}'), ("hi", "`timeout`"), error=False),
    Case("timeout-minus-one", hermes("bash", {"command": "echo hi", "timeout": -1}), ("hi", "`timeout`"), error=False),
    Case("timeout-zero", hermes("bash", {"command": "echo hi", "timeout": 0}), ("hi", "`timeout`"), error=False),
    Case("timeout-1e400", raw('{"name": "bash", "arguments": {"command": "echo hi", "timeout": 1e400}}'), ("hi", "`timeout`"), error=False),
    Case("timeout-10**400-json", raw('{"name": "bash", "arguments": {"command": "echo hi", "timeout": 1' + "0" * 400 + "}}"), ("hi", "`timeout`"), error=False),
    Case("timeout-10**400-call", ToolCall("bash", {"command": "echo hi", "timeout": 10**400}), ("hi", "`timeout`"), error=False),
    Case("timeout-5000-digits", raw('{"name": "bash", "arguments": {"command": "echo hi", "timeout": 1' + "0" * 5000 + "}}"), "not valid JSON"),
    Case("timeout-1e9", hermes("bash", {"command": "echo hi", "timeout": 1e9}), ("hi", "`timeout`"), error=False),
    Case("timeout-negative-zero", raw('{"name": "bash", "arguments": {"command": "echo hi", "timeout": -0.0}}'), ("hi", "`timeout`"), error=False),
    Case("timeout-mimo-1e999", mimo("bash", command="echo hi", timeout="1e999"), ("hi", "`timeout`"), error=False),
    Case("timeout-mimo-infinity-word", mimo("bash", command="echo hi", timeout="Infinity"), ("hi", "`timeout`"), error=False),
    Case("timeout-string-nan", hermes("bash", {"command": "echo hi", "timeout": "NaN"}), "`timeout` must be a number"),
    Case("timeout-object", hermes("bash", {"command": "echo hi", "timeout": {"$gt": 1}}), "`timeout` must be a number"),
    Case("timeout-string", hermes("bash", {"command": "echo hi", "timeout": "30"}), "`timeout` must be a number"),
    Case("timeout-bool", hermes("bash", {"command": "echo hi", "timeout": True}), "`timeout` must be a number"),
    Case("timeout-list", hermes("bash", {"command": "echo hi", "timeout": [5]}), "`timeout` must be a number"),
    Case("timeout-mimo-word", mimo("bash", command="echo hi", timeout="soon"), "`timeout` must be a number"),
    # -- command text that cannot reach a shell ----------------------------------------------------
    Case("command-nul-hermes", hermes("bash", {"command": "echo a\x00b"}), "NUL"),
    Case("command-nul-call", ToolCall("bash", {"command": "\x00"}), "NUL"),
    Case("command-lone-surrogate", hermes("bash", {"command": "echo \ud800"}), "surrogate"),
    Case("command-low-surrogate-call", ToolCall("bash", {"command": "echo \udcff"}), "surrogate"),
    Case("command-1mb", ToolCall("bash", {"command": "echo " + "x" * MB}), "`command` is"),
    Case("command-200kb", hermes("bash", {"command": ": " + "y" * 200_000}), "`command` is"),
    Case("command-empty", hermes("bash", {"command": "  "}), "`command`"),
    Case("command-int", hermes("bash", {"command": 5}), "`command` must be a string"),
    Case("command-list", hermes("bash", {"command": ["ls", "-la"]}), "`command` must be a string"),
    Case("command-null", hermes("bash", {"command": None}), "`command` must be a string"),
    Case("command-missing", hermes("bash", {}), "missing required argument"),
    Case("command-deep-list", raw('{"name": "bash", "arguments": {"command": ' + "[" * 500 + "]" * 500 + "}}"), "`command` must be a string"),
    Case("unknown-argument", hermes("bash", {"command": "echo hi", "cwd": "/"}), "unknown argument `cwd`"),
    # -- files: sandbox 4xx answers caused by the model's input or files ---------------------------
    Case("read-413", ToolCall("str_replace", {"path": "big.bin", "old": "a", "new": "b"}), "larger than", setup=BIG_FILE),
    Case("write-too-large", ToolCall("str_replace", {"path": "mid.txt", "old": "MARK", "new": "Y" * (8 * MB)}), "limit", setup=MID_FILE),
    Case("path-nul", ToolCall("str_replace", {"path": "a\x00b", "old": "a", "new": "b"}), "NUL"),
    Case("path-surrogate", hermes("str_replace", {"path": "\ud83d.py", "old": "a", "new": "b"}), "surrogate"),
    Case("path-too-long", ToolCall("str_replace", {"path": "a" * 5000, "old": "a", "new": "b"}), "`path`"),
    Case("path-component-too-long", ToolCall("str_replace", {"path": "d/" + "a" * 300, "old": "a", "new": "b"}), "`path`"),
    Case("path-outside", ToolCall("str_replace", {"path": "../../../etc/passwd", "old": "root", "new": "x"}), "outside"),
    Case("path-absolute", ToolCall("str_replace", {"path": "/etc/passwd", "old": "root", "new": "x"}), "outside"),
    Case("path-symlink-out", ToolCall("str_replace", {"path": "link.py", "old": "root", "new": "x"}), "link", setup="ln -s /etc/passwd link.py"),
    Case("path-fifo", ToolCall("str_replace", {"path": "pipe", "old": "a", "new": "b"}), "regular file", setup="mkfifo pipe", max_s=20),
    Case("path-directory", ToolCall("str_replace", {"path": "sub", "old": "a", "new": "b"}), "directory", setup="mkdir sub"),
    Case("path-unix-socket", ToolCall("str_replace", {"path": "sock", "old": "a", "new": "b"}), "regular file", setup=SOCKET),
    Case("write-disk-full", ToolCall("str_replace", {"path": "calc.py", "old": "a - b", "new": "a + b" + " " * 4 * MB}), "space", setup=FILL_DISK),
    Case("path-under-file", ToolCall("str_replace", {"path": "calc.py/x", "old": "a", "new": "b"}), "calc.py"),
    Case("new-surrogate", hermes("str_replace", {"path": "calc.py", "old": "a - b", "new": "a + b \udc00"}), "surrogate"),
    Case("old-int", hermes("str_replace", {"path": "calc.py", "old": 1, "new": "b"}), "`old` must be a string"),
    Case("old-empty", hermes("str_replace", {"path": "calc.py", "old": "", "new": "b"}), "`old` must not be empty"),
    # -- names, argument shapes and JSON ----------------------------------------------------------
    Case("tool-name-case", hermes("Bash", {"command": "ls"}), "unknown tool `Bash`"),
    Case("path-dot", ToolCall("str_replace", {"path": ".", "old": "a", "new": "b"}), "directory"),
    Case("path-newline", ToolCall("str_replace", {"path": "calc.py\n", "old": "a", "new": "b"}), "does not exist"),
    Case("tag-inside-json-string", hermes("bash", {"command": "echo '<tool_call>'"}), "opened again"),
    Case("arguments-null-finish-is-fine", raw('{"name": "finish", "arguments": null}'), "Submitted", error=False, done=True),
    Case("unknown-tool", hermes("rm_rf", {}), "unknown tool `rm_rf`"),
    Case("name-not-string", raw('{"name": 5, "arguments": {}}'), '"name"'),
    Case("name-nul", hermes("bash\x00", {"command": "ls"}), "unknown tool"),
    Case("duplicate-key-name", raw('{"name": "bash", "name": "finish", "arguments": {"command": "echo hi"}}'), "duplicate key"),
    Case("duplicate-key-argument", raw('{"name": "bash", "arguments": {"command": "echo a", "command": "echo b"}}'), "duplicate key"),
    Case("arguments-plain-string", hermes("bash", "ls -la"), "not a JSON object"),
    Case("arguments-list", hermes("bash", ["ls"]), "must be a JSON object"),
    Case("arguments-json-list-string", hermes("bash", '["ls"]'), "must be a JSON object"),
    Case("deep-json-100k", raw('{"name": "bash", "arguments": {"command": ' + "[" * 100_000 + "]" * 100_000 + "}}"), "not valid JSON"),
    Case("truncated-json", raw('{"name": "bash", "arguments": {"command": "ls"'), "not valid JSON"),
    Case("truncated-block", '<tool_call>\n{"name": "bash", "arguments": {"command": "ls"}}', "never closed"),
    Case("nested-tags", "<tool_call><tool_call>" + hermes("bash", {"command": "ls"})[11:] + "</tool_call>", "opened again"),
    Case("stray-close", 'done </tool_call> {"name": "bash"}', "without a matching"),
    Case("no-call", "I think the bug is in calc.py.", "no tool call"),
    Case("empty-text", "", "no tool call"),
    Case("two-calls", hermes("bash", {"command": "ls"}) + mimo("bash", command="ls"), "exactly one tool call"),
    # -- the two formats mixed ---------------------------------------------------------------------
    Case("mixed-json-then-function", raw('{"name": "bash", "arguments": {}}\n<function=bash>\n<parameter=command>\nls\n</parameter>\n</function>'), "not valid JSON"),
    Case("mixed-function-with-json-body", raw('<function=bash>\n{"command": "ls"}\n</function>'), "outside `<parameter="),
    Case("mixed-json-holding-function-text", hermes("bash", {"command": "echo '<function=bash>' | wc -c"}), "[exit code: 0]", error=False),
    Case("mixed-function-without-block", "<function=bash>\n<parameter=command>\nls\n</parameter>\n</function>", "`<tool_call>`"),
    Case("mimo-two-functions", raw("<function=bash>\n<parameter=command>\nls\n</parameter>\n</function>\n<function=finish>\n</function>"), "more than one"),
    Case("mimo-duplicate-parameter", mimo("bash", command="ls").replace("</function>", "<parameter=command>\npwd\n</parameter>\n</function>"), "more than once"),
    Case("mimo-unknown-parameter", mimo("bash", command="ls", user="root"), "unknown argument `user`"),
    Case("mimo-unclosed-parameter", raw("<function=bash>\n<parameter=command>\nls\n</function>"), "not closed"),
    Case("mimo-unclosed-function", raw("<function=bash>\n<parameter=command>\nls\n</parameter>"), "</function>"),
    Case("mimo-empty-name", raw("<function=>\n</function>"), "empty name"),
    # -- actions that are not text or a well-formed call -------------------------------------------
    Case("action-none", None, "tool call"),
    Case("action-dict", {"name": "bash", "arguments": {"command": "ls"}}, "tool call"),
    Case("call-arguments-string", ToolCall("bash", "ls"), "must be a JSON object"),  # type: ignore[arg-type]
    Case("call-name-none", ToolCall(None, {}), '"name"'),  # type: ignore[arg-type]
    # -- finish with the evaluation area tampered with ---------------------------------------------
    Case("finish-mopd-symlink-dir", ToolCall("finish", {}), "Submitted", setup=f"ln -s {OUTSIDE} .mopd", error=False, done=True),
    Case("finish-mopd-tmp-symlink", ToolCall("finish", {}), "Submitted", setup=f"mkdir .mopd && ln -s {OUTSIDE}/f .mopd/test_patch.diff.mopd-tmp && ln -s {OUTSIDE}/g .mopd/test_patch.diff", error=False, done=True),
    Case("finish-mopd-fifo", ToolCall("finish", {}), "Submitted", setup="mkfifo .mopd", error=False, done=True),
    Case("finish-mopd-locked-dir", ToolCall("finish", {}), "Submitted", setup="mkdir -p .mopd/x && touch .mopd/x/y && chmod 000 .mopd/x .mopd", error=False, done=True),
    Case("finish-with-arguments", hermes("finish", {"summary": "done"}), "unknown argument `summary`"),
]
# fmt: on

TEST_PATCH = """diff --git a/test_extra.py b/test_extra.py
new file mode 100644
--- /dev/null
+++ b/test_extra.py
@@ -0,0 +1,2 @@
+def test_extra():
+    assert True
"""


@pytest.fixture(scope="module")
def task(tmp_path_factory) -> SWETask:
    """A tiny repository with one failing test (the model never fixes it here)."""
    repo = tmp_path_factory.mktemp("corpus-repo")
    (repo / "calc.py").write_text("def add(a, b):\n    return a - b\n")
    (repo / "test_calc.py").write_text(
        "from calc import add\n\ndef test_add():\n    assert add(1, 2) == 3\n\n"
        "def test_ok():\n    assert add(2, 0) == 2\n"
    )
    return SWETask(
        "corpus__calc",
        "corpus/calc",
        "0" * 40,
        "add() subtracts.",
        "",
        TEST_PATCH,
        ["test_calc.py::test_add"],
        ["test_calc.py::test_ok", "test_extra.py::test_extra"],
        snapshot_dir=str(repo),
    )


@pytest.fixture
def corpus_backend(sandbox_base) -> LocalSandboxBackend:
    # file_size_mb above the agent's 16 MiB read limit so a command can create a file it refuses
    return LocalSandboxBackend(
        SandboxConfig(
            cpu_time_s=20,
            memory_mb=768,
            wall_timeout_s=30,
            max_output_bytes=65536,
            max_procs=48,
            file_size_mb=40,
            disk_mb=96,
            base_dir=sandbox_base,
        )
    )


@pytest_asyncio.fixture
async def env(corpus_backend, task):
    e = SWEEnv(corpus_backend.create, max_turns=10, command_timeout=LIMIT_S)
    await e.reset(task)
    yield e
    await e.close()


@pytest.fixture
def outside():
    os.makedirs(OUTSIDE, exist_ok=True)
    os.chmod(OUTSIDE, 0o777)
    before = sorted(os.listdir(OUTSIDE))
    yield OUTSIDE
    after = sorted(os.listdir(OUTSIDE))
    shutil.rmtree(OUTSIDE, ignore_errors=True)
    assert after == before, "the evaluation wrote through a planted symlink"


def test_corpus_is_wide_enough():
    assert len(CASES) >= 30 and len({c.id for c in CASES}) == len(CASES)


def _param(case: Case):
    marks = [pytest.mark.xfail(reason=f"needs {case.needs}", strict=False)] if case.needs else []
    return pytest.param(case, id=case.id, marks=marks)


@pytest.mark.parametrize("case", [_param(c) for c in CASES])
async def test_malformed_tool_call(env, outside, case: Case):
    if case.setup:
        res = await env.sandbox.exec(case.setup, timeout=30)
        assert res.exit_code == 0, res.output
    t0 = time.monotonic()
    r = await env.step(case.action)  # must not raise
    elapsed = time.monotonic() - t0
    obs = r.observation
    obs.encode("utf-8")  # text the tokenizer can take: no lone surrogates
    for needle in (case.expect,) if isinstance(case.expect, str) else case.expect:
        assert needle in obs, f"{needle!r} not in observation: {obs[:600]!r} info={r.info}"
    assert len(obs) < 20_000, "an error observation must not echo megabytes back"
    if case.max_s is not None:
        assert elapsed < case.max_s, f"took {elapsed:.1f}s: a limit was disabled"
    if case.error:
        assert r.info.get("error"), r.info
    assert r.done == case.done, r
    if case.done:
        assert r.reward == 0.0 and "failed_tests" in r.info, r.info
        return
    after = await env.step(ToolCall("bash", {"command": "echo still-usable"}))
    assert "still-usable" in after.observation and not after.done, after


async def test_nan_timeout_kills_at_the_configured_limit(env):
    """The sleep is killed at LIMIT_S, not at the sandbox's wall limit (30 s) or never."""
    t0 = time.monotonic()
    r = await env.step(
        raw('{"name": "bash", "arguments": {"command": "sleep 20; echo woke", "timeout": NaN}}')
    )
    elapsed = time.monotonic() - t0
    assert "woke" not in r.observation and "timed out after 2s" in r.observation, r.observation
    assert LIMIT_S <= elapsed < LIMIT_S + 8, elapsed


async def test_gold_fix_still_scores_with_a_planted_mopd_symlink(env, outside):
    """Tampering with the evaluator's scratch directory neither escapes nor changes the reward."""
    await env.sandbox.exec(f"ln -s {OUTSIDE} .mopd", timeout=10)
    r = await env.step(ToolCall("str_replace", {"path": "calc.py", "old": "a - b", "new": "a + b"}))
    assert "replaced 1" in r.observation
    r = await env.step(ToolCall("finish", {}))
    assert r.done and r.reward == 1.0, (r.observation, r.info)


def test_env_rejects_non_finite_configured_limits():
    for kwargs in (
        {"command_timeout": float("nan")},
        {"command_timeout": float("inf")},
        {"command_timeout": 0},
    ):
        with pytest.raises(ValueError, match="command_timeout"):
            SWEEnv(lambda: None, **kwargs)  # type: ignore[arg-type]


# number_argument: every numeric argument from the model, one row per case:
# (value, keyword arguments, expected value or the substring of the ToolError)
# fmt: off
NUMBERS = [
    (float("nan"), {"clamp_to": 5.0}, 5.0),
    (float("inf"), {"clamp_to": 5.0}, 5.0),
    (float("-inf"), {"clamp_to": 5.0}, 5.0),
    (10**400, {"clamp_to": 5.0}, 5.0),
    (-(10**400), {"clamp_to": 5.0}, 5.0),
    (-1, {"clamp_to": 5.0}, 5.0),
    (0, {"clamp_to": 5.0, "low_inclusive": False}, 5.0),
    (2.5, {"clamp_to": 5.0}, 2.5),
    (float("nan"), {}, "must be a number in [0, 10]"),
    (1e400, {}, "must be a number in [0, 10]"),
    (11, {}, "must be a number in [0, 10]"),
    (3, {"integer": True}, 3),
    (3.0, {"integer": True}, 3),
    (3.5, {"integer": True}, "must be an integer"),
    (float("nan"), {"integer": True}, "must be an integer in [0, 10]"),
    (10**400, {"integer": True}, "<an integer of 401 digits>"),
    (True, {}, "got boolean"),
    ("7", {}, "got string"),
    ([7], {}, "got array"),
    ({"$gt": 1}, {}, "got object"),
    (None, {}, 1.0),
]
# fmt: on


@pytest.mark.parametrize(
    "value,kwargs,expected", NUMBERS, ids=[f"{i}-{v!r:.20}" for i, (v, _, _) in enumerate(NUMBERS)]
)
def test_number_arguments_are_finite_and_in_range(value, kwargs, expected):
    from envs.swe.tools import ToolError, number_argument

    if isinstance(expected, str):
        with pytest.raises(ToolError, match="argument `n`") as err:
            number_argument("tool", {"n": value}, "n", 1.0, 0.0, 10.0, **kwargs)
        assert expected in str(err.value)
    else:
        got, note = number_argument("tool", {"n": value}, "n", 1.0, 0.0, 10.0, **kwargs)
        assert got == expected and type(got) is type(expected)
        assert ("`n`" in note) == (value is not None and got != value)


async def test_evaluation_reads_the_whole_report_past_the_output_cap(corpus_backend, tmp_path):
    """Tests that print more than the sandbox's output cap (64 KiB here) still get their outcomes."""
    repo = tmp_path / "noisy"
    repo.mkdir()
    (repo / "calc.py").write_text("def add(a, b):\n    return a - b\n")
    (repo / "test_calc.py").write_text(
        "from calc import add\n\ndef test_add():\n    assert add(1, 2) == 3\n\n"
        "def test_noisy():\n    print('x' * 300_000)\n"
    )
    task = SWETask(
        "corpus__noisy", "corpus/noisy", "0" * 40, "add() subtracts.", "", "",
        ["test_calc.py::test_add"], ["test_calc.py::test_noisy"], snapshot_dir=str(repo),
    )  # fmt: skip
    env = SWEEnv(corpus_backend.create, max_turns=3, command_timeout=LIMIT_S)
    await env.reset(task)
    try:
        await env.step(ToolCall("str_replace", {"path": "calc.py", "old": "a - b", "new": "a + b"}))
        r = await env.step(ToolCall("finish", {}))
    finally:
        await env.close()
    assert r.reward == 1.0, (r.observation, r.info)


# -- fuzzing: arbitrary JSON values as arguments, through a real sandbox --------------------------
_NASTY = st.sampled_from(
    ["\x00", "\ud800", "\udcff", "\U0010ffff", "</tool_call>", "<function=x>", "\n", "'", '"']
)
_TEXT = st.lists(st.characters() | _NASTY, max_size=16).map("".join)
_JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.floats()
    | st.integers(-(10**400), 10**400)
    | st.sampled_from([0, -1, 10**400, 1e-320, float("nan"), float("inf")])
    | _TEXT,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_TEXT, inner, max_size=3),
    max_leaves=6,
)
_NUMBER = (
    st.floats()
    | st.integers(-(10**400), 10**400)
    | st.sampled_from([0, -1, 10**400, 1e-320, 1e400, float("nan"), float("inf"), 0.5, 1, 2])
)
_COMMENT = _TEXT.map(lambda t: "echo fuzz #" + t.replace("\n", " "))  # the text never runs
_CALLS = st.one_of(
    st.builds(lambda c, t: ToolCall("bash", {"command": c, "timeout": t}), _COMMENT, _NUMBER),
    st.builds(lambda c, t: ToolCall("bash", {"command": c, "timeout": t}), _COMMENT | _JSON, _JSON),
    st.builds(
        lambda p, o, n: ToolCall("str_replace", {"path": p, "old": o, "new": n}),
        st.sampled_from(["calc.py", "test_calc.py"]) | _TEXT.map(lambda t: "fz/" + t),
        _TEXT,
        _TEXT,
    ),
    st.builds(lambda p, o, n: ToolCall("str_replace", {"path": p, "old": o, "new": n}), _JSON, _JSON, _JSON),
    st.builds(lambda n, a: ToolCall(n, a), _JSON | st.sampled_from(["bash", "str_replace"]), _JSON),
    st.builds(lambda c, t: hermes("bash", {"command": c, "timeout": t}), _COMMENT, _NUMBER),
    st.builds(
        lambda a: hermes("bash", a), st.dictionaries(st.sampled_from(["command", "timeout", "x"]), _JSON)
    ),
)


def test_fuzzed_arguments_are_observations_and_keep_the_limit(corpus_backend, task):
    """Whatever JSON the model puts in a call: an observation, never an exception or a lifted limit."""
    loop = asyncio.new_event_loop()
    env = SWEEnv(corpus_backend.create, max_turns=10**6, command_timeout=LIMIT_S)
    loop.run_until_complete(env.reset(task))

    @given(_CALLS)
    @settings(
        max_examples=int(os.environ.get("MOPD_FUZZ_EXAMPLES", "60")),
        deadline=None,
        suppress_health_check=list(HealthCheck),
    )
    def one(action):
        t0 = time.monotonic()
        r = loop.run_until_complete(env.step(action))
        assert isinstance(r.observation, str) and not r.done, r
        r.observation.encode("utf-8")
        assert time.monotonic() - t0 < LIMIT_S + 10

    try:
        one()
        r = loop.run_until_complete(env.step(ToolCall("bash", {"command": "echo still-usable"})))
        assert "still-usable" in r.observation
    finally:
        loop.run_until_complete(env.close())
        loop.close()


async def test_infrastructure_failures_raise_and_do_not_end_the_episode(env):
    """A dead sandbox is not the model's fault: step raises SandboxError (status 0) for the Toolbox
    to replay the session elsewhere, and the episode is not marked done."""
    import signal

    from envs.sandbox.client import SandboxError

    os.kill(env.sandbox.info["agent_pid"], signal.SIGKILL)
    for action in (ToolCall("bash", {"command": "echo hi"}), ToolCall("finish", {})):
        with pytest.raises(SandboxError) as err:
            await env.step(action)
        assert err.value.status == 0
    assert not env.done and env.turns == 0
