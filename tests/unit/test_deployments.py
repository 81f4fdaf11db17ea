"""deployments/prefect.yaml: every deployment loads from the installed package, runs on the pool its stage needs,
and takes its parameters from the preset it names (configs/ is the one source of truth)."""

from pathlib import Path

import pytest
import yaml

from tuneflow.core.config import TuneflowConfig
from tuneflow.core.loading import load_config

ROOT = Path(__file__).resolve().parents[2]
SPEC = yaml.safe_load((ROOT / "deployments/prefect.yaml").read_text())
FLOWS = {"flows.finetune.finetune": "tuneflow-finetune", "flows.retrain.retrain": "tuneflow-retrain",
         "flows.train.train_on_worker": "tuneflow-train", "flows.sweep.sweep": "tuneflow-sweep"}
DEPLOYMENTS = {f"{FLOWS[d['entrypoint']]}/{d['name']}": d for d in SPEC["deployments"]}


def test_the_pipeline_runs_on_cpu_and_training_on_gpu():
    assert sorted(DEPLOYMENTS) == ["tuneflow-finetune/on-demand", "tuneflow-retrain/scheduled",
                                   "tuneflow-sweep/on-demand", "tuneflow-train/gpu"]
    for name in ("tuneflow-finetune/on-demand", "tuneflow-retrain/scheduled", "tuneflow-sweep/on-demand"):
        assert DEPLOYMENTS[name]["work_pool"]["name"] == "cpu", name
        assert DEPLOYMENTS[name]["parameters"]["train_deployment"] == "tuneflow-train/gpu", name
    assert DEPLOYMENTS["tuneflow-train/gpu"]["work_pool"]["name"] == "gpu"
    assert DEPLOYMENTS["tuneflow-train/gpu"]["concurrency_limit"]["collision_strategy"] == "ENQUEUE"  # never fail


@pytest.mark.parametrize("registrar", ["Makefile", "infra/compose.yaml"])
def test_make_deploy_and_compose_register_every_deployment(registrar):
    text = (ROOT / registrar).read_text()
    for deployment in DEPLOYMENTS.values():
        assert f"deploy --name {deployment['entrypoint']}/{deployment['name']}" in text, deployment["name"]


@pytest.mark.parametrize("name", DEPLOYMENTS)
def test_entrypoints_are_modules_of_the_installed_package(name):
    """Workers need no clone of the repo: no pull steps, and the entrypoint is a module path, not a file."""
    from prefect.flows import load_flow_from_entrypoint

    assert SPEC["pull"] == []
    entrypoint = DEPLOYMENTS[name]["entrypoint"]
    assert ":" not in entrypoint and not entrypoint.endswith(".py"), entrypoint
    flow = load_flow_from_entrypoint(entrypoint, use_placeholder_flow=False)
    assert flow.name == name.split("/")[0]


@pytest.mark.parametrize("name", [n for n, d in DEPLOYMENTS.items() if "config" in d.get("parameters", {})])
def test_parameters_equal_the_preset_they_name(name):
    deployment = DEPLOYMENTS[name]
    presets = [t.removeprefix("preset:") for t in deployment["tags"] if t.startswith("preset:")]
    assert len(presets) == 1, f"{name}: tag it with the preset its config comes from, e.g. preset:demo"
    config = TuneflowConfig.model_validate(deployment["parameters"]["config"])
    preset = load_config(ROOT / "configs" / f"{presets[0]}.yaml")
    assert config == preset, (f"deployment {name} has drifted from configs/{presets[0]}.yaml: copy the preset into "
                              "its parameters.config")
