"""What every stage task receives about its flow run: the run folder and where its MLflow runs go."""

from __future__ import annotations

import contextlib
from typing import Iterator

from mlflow import MlflowClient
from pydantic import BaseModel

from tuneflow.tracking.runs import child_run


class RunContext(BaseModel):
    run_dir: str
    tracking_uri: str
    experiment_id: str
    parent_run_id: str

    def client(self) -> MlflowClient:
        return MlflowClient(self.tracking_uri)

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[tuple[MlflowClient, str]]:
        """The stage's child MLflow run: (client, run_id); FAILED if the stage raises."""
        client = self.client()
        with child_run(client, self.experiment_id, self.parent_run_id, name) as run_id:
            yield client, run_id
