"""MLflow bookkeeping that concurrent pipeline runs share (tuneflow.tracking.runs), against a real `mlflow server`."""

import threading

from tuneflow.tracking.runs import log_dataset

ROUNDS, RUNS = 12, 8


def log_at_once(client, runs: list[str], name: str, digest: str, source) -> list[Exception]:
    """Every run logs the dataset at the same moment; the errors raised."""
    start, errors = threading.Barrier(len(runs)), []

    def log(run_id: str) -> None:
        start.wait()
        try:
            log_dataset(client, run_id, name, digest, source, "training")
        except Exception as exc:  # noqa: BLE001 - reported by the caller
            errors.append(exc)

    threads = [threading.Thread(target=log, args=(r,)) for r in runs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return errors


def test_runs_logging_the_same_dataset_at_once_all_record_it(mlflow_server):
    """Two pipelines on the same data reach prepare together: each run gets the dataset as its input, though the
    server's get-or-create of the dataset row races between them (without the retry this fails in most rounds)."""
    from mlflow import MlflowClient
    from mlflow.data.dataset_source_registry import resolve_dataset_source

    client = MlflowClient(mlflow_server)
    experiment = client.create_experiment("same-dataset-at-once")
    source = resolve_dataset_source("/data/train.json")
    for round in range(ROUNDS):  # a new dataset each round: each round races to create its row
        runs = [client.create_run(experiment).info.run_id for _ in range(RUNS)]
        name = f"org/data-{round}#train"
        assert log_at_once(client, runs, name, f"sha256:{round:064x}", source) == []
        for run_id in runs:
            assert [d.dataset.name for d in client.get_run(run_id).inputs.dataset_inputs] == [name], run_id
