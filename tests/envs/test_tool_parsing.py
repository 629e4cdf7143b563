"""Tool-call parsing: exact cases, round trips, and hypothesis fuzzing with adversarial text."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from envs.tool_parsing import ToolCall, format_tool_call, parse_tool_calls

TOOLS = {
    "bash": {
        "properties": {"command": {"type": "string"}, "timeout": {"type": "integer"}},
        "required": ["command"],
    },
    "str_replace": {
        "properties": {"path": {"type": "string"}, "old": {"type": "string"}, "new": {"type": "string"}},
        "required": ["path", "old", "new"],
    },
    "finish": {"properties": {}},
}


def test_hermes_single_call_and_content():
    text = 'Let me look.\n<tool_call>\n{"name": "bash", "arguments": {"command": "ls -la"}}\n</tool_call>'
    r = parse_tool_calls(text, "hermes", TOOLS)
    assert r.ok and r.calls == [ToolCall("bash", {"command": "ls -la"})]
    assert r.content == "Let me look."


def test_hermes_double_encoded_arguments_and_multiple_calls():
    text = (
        '<tool_call>{"name": "bash", "arguments": "{\\"command\\": \\"pwd\\"}"}</tool_call>'
        '<tool_call>{"name": "finish", "arguments": {}}</tool_call>'
    )
    r = parse_tool_calls(text)
    assert [c.name for c in r.calls] == ["bash", "finish"] and r.calls[0].arguments == {"command": "pwd"}


def test_mimo_format_with_typed_parameters():
    text = (
        "thinking done\n<tool_call>\n<function=bash>\n<parameter=command>\nfor i in 1 2; do echo $i; done\n"
        "</parameter>\n<parameter=timeout>\n30\n</parameter>\n</function>\n</tool_call>"
    )
    r = parse_tool_calls(text, "mimo", TOOLS)
    assert r.ok, r.errors
    assert r.calls == [ToolCall("bash", {"command": "for i in 1 2; do echo $i; done", "timeout": 30})]


def test_malformed_calls_become_readable_errors():
    cases = {
        "<tool_call>{not json}</tool_call>": "not valid JSON",
        '<tool_call>["bash"]</tool_call>': "must be a JSON object",
        '<tool_call>{"arguments": {}}</tool_call>': '"name"',
        '<tool_call>{"name": "bash", "arguments": 3}</tool_call>': "must be a JSON object",
        '<tool_call>{"name": "bash", "arguments": {"command": "ls"}}': "never closed",
        '<tool_call>{"name": "rm_rf", "arguments": {}}</tool_call>': "unknown tool `rm_rf`",
        '<tool_call>{"name": "bash", "arguments": {}}</tool_call>': "missing required argument",
        "<tool_call><function=bash><parameter=command>ls</function></tool_call>": "not closed",
        "<tool_call><function=>x</function></tool_call>": "empty name",
        "oops </tool_call>": "without a matching",
    }
    for text, needle in cases.items():
        r = parse_tool_calls(text, "auto", TOOLS)
        assert not r.ok, text
        assert needle in r.error_observation(), (text, r.error_observation())


@given(st.text(max_size=400))
@settings(max_examples=300, deadline=None)
def test_random_text_never_raises(text):
    r = parse_tool_calls(text, "auto", TOOLS)
    assert isinstance(r.error_observation(), str)
    for call in r.calls:
        assert isinstance(call.arguments, dict)


_FRAGMENTS = st.sampled_from(
    [
        "<tool_call>",
        "</tool_call>",
        "<function=",
        "</function>",
        "<parameter=",
        "</parameter>",
        "{",
        "}",
        '"name"',
        ":",
        '"arguments"',
        "bash",
        ">",
        "\n",
        '"',
        "[",
        "]",
        "null",
        "\\",
        "\x00",
        "💥",
    ]
)


@given(st.lists(st.one_of(_FRAGMENTS, st.text(max_size=5)), max_size=60))
@settings(max_examples=400, deadline=None)
def test_adversarial_fragments_never_raise(parts):
    text = "".join(parts)
    for fmt in ("hermes", "mimo", "auto"):
        r = parse_tool_calls(text, fmt, TOOLS)
        assert all(isinstance(c, ToolCall) for c in r.calls)
        assert all(isinstance(e.message, str) and e.message for e in r.errors)


_ARGS = st.dictionaries(
    st.text(st.characters(categories=["L", "N"]), min_size=1, max_size=8),
    st.text(max_size=30).filter(
        lambda s: (
            "</parameter>" not in s
            and "</function>" not in s
            and "</tool_call>" not in s
            and "<tool_call>" not in s
            and "<parameter=" not in s
        )
    ),
    max_size=4,
)


@given(
    st.text(st.characters(categories=["L", "N"]), min_size=1, max_size=12),
    _ARGS,
    st.text(max_size=40).filter(lambda s: "<tool_call>" not in s and "</tool_call>" not in s),
)
@settings(max_examples=300, deadline=None)
def test_round_trip_both_formats(name, args, prefix):
    call = ToolCall(name, args)
    for fmt in ("hermes", "mimo"):
        r = parse_tool_calls(prefix + format_tool_call(call, fmt), fmt)
        assert r.ok, (fmt, r.errors)
        assert r.calls == [call], fmt


def test_deeply_nested_json_is_an_error_not_a_crash():
    text = "<tool_call>" + "[" * 100000 + "</tool_call>"
    r = parse_tool_calls(text)
    assert not r.ok


def test_unknown_format_is_a_config_error():
    try:
        parse_tool_calls("x", "xml")
    except ValueError as exc:
        assert "hermes" in str(exc)
    else:
        raise AssertionError("expected ValueError")
    assert json.loads(json.dumps({"ok": 1}))


# -- hostile text: every row must parse in linear time into a short, readable error ---------------
# one line per case: (id, text, substring of the error observation or "" when calls are expected)
# fmt: off
HOSTILE = [
    ("nested-opens", "<tool_call>" * 200_000 + "</tool_call>", "opened again"),
    ("function-never-closed", "<tool_call>" + "<function=a>" * 200_000 + "</tool_call>", "</function>"),
    ("bad-names-then-close", "<tool_call>" + "<function=\n" * 100_000 + "<function=a>" * 100_000 + "</function></tool_call>", "more than one"),
    ("parameters-never-closed", "<tool_call><function=bash>" + "<parameter=x>" * 200_000 + "</function></tool_call>", "not closed"),
    ("parameters-after-last-close", "<tool_call><function=bash><parameter=command>a</parameter>" + "<parameter=x>" * 200_000 + "</function></tool_call>", "not closed"),
    ("many-broken-calls", "<tool_call>{</tool_call>" * 100_000, "99995 more"),
    ("stray-closes", "</tool_call>" * 200_000, "without a matching"),
    ("function-outside-block", "<function=bash>" * 200_000, "outside `<tool_call>`"),
    ("deep-json", "<tool_call>" + "[" * 1_000_000 + "</tool_call>", "not valid JSON"),
    ("huge-integer", '<tool_call>{"name": "bash", "arguments": {"command": 1' + "0" * 100_000 + "}}</tool_call>", "not valid JSON"),
    ("duplicate-keys", '<tool_call>{"name": "bash", "arguments": {"command": "a"}, "name": "finish"}</tool_call>', "duplicate key"),
    ("mimo-duplicate-parameter", "<tool_call><function=bash><parameter=command>a</parameter><parameter=command>b</parameter></function></tool_call>", "more than once"),
    ("json-mentions-function", '<tool_call>{"name": "bash", "arguments": {"command": "grep \'<function=\' x"}}</tool_call>', ""),
    ("json-then-function", '<tool_call>{"name": "bash", "arguments": {}}<function=bash><parameter=command>ls</parameter></function></tool_call>', "not valid JSON"),
    ("function-with-json-body", '<tool_call><function=bash>{"command": "ls"}</function></tool_call>', "outside `<parameter="),
    ("nul-in-name", '<tool_call>{"name": "ba\\u0000sh", "arguments": {}}</tool_call>', "unknown tool `ba\\x00sh`"),
    ("1mb-name", '<tool_call>{"name": "' + "n" * (1 << 20) + '", "arguments": {}}</tool_call>', "chars)"),
    ("wrong-type", '<tool_call>{"name": "bash", "arguments": {"command": ["ls"]}}</tool_call>', "argument `command` must be a string, got array"),
    ("unknown-argument", '<tool_call>{"name": "bash", "arguments": {"command": "ls", "sudo": true}}</tool_call>', "unknown argument `sudo`"),
]
# fmt: on


def test_hostile_text_is_parsed_in_linear_time_into_short_errors():
    import time

    for case_id, text, needle in HOSTILE:
        t0 = time.monotonic()
        r = parse_tool_calls(text, "auto", TOOLS)
        elapsed = time.monotonic() - t0
        obs = r.error_observation()
        assert elapsed < 10, (case_id, elapsed)  # quadratic parsing took minutes on these
        assert len(obs) < 4000, (case_id, len(obs))
        if needle:
            assert not r.ok and needle in obs, (case_id, obs[:300])
        else:
            assert r.ok and len(r.calls) == 1, (case_id, obs[:300])


def test_function_outside_a_block_is_reported_only_without_a_call():
    text = "I will use <function=bash> now.\n" + format_tool_call(ToolCall("bash", {"command": "ls"}), "mimo")
    assert parse_tool_calls(text, "auto", TOOLS).ok
    r = parse_tool_calls("<function=bash><parameter=command>ls</parameter></function>", "auto", TOOLS)
    assert "outside `<tool_call>`" in r.error_observation()
