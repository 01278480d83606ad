"""Remote runs on NDIF through nnsight: `RemoteModel` has `LensModel`'s points and methods, so
`collect`, `effects.measure`, `effects.grid`, `generate` and the similarity grids take it for A,
B or both. `load_model("remote:<hub id or directory>", host=...)` makes one from a source string
(the CLI's ``--a`` / ``--b`` take that form); `model_status` asks a host about a deployment.
"""

from __future__ import annotations

import os
from typing import Any

from .client import (
    ConnectionLost,
    ModelNotDeployed,
    RemoteResultError,
    RemoteRunError,
    RemoteTimeout,
    ServerError,
    ServerUnreachable,
    deployment_states,
    model_status,
)
from .model import RemoteModel
from .modules import MODULE_PATHS

__all__ = [
    "MODULE_PATHS",
    "PREFIX",
    "ConnectionLost",
    "ModelNotDeployed",
    "RemoteModel",
    "RemoteResultError",
    "RemoteRunError",
    "RemoteTimeout",
    "ServerError",
    "ServerUnreachable",
    "deployment_states",
    "load_model",
    "model_status",
]

PREFIX = "remote:"
_REMOTE_KEYS = {"host", "api_key", "timeout", "connect_timeout", "check", "max_request_bytes"}


def load_model(source: Any, tokenizer: Any = None, **kwargs: Any) -> Any:
    """`xa.load_model`: a `RemoteModel` for ``"remote:<hub id or directory>"``, else a local
    `LensModel` (`models.load_model`). Remote keywords: host, api_key, timeout, connect_timeout,
    check, max_request_bytes, dtype, name (``device`` must stay "cpu": results land on the CPU)."""
    from ..models import load_model as load_local

    if isinstance(source, str | os.PathLike) and str(source).startswith(PREFIX):
        target = str(source)[len(PREFIX) :]
        if not target:
            raise ValueError(f"source {source!r}: give a hub id or a model directory after {PREFIX!r}")
        device = kwargs.pop("device", "cpu")
        if str(device) != "cpu":
            raise ValueError(
                f"device must be 'cpu' for a remote model (results land on the CPU), got {device!r}"
            )
        return RemoteModel(target, tokenizer=tokenizer, **kwargs)
    extra = sorted(_REMOTE_KEYS & set(kwargs))
    if extra:
        raise TypeError(f"{extra} apply to remote models only: write the source as '{PREFIX}{source}'")
    return load_local(source, tokenizer, **kwargs)
