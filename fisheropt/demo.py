"""``fisheropt demo``: what the library is for, in a few minutes on a laptop CPU.

A one-hidden-layer NumPy MLP (:class:`fisheropt.workloads.models.MLP`) learns
scikit-learn's bundled 8×8 digits (offline) with

* every optimizer of the rule registry (:data:`fisheropt.refimpl.RULES`: Adam,
  AdamW, CoupledAdam, FAdam, ... and any rule added later), from its class
  ``fisheropt.<rule.title>`` with the rule's defaults and lr 3e-3 (mean
  cross-entropy gradients, ``opt.step(grads)``), and
* natural-gradient descent θ ← θ − η d with every direction
  ``fisheropt.fisher.ngd_direction(kind)`` of :data:`fisheropt.fisher.KINDS`: the
  exact Fisher, the empirical Fisher (EF), the sampled Fisher (SF) and the
  improved empirical Fisher (iEF),

on every backend that :func:`fisheropt.backends.available` lists. It writes
``report.md`` and ``metrics.json`` and prints a table (final train loss, test
accuracy, time per training step, backend) before it draws ``loss_curves.png``
and ``test_accuracy.png`` into the output folder, so a missing matplotlib costs
only the plots. Everything is seeded: the same seed gives the same numbers.

A rule with a per-tensor flag (Coupled Adam's ``coupled``: a V×d matrix whose
rows are a vocabulary) gets the first-layer weight W1 (64 pixels × hidden)
flagged: the input pixels play the vocabulary. The MLP has no embedding; W1 is
the one matrix whose rows are indexed by input symbols, as an embedding's are.

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
from fisheropt.experiments import _common as common
from fisheropt.refimpl import RULES
from fisheropt.workloads.models import MLP, load_digits_split

FULL = dict(hidden=32, batch=64, epochs=10)
QUICK = dict(hidden=16, batch=64, epochs=2, n_train=384)
ADAPTIVE_LR = 3e-3
#: method label -> rule, for every rule of the registry (the label is the class name).
ADAPTIVE = {rule.title: rule for rule in RULES.values()}
FIRST_LAYER_WEIGHT = 0  # index of W1 in MLP.params = [W1, b1, W2, b2]
_KIND_LABELS = {"exact": "exact", "ef": "EF", "sf": "SF", "ief": "iEF"}
#: method label -> kind of fisheropt.fisher.ngd_direction, for every kind.
NGD = {f"NGD-{_KIND_LABELS.get(kind, kind)}": kind for kind in fisher.KINDS}
NGD_LR, NGD_DAMPING = 0.1, 1.0
METHODS = (*ADAPTIVE, *NGD)


def make_optimizer(rule, params, backend):
    """``fisheropt.<rule.title>`` on ``params`` with the rule's defaults and lr ADAPTIVE_LR; a
    tensor flag (Coupled Adam's ``coupled``) marks params[FIRST_LAYER_WEIGHT] only."""
    kwargs = {**rule.defaults(), "lr": ADAPTIVE_LR}
    if rule.tensor_flag is not None:
        kwargs[rule.tensor_flag.name] = [i == FIRST_LAYER_WEIGHT for i in range(len(params))]
    return getattr(fo, rule.title)(params, backend=backend, **kwargs)


def method_notes() -> list[str]:
    """One line per method whose setup needs saying: a rule's flagged tensor, the NGD step."""
    notes = [
        f"{rule.title}: {rule.tensor_flag.name}=True for the first-layer weight W1 only: the MLP has no "
        f"embedding, so W1's rows (the 64 input pixels) play the vocabulary; the other tensors have "
        f"{rule.tensor_flag.name}=False"
        for rule in ADAPTIVE.values()
        if rule.tensor_flag is not None
    ]
    notes.append(
        f"NGD-*: θ ← θ − {NGD_LR} d, d = fisheropt.fisher.ngd_direction(kind, damping={NGD_DAMPING}) "
        "on the summed batch loss (SF: one sampled label per image)"
    )
    return notes


def _ngd_inputs(kind, model, X, y, rng) -> dict:
    """The arrays besides G that ``fisher.ngd_direction(kind)`` takes, computed only when needed."""
    if kind == "ef":
        return {}
    probs = model.probs(X)
    if kind == "ief":
        return {"s": fisher.logit_grad_sq_norms(probs, y)}
    inputs = {"J": model.logit_jacobians(X), "probs": probs}
    if kind == "sf":
        inputs["labels_sampled"] = fisher.sample_labels(probs, 1, seed=rng)
    return inputs


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
    transfer = _Transfer(backend)
    opt, device_params = None, []  # an adaptive rule's optimizer and the parameters it updates
    if method in ADAPTIVE:
        device_params = [transfer.to(p) for p in model.params]
        opt = make_optimizer(ADAPTIVE[method], device_params, backend)
    curve = {"train_loss": [model.loss(X_tr, y_tr) / N], "test_acc": [model.accuracy(X_te, y_te)]}
    step_times = []
    for _ in common.progress(range(cfg["epochs"]), desc=f"{method} [{backend}]"):
        order = rng.permutation(N)
        for start in range(0, N, cfg["batch"]):
            idx = order[start : start + cfg["batch"]]
            X, y = X_tr[idx], y_tr[idx]
            t0 = time.perf_counter()
            if opt is not None:
                _, grads = model.loss_and_grads(X, y)
                opt.step([transfer.to(g / idx.size) for g in grads])
                if transfer.device:
                    for host, device in zip(model.params, device_params):
                        host[...] = transfer.back(device)
            else:
                kind = NGD[method]
                G = model.per_sample_grads(X, y)
                inputs = {name: transfer.to(a) for name, a in _ngd_inputs(kind, model, X, y, rng).items()}
                d = transfer.back(
                    fisher.ngd_direction(kind, G=transfer.to(G), damping=NGD_DAMPING, backend=backend, **inputs)
                )
                for p, d_p in zip(model.params, model.unflatten(d)):  # θ ← θ − η d, in place
                    p -= NGD_LR * d_p
            step_times.append(time.perf_counter() - t0)
        curve["train_loss"].append(model.loss(X_tr, y_tr) / N)
        curve["test_acc"].append(model.accuracy(X_te, y_te))
    steps_after_warmup = step_times[min(5, len(step_times) - 1) :]  # JIT compilation, caches
    row = {
        "method": method,
        "backend": backend,
        "train_loss": curve["train_loss"][-1],
        "test_acc": curve["test_acc"][-1],
        "step_ms": 1e3 * float(np.median(steps_after_warmup)),
        "steps": len(step_times),
    }
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
        print(
            f"fisheropt demo{' (quick)' if quick else ''}: digits MLP 64-{cfg['hidden']}-10, "
            f"{X_tr.shape[0]} train / {X_te.shape[0]} test images, {cfg['epochs']} epochs, "
            f"batch {cfg['batch']}, seed {seed}"
        )
        print(
            f"backends: {', '.join(backends)}"
            + "".join(f"; {n} skipped ({r.splitlines()[0][:70]})" for n, r in skipped.items())
        )

    rows, curves = [], {}
    jobs = [(b, m) for b in backends for m in METHODS]
    with common.stopwatch() as elapsed, common.blas_threads():
        for backend, method in common.progress(jobs, desc="demo", leave=True):
            row, curve = train(method, backend, data, cfg, seed)
            rows.append(row)
            curves[(method, backend)] = curve

    cols = ["method", "backend", "train_loss", "test_acc", "step_ms"]
    heads = {"train_loss": "final train loss", "test_acc": "test accuracy", "step_ms": "ms/step"}
    table_text = common.text_table(rows, cols, heads)
    notes = method_notes()
    report = f"""# fisheropt demo

Digits MLP (64-{cfg["hidden"]}-10, tanh), {X_tr.shape[0]} training / {X_te.shape[0]} test images, \
{cfg["epochs"]} epochs,
minibatch {cfg["batch"]}, seed {seed}{" (quick mode)" if quick else ""}.
Optimizers: every rule of `fisheropt.refimpl.RULES` ({", ".join(ADAPTIVE)}), lr {ADAPTIVE_LR:g}, the rule's
defaults otherwise, mean cross-entropy gradients.
Natural-gradient descent: θ ← θ − {NGD_LR} d, d = `fisheropt.fisher.ngd_direction(kind, damping={NGD_DAMPING})`
for every kind ({", ".join(NGD.values())}) on the summed batch loss (SF: one sampled label per image).
ms/step = median wall time of one training step (gradient + update), first 5 steps excluded.
Backends: {", ".join(backends)}.{"".join(f" {n}: unavailable ({r.splitlines()[0][:100]})." for n, r in skipped.items())}
Wall time {elapsed():.1f} s. {common.environment_line()}.

{common.markdown_table(rows, cols, heads)}
Notes:
{chr(10).join(f"- {note}" for note in notes)}
"""
    # Results first (terminal, report, metrics), plots last: without matplotlib only the plots are lost.
    common.write_report(out_dir, report)
    common.save_metrics(out_dir, {"config": cfg, "seed": seed, "rows": rows, "notes": notes, "curves": curves})
    if verbose:
        print()
        print(table_text)
        print("\n" + "\n".join(f"note: {note}" for note in notes))
    try:
        plots = [
            _plot(out_dir / "loss_curves.png", curves, backends, "train_loss", "train loss (mean CE)", True),
            _plot(out_dir / "test_accuracy.png", curves, backends, "test_acc", "test accuracy", False),
        ]
    except ImportError as exc:
        plots = []
        if verbose:
            print(f"\nNo plots: {exc}")
    else:
        common.write_report(
            out_dir, report + "\n" + "".join(f"![{p.stem.replace('_', ' ')}]({p.name})\n" for p in plots)
        )
        if verbose:
            print(f"\nLoss curves: {plots[0].resolve()}")
    return {
        "rows": rows,
        "plots": [str(p) for p in plots],
        "report": str(out_dir / "report.md"),
        "summary": table_text,
        "notes": notes,
        "backends": backends,
    }


def _plot(path, curves, backends, key, ylabel, logy):
    plt = common.pyplot()
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
    return common.save_figure(fig, path)
