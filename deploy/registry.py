"""Model registry: register a logged model and point an alias (e.g. "champion") at the version.

Aliases replace MLflow's deprecated stages: ``models:/<name>@<alias>`` always loads the version the
alias points at, so promoting a new model is one call and serving picks it up on restart.
"""

from __future__ import annotations

import re

import mlflow
from mlflow import MlflowClient

from detr.errors import InvalidInputError

# MLflow rejects some alias names (e.g. "latest", "v1"): check before registering anything.
_ALIAS = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]{0,254}$")
_RESERVED_ALIAS = re.compile(r"^(latest|v\d+)$", re.IGNORECASE)


def check_alias(alias: str) -> None:
    if not _ALIAS.match(alias) or _RESERVED_ALIAS.match(alias):
        raise InvalidInputError(
            f"alias {alias!r} is not allowed: use letters, digits, '_' and '-', starting with a letter "
            "or '_' (not 'latest' or 'v<number>'), e.g. 'champion'"
        )


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
