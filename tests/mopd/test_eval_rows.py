"""Held-out rows: multi-turn environment rows are not evaluated as single generations."""

import json

from mopd.evaluate import load_eval_rows


def test_rows_of_a_multi_turn_environment_are_left_out(tmp_path):
    path = tmp_path / "test.jsonl"
    rows = [{"prompt": "1+2=", "domain": "arith", "label": "3"},
            {"prompt": [{"role": "user", "content": "read k7"}], "domain": "tool", "label": "ab12",
             "env": "toy_tool", "task": {"file": "k7", "value": "ab12"}},
            {"prompt": "2+2=", "domain": "arith", "label": "4"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    loaded = load_eval_rows(path, per_domain=1)
    assert list(loaded) == ["arith"] and [r["label"] for r in loaded["arith"]] == ["3"]
