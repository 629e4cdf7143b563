"""Pre-training the MTP heads of a toy MiMo-V2-Flash, so its speculative drafts mean something.

MiMo-V2-Flash trains its MTP blocks with the base model; the toy world does it right after the
base warm-up (one call, `train_mtp_heads(student_dir, prompts)`): the main model is frozen, it
samples continuations of the prompts (self-distillation: the draft learns where the policy will
go, as EAGLE-style drafts are trained on the target's outputs), and the MTP layers
(rollout.mtp.MTPHead.chain, depth k predicting t_{i+k+1}) learn the model's own next-token
distribution there: KL(p || q) against the frozen model's softmax at the predicted token's
position, a lower-variance target than the sampled token (whose cross-entropy, the trainer's MTP
loss, has the same minimiser) and the distance speculative sampling pays for (acceptance
1 - TV(p, q)). The checkpoint's `model.mtp.*` tensors are rewritten in place.
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
    """Left-aligned prompt + sampled continuation (up to its first eos) per row, and the mask of positions
    whose next token the model sampled. Generation runs with a KV cache on left-padded prompts, its
    sampling seeded from `gen`."""
    width = max(len(p) for p in prompts)
    padded = torch.zeros(len(prompts), width, dtype=torch.long)
    attention = torch.zeros(len(prompts), width, dtype=torch.long)
    for i, p in enumerate(prompts):
        padded[i, width - len(p):] = torch.tensor(p)
        attention[i, width - len(p):] = 1
    sampling = ({"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0} if temperature > 0
                else {"do_sample": False})
    with torch.random.fork_rng():
        torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
        out = model.generate(padded, attention_mask=attention, max_new_tokens=new_tokens, min_new_tokens=0,
                             eos_token_id=eos, pad_token_id=eos if eos is not None else 0, **sampling)
    rows = []
    for i, p in enumerate(prompts):
        new = out[i, width:].tolist()
        if eos is not None and eos in new:
            new = new[:new.index(eos) + 1]
        rows.append((p, new))
    full = max(len(p) + len(n) for p, n in rows)
    ids = torch.zeros(len(prompts), full, dtype=torch.long)
    mask = torch.zeros(len(prompts), full, dtype=torch.bool)  # positions whose next token is a target
    for i, (p, new) in enumerate(rows):
        ids[i, :len(p) + len(new)] = torch.tensor(p + new)
        mask[i, len(p) - 1:len(p) + len(new) - 1] = True
    return ids, mask


def train_mtp_heads(path: str | Path, prompts: list[list[int]], *, steps: int = 200, batch: int = 16,
                    new_tokens: int = 16, temperature: float = 1.0, lr: float = 3e-3, seed: int = 0) -> list[float]:
    """Train the checkpoint's MTP layers on the frozen model's own samples; returns the loss (mean KL over
    depths) per step."""
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
            target_logp = torch.log_softmax(model(ids).logits.float(), dim=-1)
        hidden = kept["h"].detach()
        next_ids = torch.cat([ids[:, 1:], ids[:, :D]], dim=1)
        pos = torch.arange(S).expand(B, S)
        logits = head.chain(model, hidden, next_ids, pos, torch.ones(B, S, dtype=torch.bool))
        loss = torch.zeros(())
        for k, lg in enumerate(logits):
            n = S - 2 - k
            if n <= 0:
                continue
            # depth k at position i predicts t_{i+k+2}, which the model draws from its row at i+k+1
            kl = torch.nn.functional.kl_div(torch.log_softmax(lg[:, :n], dim=-1), target_logp[:, k + 1:k + 1 + n],
                                            log_target=True, reduction="none").sum(-1).reshape(-1)
            m = target_mask[:, k + 1:k + 1 + n].reshape(-1).float()  # t_{i+k+2} sampled by the model
            loss = loss + (kl * m).sum() / m.sum().clamp(min=1) / D
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
                  new_tokens: int = 16, seed: int = 0) -> list[float]:
    """The toy world's call after the base warm-up: MTP heads (fresh ones if the SFT save dropped them,
    as `save_pretrained` does) trained on the warmed-up student's own answers to toy prompts.

    `new_tokens` should cover the answers the draft will serve: positions past it are never trained."""
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
    return train_mtp_heads(student, prompts, steps=steps, batch=16, new_tokens=new_tokens, temperature=1.0, seed=seed)
