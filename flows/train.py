"""The training stage as a flow of its own, for GPU workers: the `tuneflow-train/gpu` deployment.

    make deploy                                  # registers it on the `gpu` work pool (deployments/prefect.yaml)
    prefect worker start --pool gpu              # on each GPU machine

The pipeline (`tuneflow-finetune`) starts one flow run of it per training attempt and waits for it. The run needs
nothing from the pipeline's machine: the model comes from the Hub (by commit), the prepared data and any checkpoint
to resume from come from the stage's MLflow run, and the trained weights go back there.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger

from tuneflow.results import TrainRequest


@flow(name="tuneflow-train")
def train_on_worker(request: TrainRequest) -> dict:
    """One training attempt on this worker; returns the TrainResult (also logged to the stage's MLflow run).

    Args:
        request: Written by the pipeline's train stage: the config, the pinned model, the prepared data artifact
            and the MLflow run to train into.
    """
    from tuneflow.training.run import train_once

    folder = Path(request.config.output_dir) / request.run_folder / "train"
    return train_once(request, folder.resolve(), get_run_logger()).model_dump(mode="json")
