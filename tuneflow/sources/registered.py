"""Models the export stage logged to MLflow, as a model to train from or to judge with: ``models:/<name>@<alias>``,
``models:/<name>/<version>`` or ``models:/<model_id>`` (e.g. model.name_or_path: models:/assistant/1, so that DPO
starts from the SFT version registered as 1).

    model_id = resolve("models:/assistant/1", tracking_uri)          # "m-…": the logged model it names
    folder = model_folder(model_id, tracking_uri)                    # its Hugging Face folder here, downloaded once

A logged model never changes, so its id pins it as a commit SHA pins a Hub repo: a retrain sees the alias move.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from tuneflow.core.errors import TuneflowError
from tuneflow.core.files import cache_root, install, staging_path

PREFIX = "models:/"


class RegisteredModelProblem(TuneflowError):
    """A models:/ URI that names nothing usable, worded for the user."""


def is_registered(name: str) -> bool:
    return name.startswith(PREFIX)


def resolve(uri: str, tracking_uri: str, key: str = "model.name_or_path") -> str:
    """The id of the logged model ``uri`` names now (``key``: the config key that holds it, for messages)."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    target = uri.removeprefix(PREFIX).strip("/")
    client = MlflowClient(tracking_uri)
    if "@" not in target and "/" not in target:  # a logged model's id (m-...)
        try:
            return client.get_logged_model(target).model_id
        except MlflowException as exc:
            raise RegisteredModelProblem(f"{key}: {uri} is no logged model in MLflow at {tracking_uri} (give "
                                         f"models:/NAME/VERSION or models:/NAME@ALIAS of a registered one): "
                                         f"{str(exc).splitlines()[0]}") from None
    try:
        version = (client.get_model_version_by_alias(*target.split("@", 1)) if "@" in target
                   else client.get_model_version(*target.split("/", 1)))
    except MlflowException as exc:
        raise RegisteredModelProblem(f"{key}: {uri} is not a version of a registered model in MLflow at "
                                     f"{tracking_uri}: {str(exc).splitlines()[0]}") from None
    model_id = version.model_id or (version.source.removeprefix(PREFIX) if version.source.startswith(f"{PREFIX}m-")
                                    else None)
    if not model_id:
        raise RegisteredModelProblem(f"{key}: {uri} (version {version.version}) does not point to a logged model "
                                     "(registered by hand?); register the export stage's model instead")
    return model_id


def model_folder(model_id: str, tracking_uri: str) -> Path:
    """A local Hugging Face folder (weights, config, tokenizer) of the logged model ``model_id``: this machine's cache
    entry, else downloaded into it (a temporary folder, then renamed)."""
    from mlflow import MlflowClient
    from mlflow.artifacts import download_artifacts
    from mlflow.exceptions import MlflowException

    entry = cache_root() / "models" / model_id
    if entry.is_dir():
        os.utime(entry)  # last use, for `tuneflow cache prune`
        return entry
    entry.parent.mkdir(exist_ok=True)
    staging = staging_path(entry, unique=True)
    try:
        location = MlflowClient(tracking_uri).get_logged_model(model_id).artifact_location  # mlflow-artifacts:/…
        got = Path(download_artifacts(artifact_uri=location, dst_path=str(staging / "dl"), tracking_uri=tracking_uri))
        folder = staging / "hf"
        shutil.move(got / "model", folder)  # the flavour's layout: model/ and components/tokenizer/
        for file in (got / "components" / "tokenizer").iterdir():
            shutil.move(file, folder / file.name)
        install(folder, entry, keep_existing=True)
    except (MlflowException, OSError) as exc:
        raise RegisteredModelProblem(f"the MLflow model {model_id} cannot be fetched from {tracking_uri}: "
                                     f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return entry


def registered_folder(uri: str, tracking_uri: str) -> Path:
    """The local folder of the model ``uri`` names now."""
    return model_folder(resolve(uri, tracking_uri), tracking_uri)
