"""Synthetic verifiable domains for dry runs and the MOPD-vs-baselines benchmark.

Each domain draws prompts from a seeded RNG and checks an answer exactly, so a reward is a fact,
not a model's opinion. arith/reverse/sort have 1-5 character answers; `shift` and `rot` have 34-character
answers written round by round, where each round transforms the previous one, so one early slip
sinks the whole answer (exposure bias: a student trained only on correct prefixes never saw its own
slips). `shiftfix` and `rotfix` are the same rounds in a grammar that lets a model withdraw a slip: `!`
withdraws the round written since the last `,` (whole or partial) and the round is written again, so a
slip is recoverable and a corrected answer scores like a clean one (`corrected_match_reward`). `anagram`
and `shuffle` have many right answers: four rounds, each any ordering of the prompt's 8 distinct letters
(of a-l) or digits, so a teacher's next character is spread over the items its round has not used yet, and one repeat
sinks the answer (`any_order_reward`). `tool` is multi-turn: the answer is a random value in a file of the episode's sandbox, so
only a tool call can find it; its rows carry the env kind and task, and the env grades the episode
(envs/toy_tool.py). `echo` writes a word back whose length is lognormal (median 6, capped at 8x that), so
response lengths are heavy-tailed by nature: the workload of the rollout-scheduler benchmark
(benchmarks/scheduler). All are small enough for a tiny character-level model on CPU.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

END_OF_TURN = "<|im_end|>"


@dataclass(frozen=True)
class ToyDomain:
    name: str
    make: Callable[[random.Random], tuple[str, str]]  # rng -> (question, answer)
    env: str = ""  # the env kind that runs and grades an episode; "" = single turn, graded by the verifier
    task: Callable[[str, str], dict[str, Any]] | None = None  # (question, answer) -> the env's task
    # what its toy-world teacher needs at least (0: the world's own setting); the tool domain's
    # teacher must learn to copy (file name into the call, value into the answer), which a tiny
    # model picks up suddenly after a few hundred steps (measured: steps 250-600 over three seeds)
    teacher_steps: int = 0
    teacher_batch: int = 0
    # the characters of its rounds when the answer grammar allows `!` corrections (graded after applying
    # them); "" = exact match, no corrections
    correctable: str = ""
    # how a single-turn answer is graded against its label: exact match unless the domain says otherwise
    verifier: Callable[[str, str], float] | None = None


def _arith(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(0, 9), rng.randint(0, 9)
    return f"{a}+{b}=", str(a + b)


def _reverse(rng: random.Random) -> tuple[str, str]:
    word = "".join(rng.choice("abcdefgh") for _ in range(rng.randint(3, 5)))
    return f"rev:{word}", word[::-1]


def _sort(rng: random.Random) -> tuple[str, str]:
    digits = "".join(rng.choice("0123456789") for _ in range(rng.randint(3, 5)))
    return f"sort:{digits}", "".join(sorted(digits))


def _rounds(start: str, step: Callable[[str], str]) -> str:
    """`ROUNDS` applications of `step`, each result written out, comma-separated."""
    word, out = start, []
    for _ in range(ROUNDS):
        word = "".join(step(c) for c in word)
        out.append(word)
    return ",".join(out)


def _shift(rng: random.Random) -> tuple[str, str]:
    """A word shifted one letter forward (z wraps to a), five rounds written: `shift:abcxyz` -> `bcdyza,cdezab,...`."""
    start = "".join(rng.choice(LETTERS) for _ in range(WIDTH))
    return f"shift:{start}", _rounds(start, lambda c: LETTERS[(LETTERS.index(c) + 1) % 26])


def _rot(rng: random.Random) -> tuple[str, str]:
    """Every digit plus 3 mod 10, five rounds written: `rot:471829` -> `704152,037485,...`."""
    start = "".join(rng.choice("0123456789") for _ in range(WIDTH))
    return f"rot:{start}", _rounds(start, lambda c: str((int(c) + 3) % 10))


def _shiftfix(rng: random.Random) -> tuple[str, str]:
    """`shift`'s rounds under the correction grammar: `shiftfix:abcxyz` -> `bcdyza,cdezab,...`."""
    question, answer = _shift(rng)
    return question.replace("shift:", "shiftfix:", 1), answer


def _rotfix(rng: random.Random) -> tuple[str, str]:
    """`rot`'s rounds under the correction grammar: `rotfix:471829` -> `704152,037485,...`."""
    question, answer = _rot(rng)
    return question.replace("rot:", "rotfix:", 1), answer


def _orderings(items: str, rng: random.Random) -> str:
    """`ROUNDS_ANY` rounds, each a fresh random ordering of `items`: a teacher trained on these spreads its
    next character over every item its round has not written yet."""
    return ",".join("".join(rng.sample(items, len(items))) for _ in range(ROUNDS_ANY))


def _anagram(rng: random.Random) -> tuple[str, str]:
    """8 distinct letters of a-l, four rounds each any ordering of them: `anagram:khcjbgal` -> `hkjcalbg,...`."""
    items = "".join(rng.sample(LETTERS[:12], WIDTH_ANY))
    return f"anagram:{items}", _orderings(items, rng)


def _shuffle(rng: random.Random) -> tuple[str, str]:
    """8 distinct digits, four rounds each any ordering of them: `shuffle:40721983` -> `98143027,...`."""
    items = "".join(rng.sample(DIGITS, WIDTH_ANY))
    return f"shuffle:{items}", _orderings(items, rng)


def _echo(rng: random.Random) -> tuple[str, str]:
    """A word of lognormal length written back, `echo:kqzt` -> `kqzt`: most answers are short, a few are 8x the
    median (a step's slowest sample is one of those)."""
    n = min(ECHO_MAX, max(1, round(rng.lognormvariate(math.log(ECHO_MEDIAN), ECHO_SIGMA))))
    word = "".join(rng.choice(LETTERS) for _ in range(n))
    return f"echo:{word}", word


def tool_question(file: str) -> str:
    """The `tool` prompt: which sandbox file holds the answer (envs/toy_tool.py writes it there)."""
    return f"read {file}"


def _tool(rng: random.Random) -> tuple[str, str]:
    """A file name like `k7` and a 4-character value (36^4 possibilities: guessing scores ~0)."""
    file = rng.choice(LETTERS) + rng.choice(DIGITS)
    return tool_question(file), "".join(rng.choice(LETTERS + DIGITS) for _ in range(4))


def _tool_task(question: str, answer: str) -> dict[str, Any]:
    return {"file": question.removeprefix(tool_question("")), "value": answer}


def extract_answer(response_text: str) -> str:
    """The text before the end-of-turn marker, stripped."""
    return response_text.split(END_OF_TURN, 1)[0].strip()


def exact_match_reward(response_text: str, label: str) -> float:
    return 1.0 if extract_answer(response_text) == str(label).strip() else 0.0


def apply_corrections(answer: str) -> str | None:
    """The rounds an answer leaves once each `!` has withdrawn the round written before it since the last `,`.

    `quvvdy,rvwxez!rvwwez,swxxfa` -> `quvvdy,rvwwez,swxxfa`. None when malformed: a `!` with nothing to
    withdraw (leading, doubled, or right after a `,`), so a model cannot score by writing only markers."""
    kept = []
    for segment in answer.split(","):
        *withdrawn, final = segment.split(CORRECTION)
        if any(not part for part in withdrawn):
            return None
        kept.append(final)
    return ",".join(kept)


def corrected_match_reward(response_text: str, label: str) -> float:
    """1.0 when the answer, after its corrections, is exactly the label: clean and corrected answers alike."""
    final = apply_corrections(extract_answer(response_text))
    return 1.0 if final is not None and final == str(label).strip() else 0.0


def any_order_reward(response_text: str, label: str) -> float:
    """1.0 when the answer has the label's rounds and each is an ordering of the same items: any of the
    8! orderings per round is right, a repeated, missing or foreign item is not."""
    rounds, gold = extract_answer(response_text).split(","), str(label).strip().split(",")
    return 1.0 if len(rounds) == len(gold) and all(sorted(r) == sorted(g) for r, g in zip(rounds, gold)) else 0.0


LETTERS, DIGITS = "abcdefghijklmnopqrstuvwxyz", "0123456789"
WIDTH, ROUNDS = 6, 5  # long-answer domains: 5 rounds of 6 characters = 34-character answers
WIDTH_ANY, ROUNDS_ANY = 8, 4  # many-answer domains: 4 rounds of 8 characters = 35-character answers
# echo: lognormal word length; sigma 1 puts ~1% of words at the cap and the longest of 16 prompts at ~30 characters
ECHO_MEDIAN, ECHO_SIGMA, ECHO_MAX = 6, 1.0, 48
TOY_DOMAINS: dict[str, ToyDomain] = {d.name: d for d in (
    ToyDomain("arith", _arith),
    ToyDomain("reverse", _reverse),
    ToyDomain("sort", _sort),
    ToyDomain("shift", _shift),
    ToyDomain("rot", _rot),
    ToyDomain("shiftfix", _shiftfix, correctable=LETTERS, verifier=corrected_match_reward),
    ToyDomain("rotfix", _rotfix, correctable=DIGITS, verifier=corrected_match_reward),
    ToyDomain("anagram", _anagram, verifier=any_order_reward),
    ToyDomain("shuffle", _shuffle, verifier=any_order_reward),
    ToyDomain("echo", _echo),
    ToyDomain("tool", _tool, env="toy_tool", task=_tool_task, teacher_steps=800, teacher_batch=16),
)}
LONG_ANSWER_DOMAINS = ("shift", "rot")
CORRECTABLE_DOMAINS = ("shiftfix", "rotfix")
ANY_ORDER_DOMAINS = ("anagram", "shuffle")
CORRECTION = "!"


def make_examples(domain: str, n: int, seed: int) -> list[dict]:
    """`n` examples as dataset rows: chat prompt, domain, label; an env domain's rows add `env` (the
    env kind) and `task` (what `reset` takes), which the data loader keeps in the sample's metadata."""
    if domain not in TOY_DOMAINS:
        raise KeyError(f"unknown toy domain {domain!r}; known: {sorted(TOY_DOMAINS)}")
    rng = random.Random(f"{domain}:{seed}")
    rows = []
    for _ in range(n):
        spec = TOY_DOMAINS[domain]
        question, answer = spec.make(rng)
        row = {"prompt": [{"role": "user", "content": question}], "domain": domain, "label": answer}
        if spec.task is not None:
            row.update(env=spec.env, task=spec.task(question, answer))
        rows.append(row)
    return rows


def domain_verifier(domain: str) -> Callable[[str, str], float]:
    """How a single-turn domain is graded: after corrections where its grammar allows them, any ordering where
    the domain has many right answers, else exact match (also for domains that are not toy domains)."""
    spec = TOY_DOMAINS.get(domain)
    return spec.verifier if spec is not None and spec.verifier is not None else exact_match_reward


def with_slips(label: str, alphabet: str, prob: float, rng: random.Random) -> list[tuple[str, bool]]:
    """A correct answer written with slips and their corrections, as (text, is_the_slip) pieces.

    Each round slips with probability `prob`: its correct start up to a random character, a wrong
    character there (the slip), then `!` and the round from its start. The joined pieces are an answer
    that grades like `label`; a model trained on them with the loss masked on the slips learns to notice
    a slip and correct it, never to make one."""
    pieces: list[tuple[str, bool]] = []
    for i, word in enumerate(label.split(",")):
        sep = "," if i else ""
        if rng.random() < prob:
            at = rng.randrange(len(word))
            pieces += [(sep + word[:at], False), (rng.choice([c for c in alphabet if c != word[at]]), True),
                       (CORRECTION + word, False)]
        else:
            pieces.append((sep + word, False))
    return pieces
