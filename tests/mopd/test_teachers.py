"""Teacher routing by domain, start-up checks of data coverage and vocabularies, custom kinds."""

import pytest

from mopd.config import JobConfig, TeacherConfig
from mopd.core.errors import ConfigError
from mopd.core.types import Sample
from mopd.teachers import (
    TeacherRouter,
    TeacherSet,
    check_same_vocabulary,
    known_backends,
    register_teacher_backend,
)
from mopd.toy.tokenizer import build_char_tokenizer


def _job(**teachers) -> JobConfig:
    return JobConfig(teachers={k: TeacherConfig(model_path="/m", domains=v) for k, v in teachers.items()})


def test_router_sends_each_domain_to_its_teacher_and_falls_back_to_default():
    job = _job(math=["arith"], words=["reverse", "sort"])
    router = TeacherRouter.from_config(job)
    assert router.teacher_for("arith") == "math" and router.teacher_for("sort") == "words"
    with pytest.raises(ConfigError, match="chemistry"):
        router.teacher_for("chemistry")
    with pytest.raises(ConfigError, match="no teacher covers \\['chemistry'\\]"):
        router.check_domains({"arith", "chemistry"})
    job.default_teacher = "math"
    TeacherRouter.from_config(job).check_domains({"arith", "chemistry"})
    assert TeacherRouter.from_config(job).teacher_for("chemistry") == "math"


def test_vocabulary_mismatch_names_the_differing_tokens():
    student = build_char_tokenizer()
    check_same_vocabulary(student, build_char_tokenizer(), "same")
    teacher = build_char_tokenizer()
    teacher.add_tokens(["<extra>"])
    with pytest.raises(ConfigError, match=r"teachers.big.model_path.*only in the teacher.*<extra>"):
        check_same_vocabulary(student, teacher, "big")


class _ConstantTeacher:
    def __init__(self, value):
        self.value = value
        self.closed = False

    def score(self, samples):
        return [[self.value] * len(s.response_ids) for s in samples]

    def close(self):
        self.closed = True


def test_custom_teacher_kind_registered_from_python_scores_its_domain():
    made = {}

    @register_teacher_backend("constant")
    def make(name, cfg, rollout):
        made[name] = _ConstantTeacher(-float(len(cfg.domains)))
        return made[name]

    assert "constant" in known_backends()
    job = JobConfig(teachers={"a": TeacherConfig(model_path="/m", domains=["x"], backend="constant"),
                              "b": TeacherConfig(model_path="/m", domains=["y", "z"], backend="constant",
                                                 coef=0.5)})
    teachers = TeacherSet.launch(job)
    samples = [Sample(prompt_index=i, group_index=i, domain=d, prompt_ids=[1], response_ids=[2, 3])
               for i, d in enumerate(["x", "z", "y"])]
    teachers.score(samples)
    assert [s.teacher for s in samples] == ["a", "b", "b"]
    assert samples[0].teacher_logprobs == [-1.0, -1.0] and samples[1].teacher_logprobs == [-2.0, -2.0]
    # teachers.NAME.coef travels with each sample to the loss (trainer.batching -> LossInputs.teacher_coef)
    assert [s.metadata["teacher_coef"] for s in samples] == [1.0, 0.5, 0.5]
    teachers.close()
    assert made["a"].closed and made["b"].closed
