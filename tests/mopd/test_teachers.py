"""Teacher routing by domain, start-up checks of data coverage and vocabularies, custom kinds, concurrency."""

import asyncio
import time

import pytest

from mopd.config import JobConfig
from mopd.core.errors import ConfigError
from mopd.core.types import Sample, TokenScores
from mopd.teachers import (
    TeacherConfig,
    TeacherRouter,
    TeacherSet,
    check_same_vocabulary,
    known_backends,
    register_teacher_backend,
)
from mopd.toy.tokenizer import build_char_tokenizer
from rollout.config import SamplingConfig


def _job(**teachers) -> JobConfig:
    return JobConfig(teachers={k: TeacherConfig(model_path="/m", domains=v) for k, v in teachers.items()})


def test_router_sends_each_domain_to_its_teacher_and_falls_back_to_default():
    job = _job(math=["arith"], words=["reverse", "sort"])
    router = TeacherRouter.from_config(job.teachers)
    assert router.teacher_for("arith") == "math" and router.teacher_for("sort") == "words"
    with pytest.raises(ConfigError, match="chemistry"):
        router.teacher_for("chemistry")
    with pytest.raises(ConfigError, match="no teacher covers \\['chemistry'\\]"):
        router.check_domains({"arith", "chemistry"})
    TeacherRouter.from_config(job.teachers, "math").check_domains({"arith", "chemistry"})
    assert TeacherRouter.from_config(job.teachers, "math").teacher_for("chemistry") == "math"


def test_vocabulary_mismatch_names_the_differing_tokens():
    student = build_char_tokenizer()
    check_same_vocabulary(student, build_char_tokenizer(), "same")
    teacher = build_char_tokenizer()
    teacher.add_tokens(["<extra>"])
    with pytest.raises(ConfigError, match=r"teachers.big.model_path.*only in the teacher.*<extra>"):
        check_same_vocabulary(student, teacher, "big")


class _ConstantTeacher:
    """A custom kind: every response token gets the same logprob, after `delay_s` (an API call's latency)."""

    def __init__(self, value, delay_s=0.0):
        self.value = value
        self.delay_s = delay_s
        self.closed = False

    async def score(self, samples, top_k):
        await asyncio.sleep(self.delay_s)
        return [TokenScores(logprobs=[self.value] * len(s.response_ids),
                            top_ids=[[0] * top_k for _ in s.response_ids] if top_k else None,
                            top_logprobs=[[self.value] * top_k for _ in s.response_ids] if top_k else None)
                for s in samples]

    def close(self):
        self.closed = True


def _samples(domains):
    return [Sample(prompt_index=i, group_index=i, domain=d, prompt_ids=[1], response_ids=[2, 3])
            for i, d in enumerate(domains)]


def test_custom_teacher_kind_registered_from_python_scores_its_domain():
    made = {}

    @register_teacher_backend("constant")
    def make(name, cfg):
        made[name] = _ConstantTeacher(-float(len(cfg.domains)))
        return made[name]

    assert "constant" in known_backends()
    configs = {"a": TeacherConfig(model_path="/m", domains=["x"], backend="constant"),
               "b": TeacherConfig(model_path="/m", domains=["y", "z"], backend="constant", coef=0.5)}
    configs["a"].validate("teachers.a")  # a registered kind is a valid backend
    teachers = TeacherSet.launch(configs)
    samples = _samples(["x", "z", "y"])
    asyncio.run(teachers.score(samples))
    assert [s.teacher for s in samples] == ["a", "b", "b"]
    assert samples[0].teacher_logprobs == [-1.0, -1.0] and samples[1].teacher_logprobs == [-2.0, -2.0]
    assert samples[0].teacher_top_ids is None
    # teachers.NAME.coef travels with each sample to the loss (trainer.batching -> LossInputs.teacher_coef)
    assert [s.metadata["teacher_coef"] for s in samples] == [1.0, 0.5, 0.5]
    asyncio.run(teachers.score(samples, top_k=2))  # the same protocol gives the top-k tokens
    assert samples[2].teacher_top_logprobs == [[-2.0, -2.0], [-2.0, -2.0]]
    # a custom kind cannot sample: refused at launch when rollout.sample_from=teacher
    with pytest.raises(ConfigError, match="teachers.a.backend"):
        TeacherSet.launch(configs, sampling=SamplingConfig(sample_from="teacher"))
    teachers.close()
    assert made["a"].closed and made["b"].closed


class _RendezvousTeacher(_ConstantTeacher):
    """Answers only once every teacher of the step is inside `score`: teachers scored one after
    another never all get there, so the first one times out."""

    def __init__(self, value, arrived, expected):
        super().__init__(value)
        self.arrived, self.expected = arrived, expected

    async def score(self, samples, top_k):
        self.arrived.append(self)
        while len(self.arrived) < self.expected:
            await asyncio.sleep(0.01)
        return await super().score(samples, top_k)


def test_teachers_of_a_step_are_scored_concurrently():
    arrived: list = []
    teachers = TeacherSet({name: _RendezvousTeacher(-1.0, arrived, 4) for name in "abcd"},
                          TeacherRouter({d: d for d in "abcd"}))
    samples = _samples(list("abcd"))

    async def score_all():
        await asyncio.wait_for(teachers.score(samples), timeout=30)

    asyncio.run(score_all())  # a TimeoutError here: the teachers were scored one after another
    assert all(s.teacher_logprobs == [-1.0, -1.0] for s in samples)


def test_a_teacher_that_returns_the_wrong_number_of_logprobs_fails_the_step():
    class Short(_ConstantTeacher):
        async def score(self, samples, top_k):
            return [TokenScores(logprobs=[-1.0]) for _ in samples]

    teachers = TeacherSet({"a": Short(0.0)}, TeacherRouter({"x": "a"}))
    with pytest.raises(RuntimeError, match="1 logprobs for a response of 2 tokens"):
        asyncio.run(teachers.score(_samples(["x"])))


def test_teacher_config_is_an_engine_config_validated_under_its_name():
    with pytest.raises(ConfigError, match="teachers.t.num_engines"):
        TeacherConfig(model_path="/m", domains=["x"], num_engines=0).validate("teachers.t")
    with pytest.raises(ConfigError, match=r"teachers.t.backend.*'local', 'remote', 'sglang'\]"):
        TeacherConfig(model_path="/m", domains=["x"], backend="vllm").validate("teachers.t")
    with pytest.raises(ConfigError, match="teachers.t.urls"):
        TeacherConfig(model_path="", domains=["x"], backend="remote").validate("teachers.t")


def test_engine_teacher_scoring_honours_its_request_timeout():
    """A teacher server that accepts the connection and never answers: the step fails within the teacher's
    own teachers.NAME.request_timeout_s and retry bounds, naming the engine."""
    from mopd.teachers import EngineTeacher
    from rollout.dispatch import EngineUnavailable

    async def run() -> float:
        async def hang(reader, writer):
            await asyncio.sleep(30)

        server = await asyncio.start_server(hang, "127.0.0.1", 0)
        url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
        cfg = TeacherConfig(model_path="", domains=["x"], backend="remote", urls=[url], request_timeout_s=0.5,
                            max_retries=1, startup_timeout_s=2.0)
        teacher = EngineTeacher("slow", cfg, [url])
        start = time.perf_counter()
        try:
            with pytest.raises(EngineUnavailable, match="127.0.0.1"):
                await teacher.score(_samples(["x"]), 0)
        finally:
            server.close()
        return time.perf_counter() - start

    assert asyncio.run(run()) < 5.0
