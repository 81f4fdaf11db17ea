"""The promotion rule of `tuneflow retrain` (tuneflow.tracking.registry.decide): beat the champion on registry.metric
by more than zero and at least registry.min_delta, in the metric's direction, never be worse than the base model, and
keep every limit of registry.guards."""

import pytest

from tuneflow.core.config import TuneflowConfig
from tuneflow.tracking.registry import decide


def cfg(benchmarks=(), **registry) -> TuneflowConfig:
    return TuneflowConfig.model_validate({"dataset": {"name_or_path": "-"}, "registry": {"model_name": "m", **registry},
                                          "eval": {"benchmarks": [{"task": t} for t in benchmarks]}})


def scores(value: float, metric: str = "eval_loss", more: dict | None = None) -> dict:
    return {metric: value, **(more or {})}


@pytest.mark.parametrize("challenger, champion, min_delta, promoted", [
    (4.0, 4.5, 0.0, True),    # lower loss wins
    (4.0, 4.5, 0.5, True),    # by exactly min_delta
    (4.0, 4.5, 0.6, False),   # not by min_delta
    (4.5, 4.5, 0.0, False),   # a tie keeps the champion
    (4.6, 4.5, 0.0, False),   # higher loss loses
])
def test_eval_loss_lower_is_better_by_min_delta(challenger, champion, min_delta, promoted):
    promote, reason, guards = decide(cfg(min_delta=min_delta), scores(challenger), scores(champion), scores(6.0))
    assert promote is promoted, reason
    assert "lower is better" in reason and guards == []


def test_bleu_greater_is_better_and_the_direction_can_be_set():
    bleu = cfg(metric="bleu-4")
    assert decide(bleu, scores(30.0, "bleu-4"), scores(25.0, "bleu-4"), scores(1.0, "bleu-4"))[0] is True
    assert decide(bleu, scores(20.0, "bleu-4"), scores(25.0, "bleu-4"), scores(1.0, "bleu-4"))[0] is False
    assert decide(cfg(greater_is_better=True), scores(5.0), scores(4.0), scores(1.0))[0] is True


def test_never_worse_than_the_base_model_first_version_included():
    promote, reason, _ = decide(cfg(), scores(6.5), None, scores(6.0))
    assert promote is False and "worse than the base model" in reason
    promote, reason, _ = decide(cfg(), scores(5.0), None, scores(6.0))
    assert promote is True and "no champion" in reason
    promote, reason, _ = decide(cfg(), scores(6.5), scores(7.0), scores(6.0))  # beats the champion, not the base
    assert promote is False and "base model" in reason


def test_a_winner_that_forgets_more_than_max_drop_is_kept_naming_the_guard():
    guarded = cfg(benchmarks=["mmlu"], guards=[{"metric": "bench.mmlu.acc", "max_drop": 0.01}])
    champion = scores(4.5, more={"bench.mmlu.acc": 0.44})
    promote, reason, guards = decide(guarded, scores(4.0, more={"bench.mmlu.acc": 0.41}), champion, scores(6.0))
    assert promote is False, reason
    assert reason.startswith("the challenger's eval_loss 4.0000 beats the champion's 4.5000 by 0.5000")
    assert reason.endswith("but it fails guard bench.mmlu.acc: the challenger's 0.4100 is 0.0300 below the "
                           "champion's 0.4400, more than max_drop 0.01")
    assert guards == [{"metric": "bench.mmlu.acc", "challenger": 0.41, "champion": 0.44, "limit": "max_drop 0.01",
                       "passed": False, "why": reason.split("but it fails ")[1]}]
    promote, reason, guards = decide(guarded, scores(4.0, more={"bench.mmlu.acc": 0.435}), champion, scores(6.0))
    assert promote is True and reason.endswith("every guard holds") and guards[0]["passed"] is True


def test_floors_and_ceilings_hold_for_a_first_version_too():
    guarded = cfg(benchmarks=["arc_easy"], guards=[{"metric": "bench.arc_easy.acc", "min": 0.5},
                                                   {"metric": "eval_loss", "max": 4.5}])
    promote, reason, guards = decide(guarded, scores(4.8, more={"bench.arc_easy.acc": 0.4}), None, scores(6.0))
    assert promote is False and [g["passed"] for g in guards] == [False, False]
    assert "guard bench.arc_easy.acc: the challenger's 0.4000 is under min 0.5" in reason
    assert "guard eval_loss: the challenger's 4.8000 is over max 4.5" in reason
    assert decide(guarded, scores(4.0, more={"bench.arc_easy.acc": 0.6}), None, scores(6.0))[0] is True


def test_a_guard_on_a_metric_nothing_scores_is_a_config_error():
    from tuneflow.core.loading import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"registry.guards: bench.mmlu.acc is no metric a retrain scores \(add its "
                                          r"benchmark to eval.benchmarks, or eval.judge\); one of eval_loss, "
                                          r"perplexity"):
        load_config(data={"dataset": {"name_or_path": "-"},
                          "registry": {"guards": [{"metric": "bench.mmlu.acc", "max_drop": 0.01}]}})


def test_a_judge_guard_needs_the_judge_and_a_floor_or_ceiling():
    from tuneflow.core.loading import ConfigError, load_config

    data = {"dataset": {"name_or_path": "-"}, "registry": {"guards": [{"metric": "judge.win_rate", "min": 0.5}]}}
    with pytest.raises(ConfigError, match=r"judge.win_rate is no metric a retrain scores \(add its benchmark to "
                                          r"eval.benchmarks, or eval.judge\)"):
        load_config(data=data)
    assert load_config(data={**data, "eval": {"judge": {"model": "org/judge"}}}).registry.guards[0].maximize
    with pytest.raises(ConfigError, match="guard on judge.win_rate: the judge compares challenger and champion; use "
                                          "min or max"):
        load_config(data={**data, "eval": {"judge": {"model": "org/judge"}},
                          "registry": {"guards": [{"metric": "judge.win_rate", "max_drop": 0.1}]}})
    with pytest.raises(ConfigError, match=r"eval.judge judges tuned vs base answers \(set eval.compare_base true\) "
                                          r"or, in retrain, challenger vs champion for a judge.\* guard"):
        load_config(data={**data, "registry": {}, "eval": {"judge": {"model": "org/judge"}, "compare_base": False}})
    load_config(data={**data, "eval": {"judge": {"model": "org/judge"}, "compare_base": False}})  # retrain judges


def test_a_challenger_the_judge_does_not_prefer_is_kept():
    guarded = TuneflowConfig.model_validate({
        "dataset": {"name_or_path": "-"}, "eval": {"judge": {"model": "org/judge"}},
        "registry": {"model_name": "m", "guards": [{"metric": "judge.win_rate", "min": 0.5},
                                                   {"metric": "judge.loss_rate", "max": 0.2}]}})
    promote, reason, guards = decide(guarded, scores(4.0, more={"judge.win_rate": 0.4, "judge.loss_rate": 0.3}),
                                     scores(4.5), scores(6.0))
    assert promote is False and [g["passed"] for g in guards] == [False, False]
    assert "guard judge.win_rate: the challenger's 0.4000 is under min 0.5" in reason, reason
    assert "guard judge.loss_rate: the challenger's 0.3000 is over max 0.2" in reason, reason
    assert decide(guarded, scores(4.0, more={"judge.win_rate": 0.6, "judge.loss_rate": 0.1}), scores(4.5),
                  scores(6.0))[0] is True
