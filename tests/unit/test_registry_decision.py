"""The promotion rule of `tuneflow retrain` (tuneflow.tracking.registry.decide): beat the champion on registry.metric
by more than zero and at least registry.min_delta, in the metric's direction, and never be worse than the base model."""

import pytest

from tuneflow.core.config import TuneflowConfig
from tuneflow.tracking.registry import decide


def cfg(**registry) -> TuneflowConfig:
    return TuneflowConfig.model_validate({"dataset": {"name_or_path": "-"}, "registry": {"model_name": "m",
                                                                                         **registry}})


@pytest.mark.parametrize("challenger, champion, min_delta, promoted", [
    (4.0, 4.5, 0.0, True),    # lower loss wins
    (4.0, 4.5, 0.5, True),    # by exactly min_delta
    (4.0, 4.5, 0.6, False),   # not by min_delta
    (4.5, 4.5, 0.0, False),   # a tie keeps the champion
    (4.6, 4.5, 0.0, False),   # higher loss loses
])
def test_eval_loss_lower_is_better_by_min_delta(challenger, champion, min_delta, promoted):
    promote, reason = decide(cfg(min_delta=min_delta), challenger, champion, base=6.0)
    assert promote is promoted, reason
    assert "lower is better" in reason


def test_bleu_greater_is_better_and_the_direction_can_be_set():
    assert decide(cfg(metric="bleu-4"), 30.0, 25.0, base=1.0)[0] is True
    assert decide(cfg(metric="bleu-4"), 20.0, 25.0, base=1.0)[0] is False
    assert decide(cfg(metric="eval_loss", greater_is_better=True), 5.0, 4.0, base=1.0)[0] is True


def test_never_worse_than_the_base_model_first_version_included():
    promote, reason = decide(cfg(), 6.5, None, base=6.0)
    assert promote is False and "worse than the base model" in reason
    promote, reason = decide(cfg(), 5.0, None, base=6.0)
    assert promote is True and "no champion" in reason
    promote, reason = decide(cfg(), 6.5, 7.0, base=6.0)  # beats the champion, but not the base model
    assert promote is False and "base model" in reason
