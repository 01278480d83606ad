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
or zip checkpoint is refused before anything is deserialised: a map file is never unpickled. A
file that cannot be read (empty, cut anywhere, garbage, a header that is not JSON) is reported as
``"<path> is truncated or corrupt: <detail>"``. Every tensor is checked on the way in: finite
(`read_tensors`), and present with the shape its kind, dimensions and preprocessing imply, with
nothing left over (`check_map_tensors`); each error names the path and the tensor.

Files written before the ``clamp`` -> ``winsorize`` rename (hyper-parameter ``clamp``, tensors
``prep_x_.clamp_lo`` / ``clamp_hi``) load unchanged: the map classes translate the old names.

This module knows the file format only, not the map classes: `AlignmentMap.save` and
`xlens_align.maps.load` (in `maps.base`) call it, never the other way round.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from xlens_align.files import atomic_path
from xlens_align.loading import check_device
from xlens_align.maps.preprocess import Preprocessor

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "MapContentError",
    "check_model",
    "check_map_tensors",
    "corrupt",
    "model_identity",
    "read_metadata",
    "read_tensors",
    "write_map_file",
]

FORMAT = "xlens_align.alignment_map"
FORMAT_VERSION = 1
_MAX_HEADER = 100_000_000


def write_map_file(
    path: str | os.PathLike[str],
    *,
    kind: str,
    params: Mapping[str, Any],
    state: Mapping[str, Any],
    provenance: Mapping[str, Any],
    tensors: Mapping[str, Tensor],
) -> Path:
    """Write one map file (see the module docstring) atomically through `files.atomic_path`."""
    from xlens_align import __version__

    meta = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "kind": kind,
        "library_version": __version__,
        "params": json.dumps(params),
        "state": json.dumps(state),
        "provenance": json.dumps(provenance),
    }
    out = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    path = Path(path)
    with atomic_path(path) as tmp:
        save_file(out, str(tmp), metadata=meta)
    return path


class MapContentError(ValueError):
    """A map file's tensors do not fit its kind (missing, unexpected or of the wrong shape);
    `load` adds the path."""


def corrupt(path: Path, detail: str) -> ValueError:
    """The one wording for a file that cannot be read: ``<path> is truncated or corrupt: <detail>``."""
    return ValueError(f"{path} is truncated or corrupt: {detail}")


def _sniff(path: Path) -> None:
    """Refuse anything that does not start like a safetensors file, without deserialising it.

    A safetensors file starts with its JSON header's length (8 bytes, little-endian) and the
    header itself; that is checked first, since a valid length may well start with byte 0x80,
    the mark of a pickle.
    """
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else 0
        first = f.read(min(n, _MAX_HEADER)) if 0 < n <= _MAX_HEADER else b""
    if 0 < n <= size - 8 and first.lstrip().startswith(b"{"):
        return
    if head[:4] == b"PK\x03\x04":
        raise ValueError(
            f"{path} is a zip archive (e.g. a torch.save checkpoint with a pickled data.pkl), "
            "not a safetensors map file; refusing to unpickle it"
        )
    # a cut map file whose header length happens to start with 0x80 still starts like a map file
    if head[:1] == b"\x80" and len(head) == 8 and not (n <= _MAX_HEADER and (size == 8 or first[:1] == b"{")):
        raise ValueError(f"{path} is a Python pickle, not a safetensors map file; refusing to unpickle it")
    if len(head) < 8:
        raise corrupt(path, f"only {size} bytes, too short for a safetensors map file")
    if n == 0 or n > _MAX_HEADER or n > size - 8:
        raise corrupt(path, f"its safetensors header length {n} does not fit in the file's {size} bytes")
    raise corrupt(path, "its safetensors header is not JSON")


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
        raise corrupt(path, f"safetensors cannot read it ({e})") from None
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
            raise corrupt(path, f"bad {key!r} metadata ({type(e).__name__}: {e})") from None
        if not isinstance(meta[key], dict):
            raise corrupt(path, f"its {key!r} metadata is not a JSON object")
    return meta


def read_tensors(path: str | os.PathLike[str], device: str | torch.device = "cpu") -> dict[str, Tensor]:
    """All tensors of a map file (whose metadata `read_metadata` has already checked); every
    floating tensor must be finite (ValueError naming the tensor otherwise)."""
    device = check_device(device)  # an unusable device is not a damaged file
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    except Exception as e:
        raise corrupt(Path(path), f"safetensors cannot read its tensors ({e})") from None
    for name, t in tensors.items():
        if torch.is_floating_point(t) and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise ValueError(
                f"{path}: tensor {name!r} holds {bad} non-finite value(s) (NaN/inf) of {t.numel()}; "
                "the file is damaged or the map diverged: refit it and save it again"
            )
    return tensors


def check_map_tensors(
    tensors: Mapping[str, Tensor],
    shapes: Mapping[str, tuple[int, ...]],
    preprocessors: Mapping[str, Mapping[str, Any]],
    kind: str,
    d_in: int,
    d_out: int,
) -> None:
    """A loaded map's tensors against its kind's expectations: every tensor of `shapes` (name ->
    shape) and of the `preprocessors` (attribute -> saved config; ``prep_x_`` has `d_in` dims,
    ``prep_y_`` `d_out`) present with its shape, nothing else; `MapContentError` naming the
    tensor otherwise."""
    what = f"the {kind!r} map with d_in={d_in}, d_out={d_out}"
    need: dict[str, tuple[int, ...] | None] = dict(shapes)
    optional: dict[str, tuple[int, ...] | None] = {}
    for k, cfg in preprocessors.items():
        req, opt = Preprocessor.tensor_shapes(cfg, {"prep_x_": d_in, "prep_y_": d_out}.get(k))
        need.update({f"{k}.{n}": shape for n, shape in req.items()})
        optional.update({f"{k}.{n}": shape for n, shape in opt.items()})
    missing = sorted(n for n in need if n not in tensors)
    if missing:
        raise MapContentError(f"{what} needs tensor(s) {missing}, missing from the file")
    unknown = sorted(n for n in tensors if n not in need and n not in optional)
    if unknown:
        raise MapContentError(f"tensor(s) {unknown} are not part of {what} (expected {sorted(need)})")
    for name, t in tensors.items():
        shape = need[name] if name in need else optional[name]
        if shape is not None and tuple(t.shape) != tuple(shape):
            raise MapContentError(f"tensor {name!r} has shape {list(t.shape)}; {what} needs {list(shape)}")


def model_identity(model: Any, side: str) -> tuple[Any, Any]:
    """``(model.model_id, model.config_hash)``; TypeError naming `side` when either is missing."""
    missing = [a for a in ("model_id", "config_hash") if not hasattr(model, a)]
    if missing:
        raise TypeError(f"{side} must have .model_id and .config_hash attributes; missing {missing}")
    return model.model_id, model.config_hash


def check_model(path: Path, provenance: Mapping[str, Any], side: str, model: Any) -> None:
    """Refuse `model` (A for side ``"a"``, B for ``"b"``) if the file records another one."""
    if model is None:
        return
    model_id, config_hash = model_identity(model, side)
    want_id, want_hash = provenance.get(f"model_id_{side}"), provenance.get(f"config_hash_{side}")
    label = side.upper()
    if want_id is None and want_hash is None:
        raise ValueError(
            f"{path} records no model {label} (model_id_{side}/config_hash_{side} missing from its provenance), "
            f"so it cannot be checked against {side}={model_id!r}; load it without {side}= to skip the check"
        )
    if want_id != model_id or want_hash != config_hash:
        raise ValueError(
            f"{path} was fit for model {label} model_id={want_id!r} config_hash={want_hash!r}, but {side} has "
            f"model_id={model_id!r} config_hash={config_hash!r}"
        )
