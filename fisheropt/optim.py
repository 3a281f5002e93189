"""Optimizer classes: validation, state and backend dispatch around the step kernels.

The math lives in fisheropt.refimpl (and, fused, in each backend); a class here
only (1) checks every input before anything is written, (2) owns the state
arrays, (3) calls its backend's multi-tensor step once per step, and
(4) saves and restores its state exactly.
"""
from __future__ import annotations

from . import _checks
from . import backends as _backends

STATE_FORMAT = "fisheropt.optimizer_state"
STATE_VERSION = 1


class Optimizer:
    """Base class. Subclasses set ``state_names`` and implement ``_validate`` and ``_apply``."""

    state_names: tuple[str, ...] = ()

    def __init__(self, params, *, backend: str = "auto", check_finite: bool = True, **hyperparams):
        self.params = _checks.check_params(params)
        self.backend = _backends.select(backend, self.params)
        self.xp = self.backend.array_module
        self._hyperparams = self._validate(dict(hyperparams))
        self.check_finite = bool(check_finite)
        self.step_count = 0
        self.state = {name: [self._new_state(name, i, p) for i, p in enumerate(self.params)]
                      for name in self.state_names}

    # ---- hyperparameters -------------------------------------------------
    @property
    def hyperparams(self) -> dict:
        """A copy; change values with :meth:`set_hyperparams` (validated)."""
        return dict(self._hyperparams)

    def set_hyperparams(self, **changes) -> None:
        """Change hyperparameters (e.g. a learning-rate schedule); all or nothing."""
        unknown = set(changes) - set(self._hyperparams)
        if unknown:
            raise TypeError(f"unknown hyperparameter(s) for {type(self).__name__}: {', '.join(sorted(unknown))}")
        self._hyperparams = self._validate({**self._hyperparams, **changes})

    @property
    def lr(self) -> float:
        return self._hyperparams["lr"]

    @lr.setter
    def lr(self, value) -> None:
        self.set_hyperparams(lr=value)

    # ---- stepping ---------------------------------------------------------
    def step(self, grads) -> None:
        """Apply one update with ``grads`` (aligned with params). Rejected input changes nothing."""
        grads = _checks.check_grads(grads, self.params)
        _checks.recheck_params(self.params)  # a caller may have made one read-only since
        if self.check_finite and not self.backend.all_finite(grads):
            bad = [i for i, g in enumerate(grads) if not self.backend.all_finite([g])]
            raise FloatingPointError(
                f"non-finite values (NaN or Inf) in grads{bad}; nothing was updated "
                "(pass check_finite=False to skip this check)")
        self._apply(grads, self.step_count + 1)
        self.step_count += 1

    # ---- state ------------------------------------------------------------
    def state_dict(self) -> dict:
        """A deep copy of everything needed to resume: step, hyperparameters, state arrays."""
        return {
            "format": STATE_FORMAT,
            "version": STATE_VERSION,
            "optimizer": type(self).__name__,
            "step": self.step_count,
            "hyperparams": self.hyperparams,
            "state": {name: [a.copy() for a in arrays] for name, arrays in self.state.items()},
        }

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore a :meth:`state_dict` exactly; checked in full before anything changes."""
        sd = state_dict
        if not isinstance(sd, dict) or sd.get("format") != STATE_FORMAT:
            raise ValueError("not a fisheropt optimizer state dict")
        if sd.get("version") != STATE_VERSION:
            raise ValueError(f"state dict version {sd.get('version')!r} is not supported (expected {STATE_VERSION})")
        if sd.get("optimizer") != type(self).__name__:
            raise ValueError(f"state dict is for {sd.get('optimizer')}, not {type(self).__name__}")
        step = sd.get("step")
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"state dict step must be a non-negative int, got {step!r}")
        hyperparams = sd.get("hyperparams")
        if not isinstance(hyperparams, dict) or set(hyperparams) != set(self._hyperparams):
            raise ValueError("state dict hyperparameters do not match this optimizer's")
        hyperparams = self._validate(dict(hyperparams))
        state = sd.get("state")
        if not isinstance(state, dict) or set(state) != set(self.state_names):
            raise ValueError(f"state dict state must have exactly the entries {self.state_names}")
        incoming = {}
        for name in self.state_names:
            arrays = list(state[name])
            if len(arrays) != len(self.params):
                raise ValueError(f"state[{name!r}] has {len(arrays)} arrays for {len(self.params)} params")
            converted = []
            for i, (new, own) in enumerate(zip(arrays, self.state[name])):
                new = self.xp.asarray(new)
                if new.shape != own.shape or new.dtype != own.dtype:
                    raise ValueError(f"state[{name!r}][{i}] has shape {tuple(new.shape)} and dtype {new.dtype}; "
                                     f"expected {tuple(own.shape)} and {own.dtype}")
                converted.append(new)
            incoming[name] = converted
        # Everything checked: now copy in place (backends may hold pointers to these arrays).
        for name, arrays in incoming.items():
            for own, new in zip(self.state[name], arrays):
                own[...] = new
        self.step_count = step
        self._hyperparams = hyperparams

    # ---- for subclasses ---------------------------------------------------
    def _validate(self, hp: dict) -> dict:
        raise NotImplementedError

    def _new_state(self, name: str, index: int, param):
        return self.xp.zeros_like(param)

    def _apply(self, grads, step: int) -> None:
        raise NotImplementedError

    def __repr__(self) -> str:
        hp = ", ".join(f"{k}={v!r}" for k, v in self._hyperparams.items())
        return f"{type(self).__name__}({len(self.params)} tensors, {hp}, backend={self.backend.NAME!r})"


def _adam_family_hyperparams(hp: dict) -> dict:
    lr = _checks.check_real("lr", hp.pop("lr"), low=0.0)
    beta1, beta2 = _checks.check_betas(hp.pop("betas"))
    eps = _checks.check_real("eps", hp.pop("eps"), low=0.0, low_open=True)
    weight_decay = _checks.check_real("weight_decay", hp.pop("weight_decay"), low=0.0)
    return {"lr": lr, "betas": (beta1, beta2), "eps": eps, "weight_decay": weight_decay, **hp}


def _kernel_kwargs(hp: dict) -> dict:
    """Hyperparameters as the backend step functions take them (betas split)."""
    kw = dict(hp)
    kw["beta1"], kw["beta2"] = kw.pop("betas")
    return kw


class Adam(Optimizer):
    """Adam with L2 weight decay, identical to torch.optim.Adam. Spec: spec/adam.md."""

    state_names = ("m", "v")

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, *,
                 backend="auto", check_finite=True):
        super().__init__(params, backend=backend, check_finite=check_finite,
                         lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)

    def _validate(self, hp):
        return _adam_family_hyperparams(hp)

    def _apply(self, grads, step):
        self.backend.adam_step(self.params, grads, self.state["m"], self.state["v"],
                               step=step, **_kernel_kwargs(self._hyperparams))


class AdamW(Adam):
    """Adam with decoupled weight decay, identical to torch.optim.AdamW. Spec: spec/adamw.md."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, *,
                 backend="auto", check_finite=True):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                         backend=backend, check_finite=check_finite)

    def _apply(self, grads, step):
        self.backend.adamw_step(self.params, grads, self.state["m"], self.state["v"],
                                step=step, **_kernel_kwargs(self._hyperparams))


class FAdam(Optimizer):
    """FAdam (Hwang 2024): Fisher-corrected Adam. Spec: spec/fadam.md.

    ``eps2`` scales the adaptive epsilon, ``clip`` caps the RMS of the natural
    gradient and of the preconditioned weight decay, ``p`` is the Fisher power
    (0.5 gives the square root, as in Adam)."""

    state_names = ("m", "f")

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, eps2=0.01, clip=1.0, p=0.5,
                 weight_decay=0.1, *, backend="auto", check_finite=True):
        super().__init__(params, backend=backend, check_finite=check_finite, lr=lr, betas=betas,
                         eps=eps, eps2=eps2, clip=clip, p=p, weight_decay=weight_decay)

    def _validate(self, hp):
        hp["eps2"] = _checks.check_real("eps2", hp["eps2"], low=0.0, low_open=True)
        hp["clip"] = _checks.check_real("clip", hp["clip"], low=0.0, low_open=True)
        hp["p"] = _checks.check_real("p", hp["p"], low=0.0, high=1.0, low_open=True)
        return _adam_family_hyperparams(hp)

    def _apply(self, grads, step):
        self.backend.fadam_step(self.params, grads, self.state["m"], self.state["f"],
                                step=step, **_kernel_kwargs(self._hyperparams))


class CoupledAdam(Optimizer):
    """Coupled Adam (Stollenwerk & Stollenwerk 2025). Spec: spec/coupled_adam.md.

    ``coupled`` holds one bool per parameter: True for an embedding matrix
    (2-D, rows = vocabulary) whose second moment is shared across rows; those
    store only a length-d vector ``v``. Uncoupled tensors follow AdamW."""

    state_names = ("m", "v")

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, coupled=None, *,
                 backend="auto", check_finite=True):
        params = _checks.check_params(params)
        self.coupled = self._check_coupled(coupled, params)
        self._coupled_idx = [i for i, c in enumerate(self.coupled) if c]
        self._uncoupled_idx = [i for i, c in enumerate(self.coupled) if not c]
        super().__init__(params, backend=backend, check_finite=check_finite,
                         lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)

    @staticmethod
    def _check_coupled(coupled, params) -> tuple[bool, ...]:
        if coupled is None:
            raise ValueError("coupled is required: one bool per parameter (True for embedding matrices)")
        coupled = list(coupled)
        if len(coupled) != len(params):
            raise ValueError(f"coupled has {len(coupled)} entries for {len(params)} params")
        for i, (c, p) in enumerate(zip(coupled, params)):
            if not isinstance(c, bool):
                raise TypeError(f"coupled[{i}] must be a bool, got {type(c).__name__}")
            if c and (p.ndim != 2 or p.shape[0] == 0):
                raise ValueError(f"coupled[{i}] is True but params[{i}] has shape {tuple(p.shape)}; "
                                 "a coupled tensor must be 2-D (V×d, rows = vocabulary) with V ≥ 1")
        return tuple(coupled)

    def _validate(self, hp):
        return _adam_family_hyperparams(hp)

    def _new_state(self, name, index, param):
        if name == "v" and self.coupled[index]:
            return self.xp.zeros(param.shape[1], dtype=param.dtype)
        return self.xp.zeros_like(param)

    def _apply(self, grads, step):
        kw = _kernel_kwargs(self._hyperparams)
        m, v = self.state["m"], self.state["v"]
        for idx, kernel in ((self._uncoupled_idx, self.backend.adamw_step),
                            (self._coupled_idx, self.backend.coupled_adam_step)):
            if idx:
                kernel([self.params[i] for i in idx], [grads[i] for i in idx],
                       [m[i] for i in idx], [v[i] for i in idx], step=step, **kw)
