"""Pipeline stages: each rank of a pipeline group holds a contiguous run of decoder layers (the first
also the embedding, the last also the final norm and output layer) and they pass activations forward
and their gradients back with point-to-point send/recv (gloo and NCCL both have them).

The schedule is the simplest correct one: one microbatch at a time goes through every stage forward,
then backward through every stage, before the next starts (no overlap of stages: the pipeline bubble is
the whole pipeline). Every stage of one pipeline sees the same samples, so each knows every microbatch's
shape without asking; activations travel as [S / tp, B, hidden] (sequence parallel slices under TP).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps


class Stage:
    """This rank's pipeline stage of a GPTModel built with pre_process/post_process for it."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.first, self.last = ps.is_pipeline_first_stage(), ps.is_pipeline_last_stage()
        self.hidden_size = model.config.hidden_size
        self._input: torch.Tensor | None = None
        self._output: torch.Tensor | None = None

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Logits on the last stage, this stage's hidden states elsewhere (already sent on)."""
        batch, seq_len = tokens.shape
        if not self.first:
            local = seq_len // ps.get_tensor_model_parallel_world_size() if self.model.config.sequence_parallel \
                else seq_len
            x = torch.empty(local, batch, self.hidden_size, dtype=self.model.config.params_dtype, device=tokens.device)
            dist.recv(x, src=ps.get_pipeline_model_parallel_prev_rank())
            self._input = x.requires_grad_(torch.is_grad_enabled())
            self.model.set_input_tensor(self._input)
        out = self.model(tokens, positions, None)
        if not self.last:
            dist.send(out.detach().contiguous(), dst=ps.get_pipeline_model_parallel_next_rank())
            self._output = out
        return out

    def backward_from_next(self) -> None:
        """A stage before the last: take d loss / d output from the next stage, backpropagate, pass on."""
        grad = torch.empty_like(self._output)
        dist.recv(grad, src=ps.get_pipeline_model_parallel_next_rank())
        self._output.backward(grad)
        self._output = None
        self.send_input_grad()

    def send_input_grad(self) -> None:
        """After this stage's backward: d loss / d input to the previous stage."""
        if not self.first:
            dist.send(self._input.grad.contiguous(), dst=ps.get_pipeline_model_parallel_prev_rank())
        self._input = None


def from_last_stage(obj: Any) -> Any:
    """The last stage's `obj` on every stage of this pipeline (results and metrics live there)."""
    if ps.get_pipeline_model_parallel_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=ps.get_pipeline_model_parallel_last_rank(),
                               group=ps.get_pipeline_model_parallel_group())
    return box[0]
