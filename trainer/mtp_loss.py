"""MTP loss during RL: keeps the MTP (draft) layers predicting the moving policy's tokens, so MTP
speculative decoding keeps its acceptance length as training goes on (`trainer.mtp_loss_coef`).

Depth k = 1..D at position i (DeepSeek-V3 / MiMo-V2-Flash MTP):
    x = eh_proj([enorm(E[t_{i+k}]); hnorm(h^{k-1}_i)]),  h^k = MTP block k (dense FFN, SWA)
    logits = output_layer(final_layernorm_k(h^k_i)),      target t_{i+k+1}
h^0 is the main model's last hidden state before its final norm, and each depth hands the next its
output before its own final norm: SGLang's multi-layer MTP worker chains MiMo's draft steps the
same way (`return_hidden_states_before_norm`).

The loss trains the MTP layers only: the main hidden states, the token embedding and the output
layer enter detached, so the policy's gradient is the same with or without it. Targets are the
trained tokens (loss mask 1) and the loss is the cross-entropy of the sampled tokens (on-policy,
an unbiased estimate of H(pi_theta, draft)); per sequence, the mean over its targets, averaged
over depths; summed over sequences like the main loss.

Model parallelism (as Megatron's MultiTokenPredictionLayer): under TP the states are sequence-parallel
slices, so each depth rolls the gathered embeddings, gathers eh_proj's column-parallel output and
scatters it back to this rank's slice; the output layer gives this rank's slice of the vocabulary
(trainer.vocab_parallel reads log-probs from it). Under PP the MTP layers live on the last stage, which
has no token embedding: the first stage sends its embedding output of each trained microbatch there
(over Megatron's embedding group, the first and last stage of each pipeline). The model may run padded
at the end (trainer.parallel.lockstep_shapes); causal attention keeps the real positions exact.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core import parallel_state as ps
from megatron.core.tensor_parallel.mappings import (
    gather_from_sequence_parallel_region,
    gather_from_tensor_model_parallel_region,
    scatter_to_sequence_parallel_region,
)

from mopd.core.errors import ConfigError
from trainer import parallel_pipeline, vocab_parallel


class MTPLoss:
    """Computes the MTP loss of a GPTModel whose `mtp` attribute holds Megatron MTP layers (on the last
    pipeline stage; every stage builds one of these, the first one sends it embeddings)."""

    def __init__(self, model: torch.nn.Module, coef: float) -> None:
        mtp = getattr(model, "mtp", None)
        built = parallel_pipeline.from_last_stage(len(mtp.layers) if mtp is not None else 0)
        if coef > 0 and not built:
            raise ConfigError("trainer.mtp_loss_coef", "0 for a model without MTP layers (the HF config has no "
                              "num_nextn_predict_layers, or the trainer built none)", coef)
        self.model, self.coef = model, coef
        self.layers = list(mtp.layers) if (mtp is not None and coef > 0) else []
        self._hidden: torch.Tensor | None = None
        self._armed = False
        self._sending: tuple[torch.Tensor, dist.Work] | None = None
        self._pp = ps.get_pipeline_model_parallel_world_size()
        if self.layers:  # the input of the final norm is the last hidden state before it
            model.decoder.final_layernorm.register_forward_pre_hook(self._keep_hidden)
        if coef > 0 and self._pp > 1 and ps.is_pipeline_first_stage():
            model.embedding.register_forward_hook(self._send_embeddings)

    @property
    def active(self) -> bool:
        """Whether the loss is on (on every pipeline stage, though only the last computes it)."""
        return self.coef > 0

    def _keep_hidden(self, module: torch.nn.Module, args: tuple) -> None:
        if self._armed:
            self._hidden = args[0].detach()

    def _send_embeddings(self, module: torch.nn.Module, args: tuple, output: torch.Tensor) -> None:
        if self._armed:
            emb = output.detach().contiguous()
            work = dist.isend(emb, dst=ps.get_pipeline_model_parallel_last_rank(), group=ps.get_embedding_group())
            self._sending = (emb, work)

    @contextlib.contextmanager
    def capture(self) -> Iterator[None]:
        """Keep the main model's pre-norm hidden states of the forward run inside this block (on the
        first of several pipeline stages: send that forward's token embeddings to the last)."""
        self._armed = self.active
        try:
            yield
        finally:
            self._armed = False
            if self._sending is not None:
                self._sending[1].wait()
                self._sending = None

    def _embeddings(self, tokens: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Token embeddings of the padded batch, as the main model's first stage computed them (detached)."""
        if self._pp == 1:
            S = tokens.shape[1]
            with torch.no_grad():
                return self.model.embedding(input_ids=tokens, position_ids=torch.arange(S, device=tokens.device)
                                            .expand_as(tokens))
        emb = torch.empty_like(like)
        dist.recv(emb, src=ps.get_pipeline_model_parallel_first_rank(), group=ps.get_embedding_group())
        return emb

    def loss_sum(self, tokens: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
        """Sum over sequences of the per-sequence MTP loss (mean over depths) for the captured forward.

        tokens: [B, S] (right-padded); loss_mask: [B, S-1], aligned with tokens[:, 1:].
        """
        if self._hidden is None:
            raise RuntimeError("MTPLoss.loss_sum needs a main-model forward inside MTPLoss.capture()")
        hidden, self._hidden = self._hidden, None  # [S', B', H]: the model's padded run (S'/tp under SP)
        model = self.model
        B, S = tokens.shape
        tp, sp = ps.get_tensor_model_parallel_world_size(), bool(model.config.sequence_parallel)
        padded = F.pad(tokens, (0, hidden.shape[0] * (tp if sp else 1) - S, 0, hidden.shape[1] - B))
        with torch.no_grad():
            emb = self._embeddings(padded, hidden)
            if sp:  # rolled over the whole sequence, then cut to this rank's slice again
                emb = gather_from_sequence_parallel_region(emb)
        weight = (model.shared_embedding_or_output_weight() if model.share_embeddings_and_output_weights
                  else model.output_layer.weight).detach()
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for k, layer in enumerate(self.layers, start=1):
            if S - 1 - k <= 0:
                break
            next_emb = torch.roll(emb, shifts=-k, dims=0)  # row i: embedding of t_{i+k} (tail rows unused)
            if sp:
                next_emb = next_emb.chunk(tp, dim=0)[ps.get_tensor_model_parallel_rank()]
            x, _ = layer.eh_proj(torch.cat([layer.enorm(next_emb), layer.hnorm(hidden)], dim=-1))
            if tp > 1:  # column-parallel output: every rank needs all of it (Megatron's _concat_embeddings)
                x = gather_from_tensor_model_parallel_region(x)
                if sp:
                    x = scatter_to_sequence_parallel_region(x)
            hidden, _ = layer.transformer_layer(hidden_states=x, attention_mask=None)
            n = S - 1 - k  # positions i with a target t_{i+k+1}
            target = tokens[:, k + 1:k + 1 + n]
            if tp > 1:  # [S', B', V / tp]: this rank's slice of the vocabulary
                logits, _ = model.output_layer(layer.final_layernorm(hidden), weight=weight)
                logp_target, _, _ = vocab_parallel.logprobs_and_entropy(logits[:n, :B].transpose(0, 1), target)
            else:
                logits = F.linear(layer.final_layernorm(hidden), weight)  # [S', B', V]
                logp = torch.log_softmax(logits[:n, :B].float(), dim=-1).transpose(0, 1)  # [B, n, V]
                logp_target = logp.gather(-1, target.unsqueeze(-1)).squeeze(-1)
            mask = loss_mask[:, k:k + n].to(logp_target.dtype)
            per_seq = (-logp_target * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)
            total = total + per_seq.sum()
        return total / len(self.layers)
