"""`tuneflow sweep`'s space: every value a trial may take checked by the config tree before the first trial, each
problem with its key; the Optuna distributions, sampler and study storage it turns into."""

from __future__ import annotations

import json

import pytest
import yaml

from tuneflow.cli.main import main
from tuneflow.core.config import TuneflowConfig
from tuneflow.core.sweep import check_space


def config(space: dict, **sweep) -> TuneflowConfig:
    return TuneflowConfig.model_validate({"dataset": {"name_or_path": "d.json"}, "sweep": {"space": space, **sweep}})


GOOD = {"train.learning_rate": {"low": 1e-5, "high": 5e-4, "log": True}, "train.lora.rank": [8, 16, 32],
        "train.epochs": {"low": 1, "high": 3, "step": 1}}


@pytest.mark.parametrize(("space", "said"), [
    ({"train.learnin_rate": [1e-4]}, "sweep.space: train.learnin_rate=0.0001: unknown key (did you mean "
                                     "'train.learning_rate'?)"),
    ({"train.learning_rate": {"low": -1e-4, "high": 1e-3}}, "sweep.space: train.learning_rate=-0.0001: Input should "
                                                             "be greater than 0"),
    ({"train.lora.dropout": {"low": 0.0, "high": 1.5}}, "sweep.space: train.lora.dropout=1.5: Input should be less "
                                                         "than 1"),
    ({"train.method": ["qlora", "lorax"]}, "sweep.space: train.method=lorax: Input should be 'qlora', 'lora', 'full' "
                                            "or 'freeze'"),
    ({"train.seed": [1, 2]}, "sweep.space: train.seed is the same for every trial"),
    ({"dataset.eval_size": [8, 16]}, "sweep.space: dataset.eval_size is the same for every trial"),
    ({"eval.max_samples": [8, 16]}, "sweep.space: eval.max_samples is the same for every trial"),
    ({}, "sweep.space: empty"),
])
def test_a_bad_space_is_refused_naming_its_key(space, said):
    problems = check_space(config(space))
    assert any(p.startswith(said) for p in problems), problems


def test_a_good_space_has_no_problem_and_grid_needs_steps():
    assert check_space(config(GOOD)) == []
    assert check_space(config(GOOD, sampler="grid")) == [
        "sweep.space: train.learning_rate: sampler grid needs choices or a range with a step"]


@pytest.mark.parametrize(("dimension", "said"), [
    ({"low": 2, "high": 1}, "high 1 is below low 2"),
    ({"low": 0, "high": 1, "log": True}, "log: true needs low > 0"),
])
def test_a_range_that_is_no_range_is_refused(dimension, said):
    with pytest.raises(ValueError, match=said):
        config({"train.learning_rate": dimension})


def test_distributions_sampler_and_storage(tmp_path, monkeypatch):
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    from tuneflow.tracking.sweeps import distributions, metric_of, storage_url

    cfg = config(GOOD)
    dists = distributions(cfg)
    assert dists["train.learning_rate"] == FloatDistribution(1e-5, 5e-4, log=True)
    assert dists["train.lora.rank"] == CategoricalDistribution([8, 16, 32])
    assert dists["train.epochs"] == IntDistribution(1, 3, step=1)
    assert metric_of(cfg) == ("eval_loss", False)
    assert metric_of(config(GOOD, metric="rouge-l")) == ("rouge-l", True)
    tracked = cfg.model_copy(update={"tracking": cfg.tracking.model_copy(update={"uri": f"sqlite:///{tmp_path}/m.db"})})
    assert storage_url(tracked) == f"sqlite:///{tmp_path}/optuna.db"
    monkeypatch.setenv("TUNEFLOW_CACHE", str(tmp_path / "cache"))  # a tracking server: this machine's cache
    served = cfg.model_copy(update={"tracking": cfg.tracking.model_copy(update={"uri": "http://127.0.0.1:5000"})})
    assert storage_url(served).startswith(f"sqlite:///{tmp_path}/cache/sweeps/optuna-")
    other = served.model_copy(update={"tracking": cfg.tracking.model_copy(update={"uri": "http://10.0.0.1:5000"})})
    assert storage_url(other) != storage_url(served)  # one study file per tracking server
    from tuneflow.tracking.sweeps import shown_storage

    assert shown_storage("postgresql+psycopg2://optuna:s3cret@db:5432/optuna") == \
        "postgresql+psycopg2://optuna:***@db:5432/optuna"


def test_the_command_refuses_a_bad_space_file_before_any_trial(tmp_path, capsys):
    cfg = tmp_path / "config.yaml"
    cfg.write_text(yaml.safe_dump({"dataset": {"name_or_path": "d.json"}}))
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump({"train.lora.rnak": [8, 16], "train.learning_rate": {"low": 0, "high": 1e-3,
                                                                                          "log": False}}))
    assert main(["sweep", "--config", str(cfg), "--space", str(space)]) == 2
    err = capsys.readouterr().err
    assert "2 problems in the sweep's space" in err and "did you mean 'train.lora.rank'?" in err, err
    assert "sweep.space: train.learning_rate=0: Input should be greater than 0" in err, err
    assert main(["sweep", "--config", str(cfg), "--space", str(tmp_path / "none.yaml")]) == 2
    assert "--space: no such file" in capsys.readouterr().err


def test_the_space_is_a_param_of_every_run_and_not_in_the_config_hash():
    from tuneflow.core.params import config_hash, flatten

    params = flatten(config(GOOD))
    assert json.loads(params["sweep.space"])["train.learning_rate"] == {"low": 1e-5, "high": 5e-4, "log": True,
                                                                            "step": None}
    assert config_hash(config(GOOD)) == config_hash(config({"train.lora.rank": [4]}, trials=2))


def test_register_without_a_registered_name_is_refused_before_any_trial(tmp_path, capsys):
    cfg = tmp_path / "config.yaml"
    cfg.write_text(yaml.safe_dump({"dataset": {"name_or_path": "d.json"}, "sweep": {"space": GOOD},
                                   "tracking": {"uri": f"sqlite:///{tmp_path}/mlflow.db"}}))
    assert main(["sweep", "--config", str(cfg), "--register"]) == 2
    assert "registry.model_name: a retrain registers its model under a name" in capsys.readouterr().err


def test_a_pruner_needs_the_held_out_loss_during_training():
    with pytest.raises(ValueError, match="sweep.pruner: median stops trials by their held-out loss during training; "
                                         "set train.eval_steps > 0"):
        config(GOOD, pruner="median")
    cfg = TuneflowConfig.model_validate({"dataset": {"name_or_path": "d.json"}, "train": {"eval_steps": 5},
                                         "sweep": {"space": GOOD, "pruner": "hyperband"}})
    assert cfg.sweep.pruner == "hyperband"


def test_ranges_keys_and_grids_as_written():
    """Integers only when written as integers; a grid stops at high; of a dataset only its weight may vary."""
    from optuna.distributions import FloatDistribution, IntDistribution

    from tuneflow.core.sweep import Range
    from tuneflow.tracking.sweeps import distributions

    dists = distributions(config({"train.weight_decay": {"low": 0.0, "high": 1.0}, "train.epochs": {"low": 1,
                                                                                                    "high": 3}}))
    assert dists["train.weight_decay"] == FloatDistribution(0.0, 1.0)
    assert dists["train.epochs"] == IntDistribution(1, 3)
    assert Range(low=0, high=0.9, step=0.6).grid() == [0, 0.6] and Range(low=1, high=10, step=6).grid() == [1, 7]
    cfg = TuneflowConfig.model_validate({"datasets": [{"name_or_path": "a.json"}, {"name_or_path": "b.json"}],
                                         "sweep": {"space": {"datasets.1.weight": [1, 3],
                                                             "datasets.0.max_samples": [10, 20],
                                                             "prep.cutoff_len": [256, 512]}}})
    problems = check_space(cfg)
    assert [p.split(" is ")[0] for p in problems] == ["sweep.space: datasets.0.max_samples",
                                                       "sweep.space: prep.cutoff_len"], problems


def test_a_resumed_study_proposes_new_points_and_must_be_the_same_search(tmp_path):
    import logging

    from tuneflow.tracking.sweeps import SweepProblem, distributions, open_study

    logger = logging.getLogger("test")
    cfg = config({"train.learning_rate": {"low": 1e-5, "high": 1e-2, "log": True}}, sampler="random", seed=3,
                 storage=f"sqlite:///{tmp_path}/optuna.db", study_name="s")
    study = open_study(cfg, logger)
    first = []
    for _ in range(2):
        trial = study.ask(distributions(cfg))
        first.append(trial.params["train.learning_rate"])
        study.tell(trial, 1.0)
    again = open_study(cfg, logger)
    assert again.ask(distributions(cfg)).params["train.learning_rate"] not in first
    other = config({"train.learning_rate": [1e-4]}, sampler="random", seed=3,
                   storage=f"sqlite:///{tmp_path}/optuna.db", study_name="s")
    with pytest.raises(SweepProblem, match="sweep.study_name: the study s in .* was made for another search"):
        open_study(other, logger)


def test_a_sweep_run_whose_study_is_kept_elsewhere_is_refused(tmp_path):
    """Resumed on another machine (each keeps its study in its own cache by default), the sweep would start the
    study afresh under the old MLflow run: refused, saying what to set; the storage's password never reaches MLflow."""
    from mlflow import MlflowClient

    from tuneflow.tracking.sweeps import STORAGE_TAG, SweepProblem, sweep_run

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    here = config(GOOD, storage="postgresql+psycopg2://optuna:s3cret@db:5432/optuna")
    run_id = sweep_run(here, client, "s")
    assert client.get_run(run_id).data.tags[STORAGE_TAG] == "postgresql+psycopg2://optuna:***@db:5432/optuna"
    assert sweep_run(here, client, "s") == run_id  # the same storage: the same run, resumed
    elsewhere = config(GOOD, storage=f"sqlite:///{tmp_path}/optuna.db")
    with pytest.raises(SweepProblem, match="set sweep.storage to a database every cpu worker reaches"):
        sweep_run(elsewhere, client, "s")
