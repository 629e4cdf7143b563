"""Pre-training the MTP heads of a toy MiMo-V2-Flash, so its speculative drafts mean something.

MiMo-V2-Flash trains its MTP blocks with the base model; the toy world does it right after the
base warm-up (one call, `train_mtp_heads(student_dir, prompts)`): the main model is frozen, it
samples continuations of the prompts (self-distillation: the draft learns the tokens the policy
will sample, as EAGLE-style drafts are trained on the target's outputs), and the MTP layers learn
them with the trainer's MTP loss (rollout.mtp.MTPHead.chain, depth k predicting t_{i+k+1}). The
checkpoint's `model.mtp.*` tensors are rewritten in place.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from rollout.mtp import MTP_PREFIX, MTPHead

log = logging.getLogger(__name__)


@torch.no_grad()
def _rollouts(model: torch.nn.Module, prompts: list[list[int]], new_tokens: int, temperature: float,
              gen: torch.Generator, eos: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-aligned prompt + sampled continuation per row (full forward per token: tiny models only)."""
    width = max(len(p) for p in prompts) + new_tokens
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.bool)  # positions whose next token is a target
    lens = [len(p) for p in prompts]
    for i, p in enumerate(prompts):
        ids[i, :len(p)] = torch.tensor(p)
    done = [False] * len(prompts)
    for _ in range(new_tokens):
        logits = model(ids[:, :max(lens)]).logits.float()
        for i in range(len(prompts)):
            if done[i]:
                continue
            row = logits[i, lens[i] - 1]
            tok = (int(row.argmax()) if temperature <= 0 else
                   int(torch.multinomial(torch.softmax(row / temperature, -1), 1, generator=gen)))
            ids[i, lens[i]] = tok
            mask[i, lens[i] - 1] = True
            lens[i] += 1
            done[i] = tok == eos
        if all(done):
            break
    return ids[:, :max(lens)], mask[:, :max(lens)]


def train_mtp_heads(path: str | Path, prompts: list[list[int]], *, steps: int = 200, batch: int = 16,
                    new_tokens: int = 16, temperature: float = 1.0, lr: float = 3e-3, seed: int = 0) -> list[float]:
    """Train the checkpoint's MTP layers on the frozen model's own samples; returns the loss per step."""
    path = Path(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    state = load_file(str(path / "model.safetensors"))
    head = MTPHead.from_state(model.config, state)
    if head is None:
        raise ValueError(f"{path}: no model.mtp.* tensors to train")
    for p in model.parameters():
        p.requires_grad_(False)
    kept: dict[str, torch.Tensor] = {}
    model.model.norm.register_forward_pre_hook(lambda _m, args: kept.update(h=args[0]))
    head.train()
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    eos = model.config.eos_token_id
    eos = eos[0] if isinstance(eos, list) else eos
    losses = []
    D = len(head)
    for step in range(steps):
        pick = torch.randint(0, len(prompts), (batch,), generator=gen).tolist()
        ids, target_mask = _rollouts(model, [prompts[i] for i in pick], new_tokens, temperature, gen, eos)
        B, S = ids.shape
        with torch.no_grad():
            model(ids)
        hidden = kept["h"].detach()
        next_ids = torch.cat([ids[:, 1:], ids[:, :D]], dim=1)
        pos = torch.arange(S).expand(B, S)
        logits = head.chain(model, hidden, next_ids, pos, torch.ones(B, S, dtype=torch.bool))
        loss = torch.zeros(())
        for k, lg in enumerate(logits):
            n = S - 2 - k
            if n <= 0:
                continue
            nll = torch.nn.functional.cross_entropy(lg[:, :n].reshape(-1, lg.shape[-1]),
                                                    ids[:, k + 2:k + 2 + n].reshape(-1), reduction="none")
            m = target_mask[:, k + 1:k + 1 + n].reshape(-1).float()  # t_{i+k+2} sampled by the model
            loss = loss + (nll * m).sum() / m.sum().clamp(min=1) / D
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    log.info("toy MTP heads: loss %.3f -> %.3f over %d steps", losses[0], losses[-1], steps)
    with torch.no_grad():
        for name, param in head.hf_parameters().items():
            state[name] = param.detach().clone().contiguous()
    assert all(n in state for n in head.hf_parameters()) and any(n.startswith(MTP_PREFIX) for n in state)
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    return losses


def train_toy_mtp(student: str | Path, domains: tuple[str, ...] | list[str], *, steps: int = 150,
                  seed: int = 0) -> list[float]:
    """The toy world's call after the base warm-up: MTP heads (fresh ones if the SFT save dropped them,
    as `save_pretrained` does) trained on the warmed-up student's own answers to toy prompts."""
    from transformers import AutoTokenizer

    from envs.toy_tasks import make_examples
    from mopd.toy.models import mimo_mtp_tensors

    student = Path(student)
    model_file = student / "model.safetensors"
    state = load_file(str(model_file))
    if not any(n.startswith(MTP_PREFIX) for n in state):
        from transformers import AutoConfig

        cfg = AutoConfig.from_pretrained(student)
        n = int(getattr(cfg, "num_nextn_predict_layers", 0) or 0)
        if n == 0:
            raise ValueError(f"{student}: config has no num_nextn_predict_layers; no MTP heads to train")
        state.update(mimo_mtp_tensors(cfg, n, torch.Generator().manual_seed(seed + 5)))
        save_file(state, str(model_file), metadata={"format": "pt"})
    tokenizer = AutoTokenizer.from_pretrained(student)
    prompts = []
    for d in domains:
        for row in make_examples(d, 64, seed=seed + 77):
            text = tokenizer.apply_chat_template(row["prompt"], tokenize=False, add_generation_prompt=True)
            prompts.append(tokenizer(text, add_special_tokens=False)["input_ids"])
    return train_mtp_heads(student, prompts, steps=steps, batch=16, new_tokens=16, temperature=1.0, seed=seed)
