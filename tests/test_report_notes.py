"""The demo report explains a missed teacher target with the measured steps, and says nothing when it is met."""

from robkit.demo import learning_verdict
from robkit.report import TEACHER_TARGET_STEPS, _teacher_note


def _summary(teacher_knn: float) -> dict:
    evals = {
        "teacher_untrained": {"knn": {"accuracy": 0.757}, "linear": {"accuracy": 0.695}},
        "teacher": {"knn": {"accuracy": teacher_knn}, "linear": {"accuracy": 0.781}},
    }
    return {"evals": evals, "learned": learning_verdict(evals), "plan": {"steps": 160, "nominal_steps": 160}}


def test_a_missed_teacher_target_is_explained_with_its_steps_and_linear_gain():
    note = " ".join(_teacher_note(_summary(0.749)))
    assert "-0.8 kNN points" in note
    assert f"{TEACHER_TARGET_STEPS:,} steps" in note
    assert "the 160 steps this run gave it" in note
    assert "+8.6 points" in note  # linear 78.1 against 69.5


def test_a_met_teacher_target_adds_no_note():
    assert _teacher_note(_summary(0.80)) == []
    assert _teacher_note({"learned": []}) == []
