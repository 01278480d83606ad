"""Saving and loading alignment maps: one safetensors file, never pickle.

File format (format version 1). A standard safetensors file whose tensors are the map's
fitted tensors (names as the attributes: ``weight_``, ``bias_``, ``prep_x_.offset``,
``net_.skip.weight``, ...) and whose header ``__metadata__`` (string -> string) holds:

- ``format``: ``"xlens_align.alignment_map"``; ``format_version``: ``"1"``;
- ``kind``: the registry key (``"affine"``, ``"procrustes"``, ...);
- ``library_version``: ``xlens_align.__version__`` at save time;
- ``params``: JSON of the constructor hyper-parameters;
- ``state``: JSON of the non-tensor fitted attributes (``alpha_``, ``d_in_``, ``history_``, ...);
- ``provenance``: JSON of `AlignmentMap.provenance` (points, model ids and config hashes, ...).

Reading goes through `safetensors` only (`safe_open`), after sniffing the header, so a pickle
or zip checkpoint is refused before anything is deserialised.
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from xlens_align.maps.base import AlignmentMap, NotFittedError, registry

__all__ = ["FORMAT", "FORMAT_VERSION", "load", "read_metadata", "save_map"]

FORMAT = "xlens_align.alignment_map"
FORMAT_VERSION = 1
_MAX_HEADER = 100_000_000


def save_map(m: AlignmentMap, path: str | os.PathLike[str]) -> Path:
    """Write fitted map `m` to `path` (atomically: a temporary file renamed into place)."""
    if not isinstance(m, AlignmentMap):
        raise TypeError(f"expected an AlignmentMap, got {type(m).__name__}")
    if not m.is_fitted:
        raise NotFittedError(f"cannot save an unfitted {type(m).__name__}: call fit first")
    if not m.kind or registry.get(m.kind) is not type(m):
        raise ValueError(
            f"{type(m).__name__} is not a registered map kind; decorate it with @register('name')"
        )
    from xlens_align import __version__

    tensors, scalars = m._state()
    meta = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "kind": m.kind,
        "library_version": __version__,
        "params": json.dumps(m._params_json()),
        "state": json.dumps(scalars),
        "provenance": json.dumps(m.provenance),
    }
    out = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent or ".")
    os.close(fd)
    try:
        save_file(out, tmp, metadata=meta)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _sniff(path: Path) -> None:
    """Refuse anything that does not start like a safetensors file, without deserialising it."""
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if head[:4] == b"PK\x03\x04":
            raise ValueError(
                f"{path} is a zip archive (e.g. a torch.save checkpoint with a pickled data.pkl), "
                "not a safetensors map file; refusing to unpickle it"
            )
        if head[:1] == b"\x80":
            raise ValueError(
                f"{path} is a Python pickle, not a safetensors map file; refusing to unpickle it"
            )
        if len(head) < 8:
            raise ValueError(f"{path} is not a safetensors map file: only {size} bytes")
        (n,) = struct.unpack("<Q", head)
        if n == 0 or n > _MAX_HEADER or n > size - 8:
            raise ValueError(
                f"{path} is not a safetensors map file, or it is truncated: header length {n} "
                f"does not fit in the file's {size} bytes"
            )
        header = f.read(n)
    if not header.lstrip().startswith(b"{"):
        raise ValueError(f"{path} is not a safetensors map file (its header is not JSON)")


def read_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The decoded metadata of a map file (kind, params, state, provenance, versions)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no map file at {path}")
    _sniff(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = f.metadata() or {}
    except Exception as e:  # safetensors raises its own error types for bad headers / short files
        raise ValueError(f"{path} is a corrupted or truncated safetensors file: {e}") from None
    if raw.get("format") != FORMAT:
        raise ValueError(
            f"{path} is a safetensors file but not an xlens_align map file (no format={FORMAT!r} metadata)"
        )
    try:
        version = int(raw.get("format_version", ""))
    except ValueError:
        raise ValueError(f"{path}: bad format_version {raw.get('format_version')!r}") from None
    if version > FORMAT_VERSION:
        raise ValueError(
            f"{path} has map format version {version}; this xlens_align reads up to {FORMAT_VERSION}: upgrade"
        )
    meta: dict[str, Any] = {
        "format_version": version,
        "kind": raw.get("kind"),
        "library_version": raw.get("library_version"),
    }
    for key in ("params", "state", "provenance"):
        try:
            meta[key] = json.loads(raw[key])
        except (KeyError, json.JSONDecodeError) as e:
            raise ValueError(f"{path} is a corrupted map file: bad {key!r} metadata ({e})") from None
        if not isinstance(meta[key], dict):
            raise ValueError(f"{path} is a corrupted map file: {key!r} metadata is not a JSON object")
    return meta


def _check_side(path: Path, prov: dict[str, Any], side: str, model: Any) -> None:
    if model is None:
        return
    missing = [a for a in ("model_id", "config_hash") if not hasattr(model, a)]
    if missing:
        raise TypeError(f"{side} must have .model_id and .config_hash attributes; missing {missing}")
    want_id, want_hash = prov.get(f"model_id_{side}"), prov.get(f"config_hash_{side}")
    label = side.upper()
    if want_id is None and want_hash is None:
        raise ValueError(
            f"{path} records no model {label} (model_id_{side}/config_hash_{side} missing from its provenance), "
            f"so it cannot be checked against {side}={model.model_id!r}; load it without {side}= to skip the check"
        )
    if want_id != model.model_id or want_hash != model.config_hash:
        raise ValueError(
            f"{path} was fit for model {label} model_id={want_id!r} config_hash={want_hash!r}, but {side} has "
            f"model_id={model.model_id!r} config_hash={model.config_hash!r}"
        )


def load(
    path: str | os.PathLike[str],
    a: Any = None,
    b: Any = None,
    device: str | torch.device = "cpu",
) -> AlignmentMap:
    """Rebuild a saved map. With `a` / `b` (objects with ``.model_id`` and ``.config_hash``),
    refuse a file whose recorded source / target model differs."""
    path = Path(path)
    meta = read_metadata(path)
    kind = meta["kind"]
    cls = registry.get(kind)
    if cls is None:
        raise ValueError(f"{path} holds a map of unknown kind {kind!r}; known kinds: {sorted(registry)}")
    prov = meta["provenance"]
    _check_side(path, prov, "a", a)
    _check_side(path, prov, "b", b)
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    except Exception as e:
        raise ValueError(f"{path} is a corrupted or truncated safetensors file: {e}") from None
    try:
        m = cls(**cls._params_from_json(meta["params"], tensors))
        m._load_state(tensors, meta["state"])
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise ValueError(
            f"{path}: cannot rebuild the {kind!r} map from its contents ({type(e).__name__}: {e})"
        ) from e
    m._provenance = dict(prov)
    if not m.is_fitted:
        raise ValueError(f"{path}: the stored {kind!r} map lacks its fitted state")
    return m
