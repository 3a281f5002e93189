"""Save and load optimizer state dicts as .npz files: exact bytes, no pickle, atomic writes.

A checkpoint is written to a temporary file in the target's folder, flushed and
fsynced, then renamed over the target (``os.replace``, atomic on POSIX and
Windows). A write that fails part-way (disk full, a killed process) therefore
leaves the previous checkpoint whole, never a truncated file.
"""

from __future__ import annotations

import json
import os
import tempfile
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, cast

import numpy as np

from ._checks import is_dict, is_ndarray
from ._types import FloatArray
from .optim import STATE_FORMAT

_META_KEYS = ("format", "version", "optimizer", "step", "hyperparams")


def save_state(state_dict: Mapping[str, Any], path: str | os.PathLike[str]) -> None:
    """Write ``opt.state_dict()`` to exactly ``path`` (which must end in .npz), atomically.

    Arrays are stored bit for bit. The state dict is checked first: only float
    arrays and JSON-representable metadata are written (never a pickled object)."""
    path = _checkpoint_path(path)
    arrays, meta = _encode(state_dict)
    # mkstemp creates the file 0600; keep the mode of the checkpoint it replaces, else 0644.
    mode = path.stat().st_mode & 0o777 if path.exists() else 0o644
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        if hasattr(os, "fchmod"):
            os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            entries: dict[str, Any] = {**arrays, "meta": np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)}
            np.savez(f, **entries)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def load_state(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a file written by :func:`save_state` back into a state dict.

    Anything that is not such a file (a .npy, a text file, a damaged archive)
    raises ``ValueError`` saying what is wrong; a missing file, ``FileNotFoundError``."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a directory, not a checkpoint file")
    try:
        data = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
        if isinstance(exc, FileNotFoundError):
            raise
        raise ValueError(f"{path} is not a fisheropt checkpoint (.npz): {exc}") from exc
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise ValueError(f"{path} is a single .npy array, not a fisheropt checkpoint (.npz)")
    data = cast("np.lib.npyio.NpzFile[Any]", data)  # of arrays of any dtype
    with data:
        try:
            meta = json.loads(bytes(data["meta"]).decode())
            if not is_dict(meta) or meta.get("format") != STATE_FORMAT:
                raise ValueError("its metadata does not name the fisheropt optimizer state format")
            layout = meta.pop("layout")
            state = {name: [data[f"state/{name}/{i}"] for i in range(n)] for name, n in layout.items()}
            hp = meta["hyperparams"]
            if "betas" in hp:
                hp["betas"] = tuple(hp["betas"])
            missing = [k for k in _META_KEYS if k not in meta]
            if missing:
                raise ValueError(f"its metadata lacks {', '.join(missing)}")
        except (
            KeyError,
            TypeError,
            AttributeError,
            UnicodeDecodeError,
            json.JSONDecodeError,
            zipfile.BadZipFile,
            OSError,
            ValueError,
            EOFError,
        ) as exc:
            reason = f"missing entry {exc}" if isinstance(exc, KeyError) else str(exc) or type(exc).__name__
            raise ValueError(f"{path} is not a fisheropt checkpoint: {reason}") from exc
    return {**meta, "state": state}


def _checkpoint_path(path: str | os.PathLike[str]) -> Path:
    path = Path(path)
    if path.suffix != ".npz":
        # np.savez would append ".npz" to a bare name, and load_state(path) would then not find it.
        raise ValueError(f"checkpoint path must end in .npz, got {str(path)!r}")
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a directory; give a file name ending in .npz")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"folder {str(path.parent)!r} does not exist")
    return path


def _encode(state_dict: object) -> tuple[dict[str, FloatArray], dict[str, Any]]:
    """(arrays, metadata) of a state dict, refusing anything save_state cannot store exactly."""
    if not is_dict(state_dict) or state_dict.get("format") != STATE_FORMAT:
        raise ValueError("not a fisheropt optimizer state dict (use opt.state_dict())")
    missing = [k for k in (*_META_KEYS, "state") if k not in state_dict]
    if missing:
        raise ValueError(f"state dict lacks {', '.join(missing)}")
    meta = {k: state_dict[k] for k in _META_KEYS}
    try:
        json.dumps(meta, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"state dict metadata is not plain JSON data: {exc}") from exc
    state = state_dict["state"]
    if not is_dict(state):
        raise ValueError("state dict 'state' must map names to lists of arrays")
    arrays: dict[str, FloatArray] = {}
    layout: dict[str, int] = {}
    for name, tensors in state.items():
        if not isinstance(name, str) or "/" in name or isinstance(tensors, (str, bytes, dict)):
            raise ValueError(f"state entry {name!r} must be a name mapping to a list of arrays")
        tensors = list(tensors)
        layout[name] = len(tensors)
        for i, a in enumerate(tensors):
            a = _to_host(a)
            dtype = getattr(a, "dtype", None)
            if not is_ndarray(a) or getattr(dtype, "kind", None) != "f":
                raise ValueError(
                    f"state[{name!r}][{i}] must be a float array, got "
                    f"{type(a).__name__}{'' if dtype is None else ' of dtype ' + str(dtype)}"
                )
            arrays[f"state/{name}/{i}"] = cast(FloatArray, a)
    meta["layout"] = layout
    return arrays, meta


def _to_host(a: Any) -> Any:
    get = getattr(a, "get", None)  # CuPy arrays copy to the host with .get()
    return get() if callable(get) and not is_ndarray(a) else a


def _fsync_dir(folder: Path) -> None:
    """Make the rename itself durable (POSIX); a no-op where folders cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
