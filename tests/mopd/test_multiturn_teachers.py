"""Teachers on multi-turn trajectories: one prefill over prompt + every turn, logprobs equal to a direct HF
forward, and tool tokens (loss mask 0, rollout logprob placeholder 0.0) never in the loss or the KL metric."""

from __future__ import annotations

import asyncio
import dataclasses
import urllib.request
from collections.abc import Iterator
from types import SimpleNamespace

import pytest
import torch

from mopd import train as train_lib
from mopd.agentic import tool_specs
from mopd.core.algo import AdvantageConfig
from mopd.core.types import Sample
from mopd.teachers import EngineTeacher, TeacherConfig, TeacherRouter, TeacherSet
from mopd.toy.models import create_tiny_model
from mopd.toy.tokenizer import build_char_tokenizer
from rollout.chat_render import ObservationRenderer
from tests.rollout.conftest import ServerProc
from trainer.losses import LossInputs, compute_loss

MODEL_TURNS = ['<tool_call>{"name": "bash", "arguments": {"command": "ls"}}</tool_call>',
               '<tool_call>{"name": "bash", "arguments": {"command": "cat value.txt"}}</tool_call>',
               "The value is 4217."]
OBSERVATIONS = ["value.txt", "4217"]


def _episode(tokenizer) -> Sample:
    """A 3-turn tool episode laid out as the tool loop lays it out (rollout/agent_loop.py): model turns with
    loss mask 1, the chat template's tool messages and glue between them with mask 0 and logprob 0.0."""
    renderer = ObservationRenderer(tokenizer, [{"role": "user", "content": "What value is in the file?"}],
                                   tools=tool_specs("toy_tool"))
    response, mask = [], []
    for i, text in enumerate(MODEL_TURNS):
        turn = tokenizer.encode(text, add_special_tokens=False) + [tokenizer.eos_token_id]
        response += turn
        mask += [1] * len(turn)
        if i < len(OBSERVATIONS):
            glue = renderer.tokens_after_turn(turn, OBSERVATIONS[i])
            response += glue
            mask += [0] * len(glue)
    logprobs = [-0.5 if m else 0.0 for m in mask]
    return Sample(prompt_index=0, group_index=0, domain="tool", prompt_ids=list(renderer.prompt_ids),
                  response_ids=response, loss_mask=mask, rollout_logprobs=logprobs, metadata={"turns": 3})


@pytest.fixture(scope="module")
def teacher_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProc]:
    path = create_tiny_model(tmp_path_factory.mktemp("teacher") / "dense", build_char_tokenizer(), arch="qwen3")
    server = ServerProc(path, "--max-context-len", "1024")
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


def _forward_steps(server: ServerProc) -> int:
    with urllib.request.urlopen(server.url + "/metrics", timeout=30) as resp:
        lines = resp.read().decode().splitlines()
    return int(next(line.split()[1] for line in lines if line.startswith("hf_server_num_forward_steps ")))


def _score(server: ServerProc, samples: list[Sample]) -> None:
    cfg = TeacherConfig(model_path="", domains=["tool"], backend="remote", urls=[server.url])
    teachers = TeacherSet({"tool": EngineTeacher("tool", cfg, [server.url])},
                          TeacherRouter.from_config({"tool": cfg}))
    asyncio.run(teachers.score(samples))


def test_teacher_scores_a_three_turn_episode_in_one_prefill_equal_to_an_hf_forward(teacher_server: ServerProc):
    from transformers import AutoModelForCausalLM

    tokenizer = build_char_tokenizer()
    episode = _episode(tokenizer)
    assert 0 in episode.loss_mask and episode.metadata["turns"] == 3
    single = Sample(prompt_index=1, group_index=1, domain="tool", prompt_ids=episode.prompt_ids,
                    response_ids=episode.response_ids[:5], loss_mask=[1] * 5, rollout_logprobs=[-0.5] * 5)
    before = _forward_steps(teacher_server)
    _score(teacher_server, [single])
    single_cost = _forward_steps(teacher_server) - before
    before = _forward_steps(teacher_server)
    _score(teacher_server, [episode])
    # the whole conversation costs what a 5-token single-turn response costs: one prefill, not one per turn
    assert _forward_steps(teacher_server) - before == single_cost == 1
    assert episode.teacher == "tool" and len(episode.teacher_logprobs) == len(episode.response_ids)

    model = AutoModelForCausalLM.from_pretrained(teacher_server.model_path, torch_dtype=torch.float32).eval()
    tokens = torch.tensor([episode.tokens])
    with torch.no_grad():
        logp = torch.log_softmax(model(tokens).logits.float(), dim=-1)[0]
    start = len(episode.prompt_ids)
    direct = [logp[start + i - 1, tok].item() for i, tok in enumerate(episode.response_ids)]
    # every response position, the tool messages too: the teacher sees the whole conversation as context
    assert episode.teacher_logprobs == pytest.approx(direct, abs=2e-4)


def _loss_and_grad(sample: Sample, student: list[float], loss: str) -> tuple[float, torch.Tensor]:
    logprobs = torch.tensor([student], dtype=torch.float64, requires_grad=True)
    inputs = LossInputs(loss_mask=torch.tensor([sample.loss_mask]),
                        rollout_logprobs=torch.tensor([sample.rollout_logprobs], dtype=torch.float64),
                        teacher_logprobs=torch.tensor([sample.teacher_logprobs], dtype=torch.float64),
                        orm_advantage=torch.tensor([0.7], dtype=torch.float64))
    out = compute_loss(loss, logprobs, inputs, AdvantageConfig(alpha=0.5, teacher_coef=1.0),
                       eps_low=0.5, eps_high=2.0)
    out.loss_sum.backward()
    return out.loss_sum.item(), logprobs.grad[0]


def _with_absurd_tool_tokens(sample: Sample, rollout: float, teacher: float) -> Sample:
    return dataclasses.replace(
        sample,
        rollout_logprobs=[lp if m else rollout for lp, m in zip(sample.rollout_logprobs, sample.loss_mask)],
        teacher_logprobs=[lp if m else teacher for lp, m in zip(sample.teacher_logprobs, sample.loss_mask)])


@pytest.mark.parametrize("loss", ["mopd", "grpo"])
def test_tool_tokens_carry_no_loss_whatever_their_logprobs(loss: str):
    sample = _episode(build_char_tokenizer())
    n = len(sample.response_ids)
    sample.teacher_logprobs = [-1.0 - 0.01 * (i % 7) for i in range(n)]
    student = [-0.45 - 0.02 * (i % 5) for i in range(n)]
    base_loss, base_grad = _loss_and_grad(sample, student, loss)
    assert base_loss != 0.0 and base_grad.abs().sum() > 0
    for rollout, teacher in [(-80.0, 0.0), (0.0, -1e4), (30.0, 30.0)]:
        got_loss, got_grad = _loss_and_grad(_with_absurd_tool_tokens(sample, rollout, teacher), student, loss)
        assert got_loss == pytest.approx(base_loss, rel=1e-12), (rollout, teacher)
        assert torch.allclose(got_grad, base_grad, rtol=0, atol=1e-15), (rollout, teacher)
    # and the student's own logprob at a tool position gets no gradient
    tool = torch.tensor(sample.loss_mask) == 0
    assert base_grad[tool].abs().max() == 0 and base_grad[~tool].abs().min() > 0


def _kl_metric(samples: list[Sample]) -> float:
    rt = SimpleNamespace(weight_version=0, sampled_tokens=0, agentic=None)
    metrics = train_lib.step_metrics(rt, samples, {}, {"time/generate_s": 1.0})
    return metrics["mopd/reverse_kl/tool"]


def test_reverse_kl_metric_counts_model_tokens_only():
    sample = _episode(build_char_tokenizer())
    sample.teacher, sample.teacher_logprobs = "tool", [-2.0] * len(sample.response_ids)
    model = [i for i, m in enumerate(sample.loss_mask) if m]
    expected = sum(sample.rollout_logprobs[i] - sample.teacher_logprobs[i] for i in model) / len(model)
    assert expected == pytest.approx(1.5)
    assert _kl_metric([sample]) == pytest.approx(expected)
    for rollout, teacher in [(0.0, -1e4), (-1e4, 0.0)]:
        assert _kl_metric([_with_absurd_tool_tokens(sample, rollout, teacher)]) == pytest.approx(expected)


def test_episode_layout_matches_the_chat_template_over_the_whole_conversation():
    """The fixture episode is what the tool loop trains on: its tokens are the template's rendering."""
    tokenizer = build_char_tokenizer()
    episode = _episode(tokenizer)
    messages = [{"role": "user", "content": "What value is in the file?"}]
    for i, text in enumerate(MODEL_TURNS[:2]):
        messages += [{"role": "assistant", "content": text}, {"role": "tool", "content": OBSERVATIONS[i]}]
    whole = tokenizer.apply_chat_template(messages, tools=tool_specs("toy_tool"), tokenize=False,
                                          add_generation_prompt=True)
    last = tokenizer.encode(MODEL_TURNS[2], add_special_tokens=False) + [tokenizer.eos_token_id]
    assert episode.tokens[:-len(last)] == tokenizer.encode(whole, add_special_tokens=False)
