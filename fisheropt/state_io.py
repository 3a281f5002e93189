"""Save and load optimizer state dicts as .npz files: exact bytes, no pickle."""
from __future__ import annotations

import json

import numpy as np

from .optim import STATE_FORMAT


def save_state(state_dict: dict, path) -> None:
    """Write ``opt.state_dict()`` to ``path`` (.npz). Arrays are stored bit for bit."""
    arrays = {}
    layout = {}
    for name, tensors in state_dict["state"].items():
        layout[name] = len(tensors)
        for i, a in enumerate(tensors):
            arrays[f"state/{name}/{i}"] = _to_host(a)
    meta = {k: state_dict[k] for k in ("format", "version", "optimizer", "step", "hyperparams")}
    meta["layout"] = layout
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    np.savez(path, **arrays)


def load_state(path) -> dict:
    """Read a file written by :func:`save_state` back into a state dict."""
    with np.load(path, allow_pickle=False) as data:
        meta = json.loads(bytes(data["meta"]).decode())
        if meta.get("format") != STATE_FORMAT:
            raise ValueError(f"{path} is not a fisheropt optimizer state file")
        state = {name: [data[f"state/{name}/{i}"] for i in range(n)] for name, n in meta.pop("layout").items()}
    hp = meta["hyperparams"]
    if "betas" in hp:
        hp["betas"] = tuple(hp["betas"])
    return {**meta, "state": state}


def _to_host(a):
    get = getattr(a, "get", None)  # CuPy arrays copy to the host with .get()
    return get() if callable(get) and not isinstance(a, np.ndarray) else np.asarray(a)
