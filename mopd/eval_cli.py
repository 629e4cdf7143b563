"""`mopd-eval CHECKPOINT`: held-out accuracy of a checkpoint per domain (greedy, sampled, pass@k).

CHECKPOINT is an HF model directory, a run's `checkpoints/step_N` (its `hf/` export is used) or a run
directory (its latest checkpoint). Prompts come from a JSONL file (`--data`, rows with `prompt`,
`domain`, `label`) or from the toy domains (`--domains arith,reverse`, drawn with `--seed`, which
should differ from the training data's seed). `--teacher DIR` (an HF model with the same tokenizer) adds
the per-token reverse KL to that teacher on the checkpoint's own samples: what distillation minimises.
Prints a table; `--json FILE` also writes the numbers.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

EVAL_SEED = 10_007  # toy prompts drawn for evaluation unless --seed says otherwise


def resolve_checkpoint(path: str | Path) -> Path:
    """The HF directory to load for `path` (a model dir, a step dir or a run dir)."""
    path = Path(path)
    if (path / "config.json").is_file():
        return path
    if (path / "hf" / "config.json").is_file():
        return path / "hf"
    steps = [d for d in (path / "checkpoints").glob("step_*") if (d / "hf" / "config.json").is_file()]
    steps = [d for d in steps if d.name[len("step_"):].isdigit()]
    if steps:
        return max(steps, key=lambda d: int(d.name[len("step_"):])) / "hf"
    raise ValueError(f"CHECKPOINT {str(path)!r}: expected an HF model directory (with config.json), "
                     "a checkpoints/step_N directory or a run directory with checkpoints")


def rows_for(args: argparse.Namespace) -> dict[str, list[dict]]:
    from envs.toy_tasks import TOY_DOMAINS, make_examples
    from mopd.evaluate import load_eval_rows

    if args.data:
        rows = load_eval_rows(args.data, args.n)
        if args.domains:
            missing = sorted(set(args.domains) - set(rows))
            if missing:
                raise ValueError(f"--domains: {missing} have no rows in {args.data}; it has {sorted(rows)}")
            rows = {d: rows[d] for d in args.domains}
        return rows
    if not args.domains:
        raise ValueError("give --data FILE or --domains NAME[,NAME...] (toy domains: "
                         f"{', '.join(sorted(TOY_DOMAINS))})")
    unknown = sorted(set(args.domains) - set(TOY_DOMAINS))
    if unknown:
        raise ValueError(f"--domains: unknown toy domains {unknown}; expected some of {sorted(TOY_DOMAINS)}")
    return {d: make_examples(d, args.n, args.seed) for d in args.domains}


def default_max_new_tokens(rows: dict[str, list[dict]]) -> int:
    """Room for the longest answer: 56 tokens for the correctable long-answer domains (a round may be written
    twice), 40 for the other long-answer toy domains (34-35 characters + end), else 12."""
    from envs.toy_tasks import ANY_ORDER_DOMAINS, CORRECTABLE_DOMAINS, LONG_ANSWER_DOMAINS

    if set(rows) & set(CORRECTABLE_DOMAINS):
        return 56
    return 40 if set(rows) & {*LONG_ANSWER_DOMAINS, *ANY_ORDER_DOMAINS} else 12


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text}")
    return value


def _temperature(text: str) -> float:
    value = float(text)
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text}")
    return value


def _teacher(path: str | None) -> Path | None:
    try:
        return resolve_checkpoint(path) if path else None
    except ValueError as exc:
        raise ValueError(f"--teacher: {exc}") from None


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mopd-eval", description=__doc__.splitlines()[0],
                                epilog="Exit codes: 0 done, 2 bad arguments.")
    p.add_argument("checkpoint", help="HF model dir, checkpoints/step_N dir, or run dir")
    p.add_argument("--domains", type=lambda s: [d for d in s.split(",") if d], default=None,
                   help="comma-separated domains (toy domains, or a subset of --data)")
    p.add_argument("--data", help="JSONL with prompt/domain/label rows (default: toy domains)")
    p.add_argument("--n", type=_positive_int, default=200, help="prompts per domain (default 200)")
    p.add_argument("--seed", type=int, default=EVAL_SEED, help="toy prompt seed and sampling seed")
    p.add_argument("--samples", type=_positive_int, default=4, help="sampled draws per prompt (pass@k, k=1..K)")
    p.add_argument("--temperature", type=_temperature, default=1.0)
    p.add_argument("--max-new-tokens", type=_positive_int, default=None,
                   help="default: 40 when a long-answer toy domain (shift, rot) is evaluated, else 12")
    p.add_argument("--batch-size", type=_positive_int, default=64)
    p.add_argument("--teacher", help="HF model dir (or checkpoint/run dir): also report reverse_kl, the per-token "
                                     "KL(checkpoint || teacher) on the checkpoint's own --samples draws")
    p.add_argument("--json", dest="json_out", help="also write the results to this JSON file")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    console = Console()
    try:
        model_path = resolve_checkpoint(args.checkpoint)
        teacher_path = _teacher(args.teacher)
        rows = rows_for(args)
    except (ValueError, TypeError, OSError, KeyError) as exc:
        console.print(f"[red]mopd-eval: {exc}[/red]")
        return 2
    from mopd.evaluate import evaluate

    max_new_tokens = args.max_new_tokens or default_max_new_tokens(rows)
    try:
        results = evaluate(model_path, rows, max_new_tokens=max_new_tokens, samples=args.samples,
                           temperature=args.temperature, batch_size=args.batch_size, seed=args.seed,
                           teacher=teacher_path)
    except ValueError as exc:
        if teacher_path is None or not str(exc).startswith("teacher:"):
            raise
        console.print(f"[red]mopd-eval: --teacher {teacher_path}: {exc}[/red]")  # a teacher with another vocabulary
        return 2
    table = Table(title=f"mopd-eval {model_path}")
    metrics = [k for k in next(iter(results.values()), {}) if k != "prompts"]
    for col in ["domain", "prompts", *metrics]:
        table.add_column(col, justify="left" if col == "domain" else "right")
    for domain, res in results.items():
        table.add_row(domain, str(res["prompts"]), *(f"{res[m]:.3f}" for m in metrics))
    console.print(table)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"checkpoint": str(model_path), "teacher": teacher_path and str(teacher_path),
                                                   "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
