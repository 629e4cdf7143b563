"""The benchmark's world: a weak generalist base student and one SFT expert per domain from that base.

Why not `mopd.toy.world` as it is: its base student is a randomly initialised network. From a random
base no method learns anything within this benchmark's CPU budget (measured: on-policy distillation
still had 0 accuracy on every domain after 37k sampled tokens, and one teacher needs ~80k gold tokens
of SFT). The MOPD setting is a student that is already a generalist and teachers that are specialists
derived from it, so here the base is first warmed up by a short SFT on a mix of all domains
(`base_steps`), and each teacher continues from that base on its own domain only (`teacher_steps`).
The tokenizer, model architecture, datasets and teacher SFT are the toy world's own functions.
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from envs.toy_tasks import END_OF_TURN, make_examples
from mopd.toy.models import create_tiny_model
from mopd.toy.tokenizer import build_char_tokenizer
from mopd.toy.world import ToyWorldSpec, train_teacher, write_datasets

log = logging.getLogger(__name__)
MANIFEST = "bench_world.json"


@dataclass
class WorldSpec:
    domains: tuple[str, ...] = ("arith", "reverse", "sort")
    arch: str = "qwen3_moe"
    hidden_size: int = 64
    num_layers: int = 2
    base_steps: int = 150  # mixed-domain SFT of the base student (0 = random base, as mopd.toy.world)
    base_lr: float = 3e-3
    teacher_steps: int = 400
    teacher_lr: float = 3e-3
    batch: int = 32
    train_prompts_per_domain: int = 2000
    test_prompts_per_domain: int = 200
    seed: int = 0

    def toy_spec(self) -> ToyWorldSpec:
        return ToyWorldSpec(domains=tuple(self.domains), arch=self.arch, hidden_size=self.hidden_size,
                            num_layers=self.num_layers, teacher_steps=self.teacher_steps, teacher_batch=self.batch,
                            teacher_lr=self.teacher_lr, train_prompts_per_domain=self.train_prompts_per_domain,
                            test_prompts_per_domain=self.test_prompts_per_domain, seed=self.seed)


@dataclass
class World:
    root: Path

    @property
    def student(self) -> Path:
        return self.root / "student"

    def teacher(self, domain: str) -> Path:
        return self.root / f"teacher_{domain}"

    @property
    def train_file(self) -> Path:
        return self.root / "data" / "train.jsonl"

    @property
    def test_file(self) -> Path:
        return self.root / "data" / "test.jsonl"


def build_world(root: str | Path, spec: WorldSpec) -> World:
    """Create (or reuse, when the manifest matches `spec`) the base student, teachers and datasets."""
    world = World(Path(root))
    manifest = world.root / MANIFEST
    wanted = {**asdict(spec), "domains": list(spec.domains)}
    if manifest.exists() and json.loads(manifest.read_text()) == wanted:
        return world
    world.root.mkdir(parents=True, exist_ok=True)
    tokenizer = build_char_tokenizer()
    create_tiny_model(world.student, tokenizer, arch=spec.arch, seed=spec.seed, hidden_size=spec.hidden_size,
                      num_layers=spec.num_layers)
    if spec.base_steps > 0:
        log.info("world: mixed-domain SFT of the base student (%d steps)", spec.base_steps)
        warm_up_base(world.student, spec)
    for domain in spec.domains:
        log.info("world: fine-tuning the %s teacher from the base (%d steps)", domain, spec.teacher_steps)
        train_teacher(world.student, world.teacher(domain), domain, spec.toy_spec())
    write_datasets(world.root / "data", spec.toy_spec())
    manifest.write_text(json.dumps(wanted, indent=2))
    return world


def warm_up_base(path: Path, spec: WorldSpec) -> None:
    """SFT on gold answers of every domain at once, in place: a weak generalist, not an expert."""
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec.base_lr, weight_decay=0.0)
    rng = random.Random(spec.seed + 7)
    for step in range(spec.base_steps):
        rows = [row for d in spec.domains
                for row in make_examples(d, spec.batch // len(spec.domains) + 1, seed=10_000_019 * (step + 1))]
        rng.shuffle(rows)
        input_ids, labels = sft_batch(tokenizer, rows[:spec.batch])
        loss = model(input_ids=input_ids, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
    log.info("world: base student final SFT loss %.4f", loss.item())
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)


def sft_batch(tokenizer: PreTrainedTokenizerBase, rows: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded prompt+answer ids; labels only on the answer and its end-of-turn token."""
    sequences, masks = [], []
    for row in rows:
        prompt = tokenizer.apply_chat_template(row["prompt"], tokenize=False, add_generation_prompt=True)
        p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        r_ids = tokenizer(row["label"] + END_OF_TURN, add_special_tokens=False)["input_ids"]
        sequences.append(p_ids + r_ids)
        masks.append([0] * len(p_ids) + [1] * len(r_ids))
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    for i, (seq, mask) in enumerate(zip(sequences, masks)):
        input_ids[i, :len(seq)] = torch.tensor(seq)
        labels[i, :len(seq)] = torch.where(torch.tensor(mask).bool(), torch.tensor(seq), -100)
    return input_ids, labels
