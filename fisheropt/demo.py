"""``fisheropt demo``: what the library is for, in a few minutes on a laptop CPU.

A one-hidden-layer NumPy MLP (:class:`fisheropt.refimpl.models.MLP`) learns
scikit-learn's bundled 8×8 digits (offline) with

* the adaptive optimizers ``fisheropt.Adam``, ``AdamW`` and ``FAdam`` (mean
  cross-entropy gradients, ``opt.step(grads)``), and
* natural-gradient descent θ ← θ − η d with the directions
  ``fisheropt.fisher.ngd_direction(kind)`` for the empirical Fisher (EF), the
  sampled Fisher (SF) and the improved empirical Fisher (iEF),

on every backend that :func:`fisheropt.backends.available` lists. It prints a
table (final train loss, test accuracy, time per training step, backend) and
writes ``loss_curves.png``, ``test_accuracy.png``, ``report.md`` and
``metrics.json`` into the output folder. Everything is seeded: the same seed
gives the same numbers.

CuPy: the model runs on the host, so on the cupy backend the gradients (or G)
are copied to the GPU, the update/direction is computed there and copied back;
the step time then includes those transfers.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np

import fisheropt as fo
from fisheropt import fisher
from fisheropt.experiments import _common as C
from fisheropt.refimpl.models import MLP, load_digits_split

FULL = dict(hidden=32, batch=64, epochs=10)
QUICK = dict(hidden=16, batch=64, epochs=2, n_train=384)
ADAPTIVE = {"Adam": (fo.Adam, dict(lr=3e-3)), "AdamW": (fo.AdamW, dict(lr=3e-3)),
            "FAdam": (fo.FAdam, dict(lr=3e-3))}
NGD = {"NGD-EF": "ef", "NGD-SF": "sf", "NGD-iEF": "ief"}
NGD_LR, NGD_DAMPING = 0.1, 1.0
METHODS = (*ADAPTIVE, *NGD)


class _Transfer:
    """Host <-> backend array moves (identity except for cupy)."""

    def __init__(self, backend):
        self.xp = fo.backends.get(backend).array_module
        self.device = self.xp is not np

    def to(self, a):
        return self.xp.asarray(a) if self.device else a

    def back(self, a):
        return self.xp.asnumpy(a) if self.device else a


def train(method, backend, data, cfg, seed):
    """Train one model; returns a row of results and the per-epoch curves."""
    X_tr, y_tr, X_te, y_te = data
    N = X_tr.shape[0]
    model = MLP(X_tr.shape[1], cfg["hidden"], 10, seed=seed)
    rng = np.random.default_rng([seed, 5])
    io = _Transfer(backend)
    if method in ADAPTIVE:
        cls, hp = ADAPTIVE[method]
        dev_params = [io.to(p) for p in model.params]
        opt = cls(dev_params, backend=backend, **hp)
    curve = {"train_loss": [model.loss(X_tr, y_tr) / N], "test_acc": [model.accuracy(X_te, y_te)]}
    step_times = []
    for _ in C.progress(range(cfg["epochs"]), desc=f"{method} [{backend}]"):
        order = rng.permutation(N)
        for start in range(0, N, cfg["batch"]):
            idx = order[start:start + cfg["batch"]]
            X, y = X_tr[idx], y_tr[idx]
            t0 = time.perf_counter()
            if method in ADAPTIVE:
                _, grads = model.loss_and_grads(X, y)
                opt.step([io.to(g / idx.size) for g in grads])
                if io.device:
                    for host, dev in zip(model.params, dev_params):
                        host[...] = io.back(dev)
            else:
                kind = NGD[method]
                G = model.per_sample_grads(X, y)
                kw = {}
                if kind == "ief":
                    kw["s"] = io.to(fisher.logit_grad_sq_norms(model.probs(X), y))
                elif kind == "sf":
                    probs = model.probs(X)
                    kw.update(J=io.to(model.logit_jacobians(X)), probs=io.to(probs),
                              labels_sampled=io.to(fisher.sample_labels(probs, 1, seed=rng)))
                d = io.back(fisher.ngd_direction(kind, G=io.to(G), damping=NGD_DAMPING, backend=backend, **kw))
                offset = 0
                for p in model.params:            # θ ← θ − η d, in place
                    p -= NGD_LR * d[offset:offset + p.size].reshape(p.shape)
                    offset += p.size
            step_times.append(time.perf_counter() - t0)
        curve["train_loss"].append(model.loss(X_tr, y_tr) / N)
        curve["test_acc"].append(model.accuracy(X_te, y_te))
    # Skip the first steps (JIT compilation, caches) when timing.
    warm = step_times[min(5, len(step_times) - 1):]
    row = {"method": method, "backend": backend, "train_loss": curve["train_loss"][-1],
           "test_acc": curve["test_acc"][-1], "step_ms": 1e3 * float(np.median(warm)),
           "steps": len(step_times)}
    return row, curve


def run(*, quick: bool = False, out_dir: Path, seed: int = 0, verbose: bool = False) -> dict:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = QUICK if quick else FULL
    X_tr, y_tr, X_te, y_te = load_digits_split(seed=seed)
    if cfg.get("n_train"):
        X_tr, y_tr = X_tr[: cfg["n_train"]], y_tr[: cfg["n_train"]]
    data = (X_tr, y_tr, X_te, y_te)
    backends = fo.backends.available()
    skipped = fo.backends.unavailable()
    if verbose:
        print(f"fisheropt demo{' (quick)' if quick else ''}: digits MLP 64-{cfg['hidden']}-10, "
              f"{X_tr.shape[0]} train / {X_te.shape[0]} test images, {cfg['epochs']} epochs, "
              f"batch {cfg['batch']}, seed {seed}")
        print(f"backends: {', '.join(backends)}"
              + "".join(f"; {n} skipped ({r.splitlines()[0][:70]})" for n, r in skipped.items()))

    rows, curves = [], {}
    jobs = [(b, m) for b in backends for m in METHODS]
    with C.stopwatch() as elapsed, C.blas_threads():
        for backend, method in C.progress(jobs, desc="demo", leave=True):
            row, curve = train(method, backend, data, cfg, seed)
            rows.append(row)
            curves[(method, backend)] = curve

    plots = [_plot(out_dir / "loss_curves.png", curves, backends, "train_loss", "train loss (mean CE)", True),
             _plot(out_dir / "test_accuracy.png", curves, backends, "test_acc", "test accuracy", False)]
    cols = ["method", "backend", "train_loss", "test_acc", "step_ms"]
    heads = {"train_loss": "final train loss", "test_acc": "test accuracy", "step_ms": "ms/step"}
    table_text = C.text_table(rows, cols, heads)
    report = f"""# fisheropt demo

Digits MLP (64-{cfg['hidden']}-10, tanh), {X_tr.shape[0]} training / {X_te.shape[0]} test images, {cfg['epochs']} epochs,
minibatch {cfg['batch']}, seed {seed}{" (quick mode)" if quick else ""}.
Adaptive optimizers: lr 3e-3, library defaults otherwise, mean cross-entropy gradients.
Natural-gradient descent: θ ← θ − {NGD_LR} d, d = `fisheropt.fisher.ngd_direction(kind, damping={NGD_DAMPING})`
on the summed batch loss (SF: one sampled label per image).
ms/step = median wall time of one training step (gradient + update), first 5 steps excluded.
Backends: {', '.join(backends)}.{''.join(f' {n}: unavailable ({r.splitlines()[0][:100]}).' for n, r in skipped.items())}
Wall time {elapsed():.1f} s. {C.environment_line()}.

{C.markdown_table(rows, cols, heads)}
![loss curves](loss_curves.png)
![test accuracy](test_accuracy.png)
"""
    C.write_report(out_dir, report)
    C.save_metrics(out_dir, {"config": cfg, "seed": seed, "rows": rows,
                             "curves": {f"{m}|{b}": c for (m, b), c in curves.items()}})
    if verbose:
        print()
        print(table_text)
        print(f"\nLoss curves: {plots[0].resolve()}")
    return {"rows": rows, "plots": [str(p) for p in plots], "report": str(out_dir / "report.md"),
            "summary": table_text, "backends": backends}


def _plot(path, curves, backends, key, ylabel, logy):
    plt = C.pyplot()
    fig, axes = plt.subplots(1, len(backends), figsize=(6 * len(backends), 4.2), dpi=110, squeeze=False)
    for ax, backend in zip(axes[0], backends):
        for method in METHODS:
            ys = curves[(method, backend)][key]
            ax.plot(np.arange(len(ys)), ys, marker=".", label=method, ls="--" if method in NGD else "-")
        if logy:
            ax.set_yscale("log")
        ax.set_title(f"backend: {backend}")
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)
