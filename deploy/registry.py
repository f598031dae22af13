"""Model registry: register a logged model and point an alias (e.g. "champion") at the version.

Aliases replace MLflow's deprecated stages: ``models:/<name>@<alias>`` always loads the version the
alias points at, so promoting a new model is one call and serving picks it up on restart.
"""

from __future__ import annotations

import mlflow
from mlflow import MlflowClient

from detr.config import MODEL_ALIAS_RULE, is_valid_model_alias
from detr.errors import InvalidInputError


def check_alias(alias: str) -> None:
    """MLflow rejects some alias names: check before anything is registered."""
    if not is_valid_model_alias(alias):
        raise InvalidInputError(f"alias {alias!r} is not allowed: {MODEL_ALIAS_RULE}")


def register(model_uri: str, name: str, *, alias: str | None = None) -> str:
    """Register ``model_uri`` as a new version of ``name`` (created when missing); returns the
    version and, with ``alias``, moves the alias to it."""
    if not name.strip():
        raise InvalidInputError("the registered model name is empty")
    if alias is not None:
        check_alias(alias)
    version = mlflow.register_model(model_uri, name).version
    if alias is not None:
        MlflowClient().set_registered_model_alias(name, alias, version)
    return str(version)
