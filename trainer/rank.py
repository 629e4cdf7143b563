"""One trainer rank: Megatron model + optimizer + schedule; logprobs, train step, state.

Ray-free so it can be unit-tested in-process; trainer.actor wraps it in a Ray actor. The
optimizer (trainer.optim) is torch AdamW; data-parallel gradients are all-reduced explicitly
here (trainer.parallel.sync_grads: one coalesced all_reduce per data-parallel group), so the same
code runs on gloo and NCCL. Under tensor parallelism the logits stay vocab-sharded
(trainer.vocab_parallel); under expert parallelism the experts are split over the data-parallel ranks,
which then run their microbatches in lockstep (trainer.parallel.lockstep_shapes); pipeline stages pass
activations point to point (trainer.parallel_pipeline) and the last one computes the loss.
"""

from __future__ import annotations

import contextlib
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core import parallel_state as ps

from mopd.core.algo import AdvantageConfig
from mopd.core.errors import ConfigError
from mopd.core.types import Sample
from trainer import (
    batching,
    cpu_compat,
    parallel,
    parallel_checkpoint,
    parallel_pipeline,
    routing_replay,
    vocab_parallel,
)
from trainer.config import TrainerConfig
from trainer.cpu_compat import needs_cpu_compat
from trainer.hf_io import load_hf_state
from trainer.losses import StudentLogprobs, compute_loss, loss_spec, needed_fields, student_logprobs
from trainer.model_builder import build_model, hf_to_model, load_hf_config, model_to_hf
from trainer.mtp_loss import MTPLoss
from trainer.optim import Optimizer
from trainer.weight_gather import GatheredBuckets

# What train_step sums over microbatches (and all-reduces over ranks, as one tensor in this order).
_STATS = ("loss", "is_masked_tokens", "kl_rollout", "mask_tokens", "entropy", "mtp_loss")


def _sum_over_ranks(ratios: dict[str, list[float]]) -> dict[str, list[float]]:
    """Sum ratio statistics over ranks; their names may differ by rank (a rank may see no token of a kind)."""
    gathered: list[dict[str, list[float]] | None] = [None] * ps.get_data_parallel_world_size()
    dist.all_gather_object(gathered, ratios, group=ps.get_data_parallel_group())
    total: dict[str, list[float]] = {}
    for part in gathered:
        for name, (num, den) in (part or {}).items():
            acc = total.setdefault(name, [0.0, 0.0])
            acc[0] += num
            acc[1] += den
    return dict(sorted(total.items()))


class TrainerRank:
    """Model shard, optimizer and scheduler of one trainer rank (Megatron's parallel state says which
    part of the model and which data-parallel share of each batch it holds: `dp_rank`)."""

    def __init__(self, model_path: str, cfg: TrainerConfig, adv: AdvantageConfig, *, num_steps: int,
                 rollout_temperature: float = 1.0) -> None:
        cfg.validate()
        adv.validate()
        if cfg.activation_recompute and needs_cpu_compat(cfg.device):
            raise ConfigError("trainer.activation_recompute", "false on CPU (Megatron's recompute saves and "
                              "restores the CUDA RNG state)", True)
        if rollout_temperature <= 0:
            raise ConfigError("rollout_temperature", "a number > 0", rollout_temperature)
        self.cfg, self.adv, self.model_path = cfg, adv, model_path
        self.temperature = rollout_temperature
        self.hf_config = load_hf_config(model_path)
        cfg.check_model(self.hf_config)
        sizes = (ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size(),
                 ps.get_expert_model_parallel_world_size())
        if sizes != (cfg.tp_size, cfg.pp_size, cfg.ep_size):
            raise ValueError(f"Megatron's parallel state has (tp, pp, ep) = {sizes}, the config asks for "
                             f"{(cfg.tp_size, cfg.pp_size, cfg.ep_size)} (initialise it with trainer.dist)")
        self.dp_rank = ps.get_data_parallel_rank()
        self.tp = cfg.tp_size
        self.model, self.arch = build_model(self.hf_config, device=cfg.device, dtype=cfg.dtype,
                                            routing_replay=cfg.routing_replay,
                                            activation_recompute=cfg.activation_recompute)
        hf_to_model(self.model, self.arch, self.hf_config, load_hf_state(model_path))
        self.device = next(self.model.parameters()).device
        self._on_cpu = needs_cpu_compat(cfg.device)
        first = parallel.layer_offset(self.model)  # this pipeline stage's layers: [first, first + len(layers))
        self.moe_layers = [i for i in self.arch.moe_layers(self.hf_config)
                           if first <= i < first + len(self.model.decoder.layers)]
        self.stage = parallel_pipeline.Stage(self.model) if cfg.pp_size > 1 else None
        self.mtp = MTPLoss(self.model, cfg.mtp_loss_coef)  # inactive when the coefficient is 0
        self.optim = Optimizer(self.model, cfg, cfg.total_steps or num_steps)
        self.step = 0

    # ---------------------------------------------------------------- forward
    def _replay_data(self, samples: list[Sample], seq_len: int, batch: int | None = None,
                     ) -> list[torch.Tensor] | None:
        """Per MoE layer, the rollout's routing of `samples` laid out for a model input of [batch, seq_len]
        (batch: len(samples) unless padded, see trainer.parallel.lockstep_shapes)."""
        if not (self.cfg.routing_replay and self.moe_layers):
            return None
        have = [s.routed_experts is not None for s in samples]
        if not any(have):
            return None
        if not all(have):
            raise ValueError("routing replay: some samples of a batch carry routed_experts and some do not; "
                             "expected all or none")
        h = self.hf_config
        for i, s in enumerate(samples):
            routing_replay.check_routed_experts(s, i, num_layers=h.num_hidden_layers, top_k=h.num_experts_per_tok,
                                                num_experts=self.arch.num_experts(h))
        tensors = routing_replay.replay_tensors(samples, seq_len, self.moe_layers, num_layers=h.num_hidden_layers,
                                                top_k=h.num_experts_per_tok, num_experts=self.arch.num_experts(h))
        return [t.to(self.device) for t in parallel.replay_for_rank(tensors, seq_len, len(samples), batch or len(samples))]

    def _forward(self, mb: batching.MicroBatch, shape: tuple[int, int], need_untempered: bool = True,
                 ) -> StudentLogprobs | None:
        """log pi_theta of the targets at the rollout temperature and untempered (the teacher term's view,
        see trainer.losses.pg_loss), the entropy, and log pi_theta of the teacher's top-k tokens (if any).
        The model runs at `shape` (trainer.parallel.lockstep_shapes): padding at the end (causal: harmless).
        None on pipeline stages before the last (they hand their activations on)."""
        tokens, positions = mb.tokens.to(self.device), mb.position_ids.to(self.device)
        (seq_len, batch), (s, b) = shape, tokens.shape[::-1]
        pad = (0, seq_len - s, 0, batch - b)
        tokens, positions = F.pad(tokens, pad), F.pad(positions, pad)
        if self.stage is not None:
            logits = self.stage.forward(tokens, positions)
            if not self.stage.last:
                return None
        else:
            logits = self.model(tokens, positions, None)
        logits = logits[:b, :s]
        top_ids = mb.inputs.teacher_top_ids
        views = vocab_parallel.student_logprobs if self.tp > 1 else student_logprobs  # vocab-sharded logits
        out = views(logits[:, :-1], mb.targets.to(self.device), self.temperature,
                               top_ids.to(self.device) if top_ids is not None else None, need_untempered)
        if self.device.type != "cpu":
            out = StudentLogprobs(*(t.cpu() if t is not None else None
                                    for t in (out.tempered, out.entropy, out.untempered, out.top)))
        return out

    def _microbatches(self, samples: list[Sample]) -> list[batching.MicroBatch]:
        plan = batching.plan_microbatches([len(s.tokens) for s in samples], self.cfg.max_tokens_per_microbatch)
        return [batching.collate(samples, idx) for idx in plan]

    def _schedule(self, samples: list[Sample]) -> tuple[list[batching.MicroBatch], list[tuple[int, int]]]:
        """This rank's microbatches and the (S, B) of every slot the model runs (more slots than
        microbatches: idle passes that keep the EP group in step); a collective under EP."""
        mbs = self._microbatches(samples)
        shapes = parallel.lockstep_shapes([(mb.tokens.shape[1], mb.tokens.shape[0]) for mb in mbs], self.tp)
        return mbs, shapes

    def _idle_pass(self, shape: tuple[int, int], backward: bool) -> None:
        """A forward (and backward) on padding only: its collectives pair with another rank's microbatch."""
        seq_len, batch = shape
        positions = torch.arange(seq_len, device=self.device).expand(batch, seq_len)
        tokens = torch.zeros(batch, seq_len, dtype=torch.long, device=self.device)
        if self.stage is None:
            logits = self.model(tokens, positions, None)
        else:
            logits = self.stage.forward(tokens, positions)
            if not self.stage.last:
                if backward:
                    self.stage.backward_from_next()
                return
        if backward:
            (logits.float().sum() * 0.0).backward()
            if self.stage is not None:
                self.stage.send_input_grad()

    def _model_scope(self) -> contextlib.AbstractContextManager:
        """Around model code: on CPU, Megatron's collectives allocate on the "current CUDA device"."""
        return cpu_compat.cuda_device_is_cpu() if self._on_cpu else contextlib.nullcontext()

    @torch.no_grad()
    def compute_logprobs(self, samples: list[Sample]) -> list[np.ndarray]:
        """log pi_theta of every response token (float32), with routing replay when available."""
        with self._model_scope():
            return self._compute_logprobs(samples)

    def _compute_logprobs(self, samples: list[Sample]) -> list[np.ndarray]:
        batching.validate_samples(samples, vocab_size=self.hf_config.vocab_size)
        self.model.eval()
        out: list[np.ndarray | None] = [None] * len(samples)
        mbs, shapes = self._schedule(samples)
        for mb, shape in zip(mbs, shapes):
            chosen = [samples[i] for i in mb.indices]
            with routing_replay.replaying(self.model, self._replay_data(chosen, *shape)):
                view = self._forward(mb, shape, need_untempered=False)
            if view is None:  # an earlier pipeline stage: the last one has the results
                continue
            lp = view.tempered
            for b, i in enumerate(mb.indices):
                start = mb.prompt_lengths[b] - 1
                out[i] = lp[b, start:start + len(samples[i].response_ids)].float().numpy().copy()
        for shape in shapes[len(mbs):]:  # idle slots come last (trainer.parallel.lockstep_shapes)
            self._idle_pass(shape, backward=False)
        return parallel_pipeline.from_last_stage(out)  # type: ignore[no-any-return]

    # ---------------------------------------------------------------- train
    def train_step(self, samples: list[Sample], num_global_samples: int) -> dict[str, float]:
        """Accumulate gradients over this rank's microbatches, all-reduce over DP, clip, step."""
        with self._model_scope():
            return self._train_step(samples, num_global_samples)

    def _train_step(self, samples: list[Sample], num_global_samples: int) -> dict[str, float]:
        if num_global_samples < 1:
            raise ValueError(f"train_step needs at least one sample in the global batch, got {num_global_samples}")
        batching.validate_samples(samples, vocab_size=self.hf_config.vocab_size, need=needed_fields(self.cfg.loss, self.adv))
        self.model.train()
        self.optim.zero_grad()
        teacher_term = loss_spec(self.cfg.loss).needs_teacher  # its reward reads untempered log pi_theta
        stats = torch.zeros(len(_STATS), dtype=torch.float64)  # sums over this rank's microbatches
        ratios: dict[str, list[float]] = {}  # LossOutput.ratios summed: name -> [numerator, denominator]
        mbs, shapes = self._schedule(samples)
        for mb, shape in zip(mbs, shapes):
            chosen = [samples[i] for i in mb.indices]
            with routing_replay.replaying(self.model, self._replay_data(chosen, *shape)):
                with self.mtp.capture():
                    view = self._forward(mb, shape, need_untempered=teacher_term)
                if view is None:  # an earlier pipeline stage: backward when the next stage sends the gradient
                    self.stage.backward_from_next()
                    continue
                if self.cfg.activation_recompute and self.cfg.routing_replay and self.moe_layers:
                    routing_replay.switch_to_backward(self.model)
                out = compute_loss(self.cfg.loss, view.tempered, mb.inputs, self.adv, eps_low=self.cfg.eps_low,
                                   eps_high=self.cfg.eps_high, student_top_logprobs=view.top,
                                   untempered_logprobs=view.untempered)
                total = out.loss_sum
                mtp_sum = torch.zeros(())
                if self.mtp.active:  # trains the MTP layers only; the policy's gradient is unchanged
                    mtp_sum = self.mtp.loss_sum(mb.tokens.to(self.device), mb.inputs.loss_mask.to(self.device))
                    total = total + self.cfg.mtp_loss_coef * mtp_sum
                (total / num_global_samples).backward()
                if self.stage is not None:
                    self.stage.send_input_grad()
            step_sums = {"loss": out.loss_sum.item(), "is_masked_tokens": out.is_masked_tokens,
                         "kl_rollout": out.kl_rollout_sum, "mask_tokens": out.mask_tokens,
                         "entropy": (view.entropy * mb.inputs.loss_mask).sum().item(), "mtp_loss": mtp_sum.item()}
            stats += torch.tensor([step_sums[name] for name in _STATS], dtype=torch.float64)
            for name, (num, den) in out.ratios.items():
                acc = ratios.setdefault(name, [0.0, 0.0])
                acc[0] += num
                acc[1] += den
        for shape in shapes[len(mbs):]:  # idle slots come last (trainer.parallel.lockstep_shapes)
            self._idle_pass(shape, backward=True)
        self._allreduce_grads()
        if ps.get_data_parallel_world_size() > 1:  # TP ranks of one replica hold the same statistics
            stats = stats.to(self.device)  # NCCL reduces device tensors only
            dist.all_reduce(stats, group=ps.get_data_parallel_group())
            stats = stats.cpu()
            ratios = _sum_over_ranks(ratios)
        stats, ratios = parallel_pipeline.from_last_stage((stats, ratios))  # the loss lives on the last stage
        grad_norm, lr = self.optim.step()
        self.step += 1
        summed = dict(zip(_STATS, stats.tolist()))
        tokens = max(summed["mask_tokens"], 1.0)
        has_mu = self.cfg.loss != "sft" or all(s.rollout_logprobs for s in samples)
        metrics = {
            "train/loss": summed["loss"] / num_global_samples,
            "train/grad_norm": grad_norm,
            "train/entropy": summed["entropy"] / tokens,
            "train/is_mask_frac": summed["is_masked_tokens"] / tokens,
            "train/kl_rollout": summed["kl_rollout"] / tokens if has_mu else 0.0,
            "train/lr": lr,
            "train/step": float(self.step),
        }
        if self.mtp.active:
            metrics["train/mtp_loss"] = summed["mtp_loss"] / num_global_samples
        metrics.update({f"train/{name}": num / den for name, (num, den) in ratios.items() if den > 0})
        return metrics

    def _allreduce_grads(self) -> None:
        for p in self.model.parameters():
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        if dist.is_initialized() and dist.get_world_size() > 1:
            parallel.sync_grads(self.model)

    # ---------------------------------------------------------------- weights and state
    def hf_state(self) -> dict[str, torch.Tensor]:
        """Student weights under HF names (what engines and the HF export consume)."""
        return model_to_hf(self.model, self.arch, self.hf_config)

    def hf_buckets(self, bucket_bytes: int, *, keep: bool) -> GatheredBuckets:
        """The student's HF weights gathered one bucket at a time (trainer/weight_gather.py): the push's
        source, about one bucket of extra memory instead of the whole model. Every rank iterates it;
        ranks with keep=False only take part in the collectives."""
        return GatheredBuckets(self.model, self.arch, self.hf_config, bucket_bytes, keep=keep)

    def state_dict(self) -> dict[str, Any]:
        """The exact training state of an unsharded rank (in memory); a sharded one saves its own part with
        trainer/checkpoint.py `save_trainer_state` instead (no rank gathers the whole model)."""
        if parallel.model_parallel():
            raise ValueError("TrainerRank.state_dict: this rank holds part of the model (TP/PP/EP > 1); save it with "
                             "trainer.checkpoint.save_trainer_state (each rank writes its own part)")
        return {"model": {k: v for k, v in self.model.state_dict().items() if not k.endswith("_extra_state")},
                "optim": self.optim.state_dict(), "step": self.step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """A state from `state_dict` (same unsharded layout) or a gathered format 1 checkpoint's (any layout:
        it reshards, trainer/parallel_checkpoint.py)."""
        if state.get("layout") == parallel_checkpoint.FULL:
            parallel_checkpoint.load_training_state(self, state)
            return
        missing, unexpected = self.model.load_state_dict(state["model"], strict=False)
        missing = [k for k in missing if not k.endswith("_extra_state")]
        if missing or unexpected:
            raise ValueError(f"trainer checkpoint does not match the model: missing {missing[:8]}, "
                             f"unexpected {list(unexpected)[:8]}")
        self.optim.load_state_dict(state["optim"])
        self.step = int(state["step"])
