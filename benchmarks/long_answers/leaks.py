"""What the report's dense reward says about a repeat in `anagram` / `shuffle`, at the student's own states.

In these domains a sampled answer fails by a *leak*: at some character the student writes an item its round
has already used (or one the prompt does not have). The reverse-KL reward of that token is
`log pi_T(y) - log pi_S(y)`; it is only as negative as the teacher is surer than the student that the item is
wrong. This walks the student's sampled answers up to their first leak and measures, at every item position:
the probability mass outside the valid items under the student and under its domain's teacher, and the mean
reward of the sampled token when it is valid and when it is a leak.

    python benchmarks/long_answers/leaks.py --world /tmp/any_full/world [--prompts 100] [--samples 2] \
        [--teacher-temperature 0.25]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from envs.toy_tasks import ANY_ORDER_DOMAINS, WIDTH_ANY
from mopd.evaluate import load_eval_rows


def _load(path: Path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@torch.no_grad()
def leak_stats(student: Path, teacher: Path, rows: list[dict], samples: int, seed: int = 0,
               teacher_temperature: float = 1.0) -> dict[str, float]:
    """Means over the item positions of the student's sampled answers, up to and including the first leak; the
    teacher as algo.teacher_temperature makes it score (its softmax at that temperature, here over the whole
    vocabulary)."""
    tok = AutoTokenizer.from_pretrained(student)
    s_model, t_model = _load(student), _load(teacher)
    torch.manual_seed(seed)
    s_out, t_out, ok_reward, leak_reward, positions, leaks, answers = 0.0, 0.0, 0.0, 0.0, 0, 0, 0
    for row in rows:
        items = set(row["prompt"][0]["content"].split(":", 1)[1])
        prompt = tok.apply_chat_template(row["prompt"], tokenize=False, add_generation_prompt=True)
        ids = tok(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
        for _ in range(samples):
            seq = s_model.generate(ids, max_new_tokens=40, do_sample=True, temperature=1.0, top_p=1.0, top_k=0,
                                   eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
            log_s = torch.log_softmax(s_model(seq).logits[0, :-1], -1)
            log_t = torch.log_softmax(t_model(seq).logits[0, :-1] / teacher_temperature, -1)
            answers += 1
            used: set[str] = set()
            for pos in range(ids.shape[1], seq.shape[1]):
                char = tok.decode(seq[0, pos])
                if len(used) == WIDTH_ANY:  # a separator or the end comes here: not an item position
                    if char != ",":
                        break
                    used = set()
                    continue
                valid = [tok.convert_tokens_to_ids(c) for c in sorted(items - used)]
                ls, lt = log_s[pos - 1], log_t[pos - 1]
                s_out += 1 - ls[valid].exp().sum().item()
                t_out += 1 - lt[valid].exp().sum().item()
                positions += 1
                reward = (lt[seq[0, pos]] - ls[seq[0, pos]]).item()
                if char in items - used:
                    ok_reward += reward
                    used.add(char)
                else:
                    leak_reward += reward
                    leaks += 1
                    break
    return {"answers": answers, "item_positions": positions, "answers_with_a_leak": leaks / answers,
            "student_mass_outside_valid": s_out / positions, "teacher_mass_outside_valid": t_out / positions,
            "reward_valid_token": ok_reward / max(1, positions - leaks), "reward_leak_token": leak_reward / max(1, leaks)}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world", type=Path, required=True, help="the benchmark's world (run.py --domains any)")
    p.add_argument("--student", type=Path, help="default: the world's base student")
    p.add_argument("--prompts", type=int, default=100, help="test prompts per domain")
    p.add_argument("--samples", type=int, default=2, help="sampled answers per prompt")
    p.add_argument("--teacher-temperature", type=float, default=1.0,
                   help="score with the teacher sharpened to this temperature (algo.teacher_temperature)")
    args = p.parse_args(argv)
    rows = load_eval_rows(args.world / "data" / "test.jsonl", args.prompts)
    out = {d: leak_stats(args.student or args.world / "student", args.world / f"teacher_{d}", rows[d], args.samples,
                        teacher_temperature=args.teacher_temperature)
           for d in ANY_ORDER_DOMAINS if d in rows}
    print(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
