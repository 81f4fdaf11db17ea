"""Sending work to the team's Prefect server (PREFECT_API_URL): `tuneflow submit` and `tuneflow sweep --submit`."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable

from tuneflow.core.config import TuneflowConfig
from tuneflow.core.errors import TuneflowError

PIPELINE_DEPLOYMENT = "tuneflow-finetune/on-demand"
SWEEP_DEPLOYMENT = "tuneflow-sweep/on-demand"
TRAIN_DEPLOYMENT = "tuneflow-train/gpu"


def submit(cfg: TuneflowConfig, args, here: str, follow: Callable[[object, TuneflowConfig], int], **parameters) -> int:
    """A flow run of args.deployment (training on args.train_deployment); with args.wait, ``follow(flow run id,
    cfg)`` until it ends (its exit status), Ctrl-C stopping only the waiting."""
    flow_run, url = submit_flow_run(cfg, args.deployment, args.train_deployment or None, here, **parameters)
    if not args.wait:
        return 0
    try:
        return follow(flow_run.id, cfg)
    except KeyboardInterrupt:
        print(f"\nstopped waiting; flow run {flow_run.name} goes on: {url}", file=sys.stderr)
        return 130


def submit_flow_run(cfg: TuneflowConfig, deployment: str, train: str | None, here: str, **parameters):
    """A flow run of ``deployment`` on the server with the config as the workers get it (portable) and training on
    ``train``; says where it shows in the UI (``here``: the command that runs it on this machine instead). Returns
    (the flow run, its UI address)."""
    from prefect.exceptions import ObjectNotFound
    from prefect.settings import PREFECT_API_URL, PREFECT_UI_URL

    from tuneflow.placement.pool import placement_problem
    from tuneflow.tracking.servers import check_prefect

    if not PREFECT_API_URL.value():
        raise TuneflowError("this sends the run to a Prefect server: set PREFECT_API_URL and PREFECT_API_AUTH_STRING "
                            f"(`source .stack/env` after `make stack`), or run it on this machine with `{here}`")
    problem = placement_problem(cfg, train)
    if problem:
        raise TuneflowError(problem)
    check_prefect()
    from prefect.deployments import run_deployment

    config, notes = portable(cfg)
    try:  # timeout=0: create the run and return
        flow_run = run_deployment(deployment, parameters={"config": config, "train_deployment": train, **parameters},
                                  timeout=0)
    except ObjectNotFound:
        raise TuneflowError(f"no deployment {deployment} on {PREFECT_API_URL.value()}: `make deploy` "
                            "registers it") from None
    url = f"{PREFECT_UI_URL.value()}/runs/flow-run/{flow_run.id}"
    print(f"submitted flow run {flow_run.name} of {deployment} (pool {flow_run.work_pool_name}"
          f"{', training on ' + train if train else ''}): {url}", flush=True)
    for note in notes:
        print(f"tuneflow: {note}", file=sys.stderr)
    return flow_run, url


def portable(cfg: TuneflowConfig) -> tuple[dict, list[str]]:
    """The config as the workers get it: the keys the user set, and local paths made absolute (the stack's
    workers share this machine; on other machines, push the model and datasets to the Hub); and notes on those."""
    data, notes = cfg.model_dump(mode="json", exclude_unset=True), []
    for key, section in [("model", cfg.model), *cfg.all_sources]:
        name = Path(section.name_or_path).expanduser()
        if name.exists() and not name.is_absolute():
            node = data
            for part in key.split("."):  # model, dataset, datasets.1, eval_dataset
                node = node[int(part)] if isinstance(node, list) else node[part]
            node["name_or_path"] = str(name.resolve())
            notes.append(f"{key} {name} is a local path: the workers read {name.resolve()}")
    start = cfg.train.preference.init_adapter
    if start and not start.startswith("runs:/") and Path(start).expanduser().exists():
        data["train"]["preference"]["init_adapter"] = str(Path(start).expanduser().resolve())
    return data, notes
