"""The toy character tokenizer: every character of a prompt is its own token, newlines included."""

from mopd.toy.tokenizer import build_char_tokenizer


def test_consecutive_newlines_are_one_token_each_and_round_trip():
    tokenizer = build_char_tokenizer()
    text = "fix:\n\n  the bug\n\n\n"
    ids = tokenizer(text)["input_ids"]
    assert len(ids) == len(text) and tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids) == text
