"""MLflow's model registry: a chosen model as a new version of a registered model, aliased `champion`.

Beside uipe/tracking.py (runs, nesting, tags, datasets, artifacts), the second and last module that talks to
MLflow; it reaches the store through tracking.client only.
"""

from __future__ import annotations

from pathlib import Path

from uipe.tracking import client

CHAMPION = "champion"


def register_model(uri: str, name: str, folder: Path, run_id: str, tags: dict[str, str],
                   copy: bool) -> tuple[str, str]:
    """Register the model `folder` as a new version of `name`, aliased CHAMPION, and return (version, source).
    With `copy` the folder is first logged as the artifact "model" of run `run_id` and registered from there;
    without, it is registered by its path (a large model is not copied)."""
    from mlflow.exceptions import MlflowException

    c = client(uri)
    if copy:
        c.log_artifacts(run_id, str(folder), "model")
        source = f"{c.get_run(run_id).info.artifact_uri}/model"
    else:
        source = folder.resolve().as_uri()
    try:
        c.create_registered_model(name, description="UIPE-unlearned models chosen by uipe search")
    except MlflowException as e:  # already registered: add a version
        if "already exists" not in str(e).lower() and "RESOURCE_ALREADY_EXISTS" not in str(e):
            raise
    version = c.create_model_version(name, source=source, run_id=run_id, tags=tags)
    c.set_registered_model_alias(name, CHAMPION, version.version)
    return version.version, source
