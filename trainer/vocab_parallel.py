"""The student's token log-probs from vocab-sharded logits (tensor parallelism), without gathering them.

Under TP the output layer leaves each rank the logits of its slice of the vocabulary. log p(y) is
z_y - max - log sum exp(z - max): the max, the sum of exponentials and the target's logit are each
one all-reduce over the TP group of a [B, N] tensor (the target logit lives on one rank, the others
add zero). Entropy and the teacher's top-k tokens go the same way. The all-reduces are Megatron's
`reduce_from_tensor_model_parallel_region` (sum forward, identity backward): every TP rank computes the
same loss from the reduced values, so each rank's gradient reaches exactly its own slice of logits.
Results equal trainer.losses.token_logprobs_and_entropy on the full logits up to float rounding.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.tensor_parallel.mappings import reduce_from_tensor_model_parallel_region

from trainer.losses import StudentLogprobs


def _owned(local: torch.Tensor, ids: torch.Tensor, start: int) -> torch.Tensor:
    """Logits of `ids` ([B, N] or [B, N, k]) where this rank owns them, 0 elsewhere, summed over ranks."""
    width = local.shape[-1]
    shifted = ids - start
    mine = (shifted >= 0) & (shifted < width)
    flat = shifted.clamp(0, width - 1).reshape(*ids.shape[:2], -1)
    picked = local.gather(-1, flat).reshape(ids.shape) * mine
    return reduce_from_tensor_model_parallel_region(picked)


def logprobs_and_entropy(local_logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0,
                         top_ids: torch.Tensor | None = None,
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Vocab-parallel twin of trainer.losses.token_logprobs_and_entropy (same outputs, in fp32)."""
    z = local_logits.float() / temperature
    start = ps.get_tensor_model_parallel_rank() * z.shape[-1]
    with torch.no_grad():
        peak = z.max(dim=-1).values
        dist.all_reduce(peak, op=dist.ReduceOp.MAX, group=ps.get_tensor_model_parallel_group())
    shifted = z - peak.unsqueeze(-1)
    exp = shifted.exp()
    log_norm = reduce_from_tensor_model_parallel_region(exp.sum(-1)).log()  # log sum exp(z - max)
    token_lp = _owned(shifted, targets, start) - log_norm
    top_lp = _owned(shifted, top_ids, start) - log_norm.unsqueeze(-1) if top_ids is not None else None
    with torch.no_grad():  # H = log Z - E_p[z - max]
        mean_shifted = reduce_from_tensor_model_parallel_region((exp * shifted).sum(-1)) / log_norm.exp()
        entropy = log_norm - mean_shifted
    return token_lp, entropy, top_lp


def student_logprobs(local_logits: torch.Tensor, targets: torch.Tensor, temperature: float,
                     top_ids: torch.Tensor | None = None, need_untempered: bool = True) -> StudentLogprobs:
    """trainer.losses.student_logprobs for vocab-sharded logits (same views, same rules for T != 1)."""
    lp, ent, top = logprobs_and_entropy(local_logits, targets, temperature, top_ids if temperature == 1.0 else None)
    if temperature == 1.0 or not need_untempered:
        return StudentLogprobs(lp, ent, lp, top)
    lp1, _, top1 = logprobs_and_entropy(local_logits, targets, 1.0, top_ids)
    return StudentLogprobs(lp, ent, lp1, top1)
