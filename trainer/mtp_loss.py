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
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from mopd.core.errors import ConfigError


class MTPLoss:
    """Computes the MTP loss of a GPTModel whose `mtp` attribute holds Megatron MTP layers."""

    def __init__(self, model: torch.nn.Module, coef: float) -> None:
        mtp = getattr(model, "mtp", None)
        if coef > 0 and mtp is None:
            raise ConfigError("trainer.mtp_loss_coef", "0 for a model without MTP layers (the HF config has no "
                              "num_nextn_predict_layers, or the trainer built none)", coef)
        self.model, self.coef = model, coef
        self.layers = list(mtp.layers) if (mtp is not None and coef > 0) else []
        self._hidden: torch.Tensor | None = None
        self._armed = False
        if self.layers:  # the input of the final norm is the last hidden state before it
            model.decoder.final_layernorm.register_forward_pre_hook(self._keep_hidden)

    @property
    def active(self) -> bool:
        return bool(self.layers)

    def _keep_hidden(self, module: torch.nn.Module, args: tuple) -> None:
        if self._armed:
            self._hidden = args[0].detach()

    @contextlib.contextmanager
    def capture(self) -> Iterator[None]:
        """Keep the main model's pre-norm hidden states of the forward run inside this block."""
        self._armed = self.active
        try:
            yield
        finally:
            self._armed = False

    def loss_sum(self, tokens: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
        """Sum over sequences of the per-sequence MTP loss (mean over depths) for the captured forward.

        tokens: [B, S] (right-padded); loss_mask: [B, S-1], aligned with tokens[:, 1:].
        """
        if self._hidden is None:
            raise RuntimeError("MTPLoss.loss_sum needs a main-model forward inside MTPLoss.capture()")
        model = self.model
        B, S = tokens.shape
        # [S, B, H]; the model may have run padded at the end (trainer.parallel.lockstep_shapes): causal, so
        # the real positions' states do not depend on the padding
        hidden, self._hidden = self._hidden[:S, :B], None
        with torch.no_grad():
            emb = model.embedding(input_ids=tokens, position_ids=torch.arange(S, device=tokens.device).expand(B, S))
        weight = (model.shared_embedding_or_output_weight() if model.share_embeddings_and_output_weights
                  else model.output_layer.weight).detach()
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for k, layer in enumerate(self.layers, start=1):
            if S - 1 - k <= 0:
                break
            next_emb = torch.roll(emb, shifts=-k, dims=0)  # row i: embedding of t_{i+k} (tail rows unused)
            x, _ = layer.eh_proj(torch.cat([layer.enorm(next_emb), layer.hnorm(hidden)], dim=-1))
            hidden, _ = layer.transformer_layer(hidden_states=x, attention_mask=None)
            logits = F.linear(layer.final_layernorm(hidden), weight)  # [S, B, V]
            n = S - 1 - k  # positions i with a target t_{i+k+1}
            logp = torch.log_softmax(logits[:n].float(), dim=-1).transpose(0, 1)  # [B, n, V]
            target = tokens[:, k + 1:k + 1 + n]
            nll = -logp.gather(-1, target.unsqueeze(-1)).squeeze(-1)
            mask = loss_mask[:, k:k + n].to(nll.dtype)
            per_seq = (nll * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)
            total = total + per_seq.sum()
        return total / len(self.layers)
