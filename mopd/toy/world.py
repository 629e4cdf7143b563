"""The toy world for dry runs: tokenizer, a base student, one SFT-trained teacher per domain, datasets.

The base student is a random init, optionally warmed up by a short SFT on a mix of all domains
(`base_steps`); each teacher continues from that base on its own domain only, so each is an expert
in one domain and MOPD has something real to distil. A multi-turn domain (`tool`) trains on
expert episodes against its environment, tokenized as the agent loop builds them
(mopd/toy/conversations.py), for as many steps as it needs (envs/toy_tasks.py). With `recovery_prob`,
rounds of the correctable domains (`shiftfix`, `rotfix`) sometimes show a slip, loss-masked, and its `!`
correction: models that can recover but never slip on purpose. Everything is written
with `save_pretrained` and read back by path, exactly like real checkpoints.
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from envs.toy_tasks import END_OF_TURN, TOY_DOMAINS, make_examples, with_slips
from mopd.toy.conversations import gold_sequence
from mopd.toy.models import create_tiny_model
from mopd.toy.tokenizer import build_char_tokenizer

log = logging.getLogger(__name__)
MANIFEST = "toy_world.json"


@dataclass
class ToyWorldSpec:
    domains: tuple[str, ...] = ("arith", "reverse")
    arch: str = "qwen3_moe"
    hidden_size: int = 64
    num_layers: int = 2
    base_steps: int = 0  # mixed-domain SFT of the base student; 0 = a random base
    teacher_steps: int = 300
    teacher_batch: int = 32
    teacher_lr: float = 3e-3
    train_prompts_per_domain: int = 2000
    test_prompts_per_domain: int = 200
    seed: int = 0
    # in SFT (base and teachers) on correctable domains, the probability that a round shows a loss-masked
    # slip and its `!` correction (envs/toy_tasks.py `with_slips`); 0 = gold answers only
    recovery_prob: float = 0.0


def toy_world_ready(root: str | Path, spec: ToyWorldSpec) -> bool:
    """True when a complete toy world with this spec is under `root` (else ensure_toy_world builds it)."""
    manifest = Path(root) / MANIFEST
    try:
        return manifest.is_file() and json.loads(manifest.read_text()) == _spec_dict(spec)
    except (OSError, ValueError):
        return False


def check_toy_domains(domains: tuple[str, ...] | list[str]) -> None:
    """Before anything is built: every domain is one the toy world can generate."""
    unknown = [d for d in domains if d not in TOY_DOMAINS]
    if unknown:
        raise ValueError(f"toy.domains: unknown domain(s) {unknown}; expected a subset of {sorted(TOY_DOMAINS)}")


def ensure_toy_world(root: str | Path, spec: ToyWorldSpec | None = None) -> Path:
    """Create the toy world under `root` unless a complete one with the same spec is already there."""
    spec = spec or ToyWorldSpec()
    root = Path(root)
    manifest = root / MANIFEST
    wanted = _spec_dict(spec)
    if toy_world_ready(root, spec):
        return root
    check_toy_domains(spec.domains)
    root.mkdir(parents=True, exist_ok=True)
    tokenizer = build_char_tokenizer()
    create_tiny_model(root / "student", tokenizer, arch=spec.arch, seed=spec.seed, hidden_size=spec.hidden_size,
                      num_layers=spec.num_layers)
    if spec.base_steps > 0:
        log.info("toy world: warming up the base student on all domains (%d steps)", spec.base_steps)
        sft(root / "student", root / "student", spec.domains, spec.base_steps, spec, seed=spec.seed + 2)
    if spec.arch == "mimo_v2_flash":  # MTP heads learn the (warmed-up) student's own samples: draft heads
        from mopd.toy.mtp import train_toy_mtp  # that agree with it, as the released model's do

        train_toy_mtp(root / "student", spec.domains, seed=spec.seed)
    for domain in spec.domains:
        train_teacher(root / "student", root / f"teacher_{domain}", domain, spec)
    write_datasets(root / "data", spec)
    manifest.write_text(json.dumps(wanted, indent=2))
    return root


def write_datasets(data_dir: Path, spec: ToyWorldSpec) -> None:
    data_dir.mkdir(parents=True, exist_ok=True)
    for split, n, seed in (("train", spec.train_prompts_per_domain, spec.seed),
                           ("test", spec.test_prompts_per_domain, spec.seed + 10_000)):
        rows = [row for d in spec.domains for row in make_examples(d, n, seed)]
        random.Random(seed).shuffle(rows)
        with open(data_dir / f"{split}.jsonl", "w") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)


def sft(base: Path, out: Path, domains: tuple[str, ...], steps: int, spec: ToyWorldSpec, *, seed: int,
        batch: int | None = None) -> Path:
    """Supervised fine-tuning on gold episodes of `domains` (model tokens only), saved to `out`.

    `batch` rows per step (default `spec.teacher_batch`), split evenly over the domains."""
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec.teacher_lr, weight_decay=0.0)
    per_domain = max(1, (batch or spec.teacher_batch) // len(domains))
    slips = random.Random(f"slips:{seed}")
    for step in range(steps):
        rows = [row for d in domains for row in make_examples(d, per_domain, seed=seed * 100_003 + step)]
        input_ids, labels = _sft_batch(tokenizer, rows, spec.recovery_prob, slips)
        loss = model(input_ids=input_ids, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
    log.info("toy world: SFT on %s done, final loss %.4f", ",".join(domains), loss.item())
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def train_teacher(base: Path, out: Path, domain: str, spec: ToyWorldSpec) -> Path:
    """A domain expert: the base fine-tuned on one domain only, for at least the steps it needs."""
    need = TOY_DOMAINS[domain]
    steps = max(spec.teacher_steps, need.teacher_steps)
    log.info("toy world: fine-tuning the %s teacher (%d steps)", domain, steps)
    return sft(base, out, (domain,), steps, spec, seed=spec.seed + 1, batch=need.teacher_batch or spec.teacher_batch)


def recovery_sequence(tokenizer: PreTrainedTokenizerBase, row: dict, prob: float,
                      rng: random.Random) -> tuple[list[int], list[int]]:
    """(token ids, loss mask) of a correctable row answered with slips (each round with probability `prob`)
    and their corrections: the slips carry no loss, the `!` after each and everything else does."""
    ids, mask = gold_sequence(tokenizer, row)
    ids, mask = ids[:mask.index(1)], [0] * mask.index(1)
    pieces = with_slips(row["label"], TOY_DOMAINS[row["domain"]].correctable, prob, rng) + [(END_OF_TURN, False)]
    for text, slip in pieces:
        piece = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids, mask = ids + piece, mask + [0 if slip else 1] * len(piece)
    return ids, mask


def _sft_batch(tokenizer: PreTrainedTokenizerBase, rows: list[dict], recovery_prob: float,
               rng: random.Random) -> tuple[torch.Tensor, torch.Tensor]:
    sequences, masks = [], []
    for row in rows:
        if TOY_DOMAINS[row["domain"]].correctable and recovery_prob > 0:
            ids, mask = recovery_sequence(tokenizer, row, recovery_prob, rng)
        else:
            ids, mask = gold_sequence(tokenizer, row)
        sequences.append(ids)
        masks.append(mask)
    width = max(len(s) for s in sequences)
    pad = tokenizer.pad_token_id
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    for i, (seq, mask) in enumerate(zip(sequences, masks)):
        input_ids[i, :len(seq)] = torch.tensor(seq)
        labels[i, :len(seq)] = torch.where(torch.tensor(mask).bool(), torch.tensor(seq), -100)
    return input_ids, labels


def _spec_dict(spec: ToyWorldSpec) -> dict:
    d = dict(spec.__dict__)
    d["domains"] = list(spec.domains)
    if not spec.recovery_prob:  # worlds built before the option keep their manifest (and are not rebuilt)
        del d["recovery_prob"]
    return d
