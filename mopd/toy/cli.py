"""`mopd-toy init DIR`: write the toy world (tokenizer, student, domain teachers, datasets)."""

from __future__ import annotations

import argparse
import logging

from envs.toy_tasks import TOY_DOMAINS
from mopd.toy.world import ToyWorldSpec, check_toy_domains, ensure_toy_world


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="mopd-toy", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    init = sub.add_parser("init", help="create the toy world in DIR (skipped if an identical one exists)")
    init.add_argument("dir")
    init.add_argument("--domains", default="arith,reverse",
                      help=f"comma-separated subset of {','.join(sorted(TOY_DOMAINS))}")
    init.add_argument("--arch", default="qwen3_moe", choices=["qwen3_moe", "qwen3", "mimo_v2_flash"])
    init.add_argument("--base-steps", type=int, default=0, help="mixed-domain SFT steps of the base student")
    init.add_argument("--teacher-steps", type=int, default=300, help="SFT steps per domain teacher")
    init.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    domains = tuple(d.strip() for d in args.domains.split(",") if d.strip())
    try:  # before anything is written
        check_toy_domains(domains)
    except ValueError as e:
        parser.error(str(e))
    if not domains:
        parser.error("--domains: expected at least one toy domain")
    root = ensure_toy_world(args.dir, ToyWorldSpec(domains=domains, arch=args.arch, base_steps=args.base_steps,
                                                   teacher_steps=args.teacher_steps, seed=args.seed))
    print(f"toy world ready in {root}: student/, " + ", ".join(f"teacher_{d}/" for d in domains) + ", data/")


if __name__ == "__main__":
    main()
