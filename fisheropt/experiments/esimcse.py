"""ESimCSE vs unsup-SimCSE on a tiny NumPy sentence encoder: length bias, alignment/uniformity, isotropy.

Paper: Wu et al. (2021), "ESimCSE: Enhanced Sample Building Method for
Contrastive Learning of Unsupervised Sentence Embedding".
Claim: unsup-SimCSE's positive pairs (one sentence, two dropout masks) always
share their length, so the encoder learns that sentences of similar length are
similar; ESimCSE builds positives by word repetition (lengths differ) and adds
a momentum-contrast queue of negatives, which reduces that length bias and
improves semantic similarity (+2.02 Spearman points on STS, BERT-base).

Setup (all offline): sentences from the English text of CPython's ``help()``
topics (``pydoc_data.topics``); the bag-of-embeddings encoder of
:mod:`fisheropt.workloads.esimcse_encoder` (token + position embeddings,
dropout, mean pooling, a projection). Each method is trained with Adam, FAdam
and Coupled Adam from the same initialisation and batch order per seed. There
is no STS data offline, so "semantic similarity" is measured on held-out
sentences by whether same-topic pairs are more similar than different-topic
pairs; the length-bias statistic is computed on held-out random pairs (see
the report).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

import fisheropt as fo
from fisheropt.refimpl.esimcse_loss import TEMPERATURE, info_nce_with_grad
from fisheropt.refimpl.esimcse_momentum import MOMENTUM
from fisheropt.refimpl.esimcse_queue import MomentumQueue, default_queue_size
from fisheropt.refimpl.esimcse_repetition import DUP_RATE, word_repetition_batch
from fisheropt.refimpl.isotropy import embedding_report
from fisheropt.workloads import esimcse_encoder as enc
from fisheropt.workloads.pydoc_sentences import build_dataset

from . import _common as common

TITLE = "ESimCSE vs unsup-SimCSE: length bias of a tiny sentence encoder"

FULL: dict[str, Any] = dict(
    dim=64, out_dim=64, batch=64, steps=500, evals=10, n_seeds=3, n_eval=400, dropout=0.1, ablations=True
)
QUICK: dict[str, Any] = dict(
    dim=16, out_dim=16, batch=32, steps=40, evals=2, n_seeds=1, n_eval=120, dropout=0.1, ablations=False
)
MAX_TOKENS = 32  # sentence length range kept from the corpus: 5..32 words
MIN_TOKENS = 5
MAX_LEN = 48  # position table; a repeated 32-word sentence has at most 42 tokens
DTYPE = np.float32  # parameters and activations; the loss and its gradient are float64
HYPER = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
FADAM_EXTRA = dict(eps2=0.01, clip=1.0, p=0.5)
OPTIMIZERS = ("Adam", "FAdam", "Coupled Adam")
METHODS = ("SimCSE", "ESimCSE")
# Ablations (full run only, Adam only): one ESimCSE component at a time, and ESimCSE
# without leaving the anchor's own sentence out of the queue (see train_one).
ABLATIONS = ("SimCSE + repetition", "SimCSE + queue", "ESimCSE, unmasked queue")
DELETIONS = (1, 2, 3, 4, 5, 6)  # positive-pair probes: a sentence vs itself minus k random words
LEN_BINS = 16  # |ΔL| = 0..14, and ≥ 15
SHORT_GAP = 3  # the paper's split: length difference ≤ 3 vs > 3


# ---- training -----------------------------------------------------------------
def _make_optimizer(name, params):
    if name == "Adam":
        return fo.Adam(params, **HYPER)
    if name == "FAdam":
        return fo.FAdam(params, **HYPER, **FADAM_EXTRA)
    if name == "Coupled Adam":
        return fo.CoupledAdam(params, coupled=list(enc.COUPLED), **HYPER)
    raise ValueError(name)


class _MomentumNegatives:
    """ESimCSE's momentum encoder and its queue of past batches' embeddings (with their sentence ids)."""

    def __init__(self, params, out_dim, batch):
        self.momentum = [p.copy() for p in params]
        self.embeddings = MomentumQueue(out_dim, default_queue_size(batch))
        self.sentence_ids = MomentumQueue(1, default_queue_size(batch))

    def negatives(self, idx, masks_own_sentences):
        # On ~2k sentences the queue often holds a sentence of this very batch,
        # a false negative for its own anchor (impossible in the paper's single
        # pass over 10⁶ sentences); such rows are dropped — for the other anchors
        # that sentence is an in-batch negative anyway.
        negatives = self.embeddings.negatives()
        if masks_own_sentences:
            negatives = negatives[~np.isin(self.sentence_ids.negatives()[:, 0], idx)]
        return negatives

    def push(self, backend, params, tokens, lengths, idx):
        # MoCo order: update the momentum encoder, encode this batch with it
        # (dropout off), then enqueue — the next step sees it as negatives.
        backend.ema_update(self.momentum, params, decay=MOMENTUM)
        self.embeddings.enqueue(enc.forward(self.momentum, tokens, lengths)[0])
        self.sentence_ids.enqueue(idx[:, None])


def train_one(method, opt_name, cfg, seed, train, vocab_size, *, eval_fn=None, desc=None):
    """Train one encoder; returns (params, history, backend name).

    SimCSE: positives are the same sentences under a second dropout mask, only
    in-batch negatives. ESimCSE: positives are word-repeated copies (each view
    with its own dropout), plus the momentum queue as extra negatives. Batches,
    initialisation and dropout streams depend only on the seed."""
    params = enc.init_params(
        vocab_size, MAX_LEN, cfg["dim"], cfg["out_dim"], rng=np.random.default_rng([seed, 1]), dtype=DTYPE
    )
    opt = _make_optimizer(opt_name, params)
    backend = opt.backend  # the EMA kernel runs on the optimizer's backend
    repeats_words = method in ("ESimCSE", "SimCSE + repetition", "ESimCSE, unmasked queue")
    uses_momentum_queue = method in ("ESimCSE", "SimCSE + queue", "ESimCSE, unmasked queue")
    masks_own_sentences = method != "ESimCSE, unmasked queue"
    queue = _MomentumNegatives(params, cfg["out_dim"], cfg["batch"]) if uses_momentum_queue else None
    batch_rng = np.random.default_rng([seed, 2])
    drop_rng = np.random.default_rng([seed, 3])
    aug_rng = np.random.default_rng([seed, 4])
    eval_at = common.evaluation_steps(cfg["steps"], cfg["evals"])
    hist = {"step": [], "train_loss": [], "topic_auc": [], "neg_gap": []}
    running = []
    batches = _epoch_batches(len(train), cfg["batch"], batch_rng)
    for step in common.progress(range(cfg["steps"] + 1), desc=desc):
        if step in eval_at:
            hist["step"].append(step)
            hist["train_loss"].append(float(np.mean(running)) if running else float("nan"))
            running = []
            if eval_fn is not None:
                m = eval_fn(params)
                hist["topic_auc"].append(m["topic_auc"])
                hist["neg_gap"].append(m["neg_gap"])
        if step == cfg["steps"]:
            break
        idx = next(batches)
        sents = [train[i] for i in idx]
        pos = word_repetition_batch(sents, dup_rate=DUP_RATE, rng=aug_rng) if repeats_words else sents
        t1, l1 = enc.pad_batch(sents, MAX_LEN)
        t2, l2 = enc.pad_batch(pos, MAX_LEN)
        z1, c1 = enc.forward(params, t1, l1, dropout=cfg["dropout"], rng=drop_rng)
        z2, c2 = enc.forward(params, t2, l2, dropout=cfg["dropout"], rng=drop_rng)
        negatives = None if queue is None else queue.negatives(idx, masks_own_sentences)
        loss, g1, g2 = info_nce_with_grad(z1, z2, negatives, tau=TEMPERATURE)
        grads = [a + b for a, b in zip(enc.backward(params, c1, g1), enc.backward(params, c2, g2))]
        opt.step(grads)
        running.append(loss)
        if queue is not None:
            queue.push(backend, params, t1, l1, idx)
    return params, hist, backend.NAME


def _epoch_batches(n, batch, rng):
    """Batches of distinct indices, epoch by epoch (a fresh permutation each epoch)."""
    while True:
        order = rng.permutation(n)
        for start in range(0, n - batch + 1, batch):
            yield order[start : start + batch]


# ---- evaluation ---------------------------------------------------------------
def _unit(z):
    return z / np.linalg.norm(z, axis=1, keepdims=True)


def _delete(s, k, rng):
    keep = np.sort(rng.choice(len(s), size=len(s) - k, replace=False))
    return s[keep]


def _auc(scores, labels):
    """ROC AUC of ``scores`` for binary ``labels`` (Mann–Whitney, ties averaged)."""
    from scipy.stats import rankdata

    labels = np.asarray(labels, dtype=bool)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(scores)
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


class Evaluator:
    """Held-out probes, fixed once (the same pairs and perturbations for every model).

    * topics (the semantic-similarity stand-in): a pair of held-out sentences
      from the same ``help()`` topic should be more similar than a pair from
      different topics (ROC AUC over all held-out pairs), and the nearest
      training sentence should come from the same topic (1-NN accuracy);
    * negatives: every pair of distinct held-out sentences, binned by |ΔL|;
    * positives: each sentence vs a copy with k random words deleted (k in
      DELETIONS, kept when ≥ 4 words remain) — an augmentation neither method
      trains on, with |ΔL| = k and the meaning mostly kept."""

    def __init__(self, evals, eval_topics, train, train_topics, seed=0, n_probe_train=800):
        rng = np.random.default_rng([seed, 99])
        self.sents, self.topics = evals, np.asarray(eval_topics)
        self.train, self.train_topics = train, np.asarray(train_topics)
        self.lengths = np.array([len(s) for s in evals])
        i, j = np.triu_indices(len(evals), k=1)
        self.pairs = (i, j)
        self.pair_dl = np.abs(self.lengths[i] - self.lengths[j])
        self.same_topic = self.topics[i] == self.topics[j]
        self.pos = {k: [(n, _delete(s, k, rng)) for n, s in enumerate(evals) if len(s) - k >= 4] for k in DELETIONS}
        self.probe_idx = rng.choice(len(train), size=min(n_probe_train, len(train)), replace=False)

    def embed(self, params, sents):
        return _unit(enc.encode(params, sents, max_len=MAX_LEN))

    def __call__(self, params, full=False) -> dict:
        U = self.embed(params, self.sents)
        i, j = self.pairs
        cos_neg = np.einsum("nd,nd->n", U[i], U[j])
        short = self.pair_dl <= SHORT_GAP
        out: dict[str, Any] = {
            "neg_gap": float(cos_neg[short].mean() - cos_neg[~short].mean()),
            "topic_auc": _auc(cos_neg, self.same_topic),
        }
        if not full:
            return out
        T = self.embed(params, self.train)
        out["topic_nn"] = float(np.mean(self.train_topics[np.argmax(U @ T.T, axis=1)] == self.topics))
        bins = np.minimum(self.pair_dl, LEN_BINS - 1)
        out["neg_curve"] = [
            float(cos_neg[bins == b].mean()) if np.any(bins == b) else float("nan") for b in range(LEN_BINS)
        ]
        out["neg_cos"] = float(cos_neg.mean())
        out["neg_corr"] = float(np.corrcoef(cos_neg, self.pair_dl)[0, 1])
        pos_cos = {}
        for k, pairs in self.pos.items():
            P = self.embed(params, [s for _, s in pairs])
            pos_cos[k] = np.einsum("nd,nd->n", P, U[[n for n, _ in pairs]])
        out["pos_curve"] = [float(pos_cos[k].mean()) for k in DELETIONS]
        short_pos = np.concatenate([pos_cos[k] for k in DELETIONS if k <= SHORT_GAP])
        long_pos = np.concatenate([pos_cos[k] for k in DELETIONS if k > SHORT_GAP])
        out["pos_gap"] = float(short_pos.mean() - long_pos.mean())
        # Wang & Isola (2020): alignment E‖f(x)−f(x+)‖², uniformity log E exp(−2‖f(x)−f(y)‖²)
        pairs = self.pos[1] + self.pos[2] + self.pos[3]
        P = self.embed(params, [s for _, s in pairs])
        out["align"] = float(np.mean(np.sum((P - U[[n for n, _ in pairs]]) ** 2, axis=1)))
        out["uniform"] = float(np.log(np.mean(np.exp(-2.0 * (2.0 - 2.0 * cos_neg)))))
        # Length probe: R² of a ridge regression of the word count on the unit embedding.
        Xtr = T[self.probe_idx]
        ytr = np.array([len(self.train[t]) for t in self.probe_idx], dtype=np.float64)
        A = np.hstack([Xtr, np.ones((Xtr.shape[0], 1))])
        w = np.linalg.solve(A.T @ A + 1e-3 * np.eye(A.shape[1]), A.T @ ytr)
        pred = np.hstack([U, np.ones((U.shape[0], 1))]) @ w
        y = self.lengths.astype(np.float64)
        out["len_r2"] = float(1.0 - np.sum((y - pred) ** 2) / np.sum((y - y.mean()) ** 2))
        tok = embedding_report(params[0][2:])  # token embeddings, <pad>/<unk> rows excluded
        sent = embedding_report(enc.encode(params, self.sents, max_len=MAX_LEN))
        out.update(
            {
                "tok_iso": tok["isotropy"],
                "tok_mu_ratio": tok["mu_ratio"],
                "tok_cond": tok["condition_number"],
                "sent_iso": sent["isotropy"],
                "sent_mu_ratio": sent["mu_ratio"],
                "sent_cond": sent["condition_number"],
            }
        )
        return out


# ---- plots --------------------------------------------------------------------
def _plot_length_curves(path, finals, init, key, xs, *, title, xlabel):
    plt = common.pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), dpi=110, sharey=True)
    for ax, method in zip(axes, METHODS):
        for (m, o), res in finals.items():
            if m != method:
                continue
            arr = np.array([r[key] for r in res], dtype=float)
            ax.plot(xs, arr.mean(axis=0), marker="o", ms=3, lw=1.4, label=o)
        ax.set_title(method)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
    for (m, o), res in finals.items():  # ablations, drawn on the panel of the method they modify
        if m in ABLATIONS:
            arr = np.array([r[key] for r in res], dtype=float)
            axes[1 if m.startswith("ESimCSE") else 0].plot(xs, arr.mean(axis=0), ls="--", lw=1.2, label=f"{m} ({o})")
    for ax in axes:
        ax.plot(xs, init[key], ls=":", color="gray", label="untrained")
        ax.legend(fontsize=7)
    axes[0].set_ylabel("mean cosine similarity")
    fig.suptitle(title, fontsize=10)
    return common.save_figure(fig, path)


def _plot_align_uniform(path, finals, init):
    plt = common.pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.8), dpi=110)
    markers = {"SimCSE": "o", "ESimCSE": "s", ABLATIONS[0]: "^", ABLATIONS[1]: "v", ABLATIONS[2]: "D"}
    colors = dict(zip(OPTIMIZERS, ("tab:blue", "tab:orange", "tab:green")))
    for (m, o), res in finals.items():
        ax.scatter(
            [r["uniform"] for r in res],
            [r["align"] for r in res],
            marker=markers[m],
            color=colors[o],
            label=f"{m} / {o}",
            s=28,
            alpha=0.85,
        )
    ax.scatter([init["uniform"]], [init["align"]], marker="x", color="gray", label="untrained")
    ax.set_xlabel("uniformity  log E exp(−2‖f(x)−f(y)‖²)  (lower = more uniform)")
    ax.set_ylabel("alignment  E‖f(x)−f(x⁺)‖²  (lower = better)")
    ax.set_title("Wang & Isola alignment vs uniformity (held-out, one point per seed)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return common.save_figure(fig, path)


# ---- the experiment -----------------------------------------------------------
LABELS = {
    "neg_gap": "neg gap ≤3−>3",
    "neg_corr": "corr(cos, len diff)",
    "len_r2": "length R²",
    "topic_auc": "topic AUC",
    "topic_nn": "topic 1-NN",
    "align": "alignment",
    "uniform": "uniformity",
}
SUMMARY_METRICS = (
    "train_loss",
    "topic_auc",
    "topic_nn",
    "neg_gap",
    "neg_corr",
    "pos_gap",
    "len_r2",
    "align",
    "uniform",
    "tok_iso",
    "tok_mu_ratio",
    "tok_cond",
    "sent_iso",
    "sent_mu_ratio",
)


def run(*, quick: bool, out_dir: Path, seed: int = 0) -> dict:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = QUICK if quick else FULL
    train, evals, train_topics, eval_topics, vocab, _ = build_dataset(min_tokens=MIN_TOKENS, max_tokens=MAX_TOKENS)
    evals, eval_topics = evals[: cfg["n_eval"]], eval_topics[: cfg["n_eval"]]
    evaluator = Evaluator(evals, eval_topics, train, train_topics, seed=0)
    seeds = [seed + i for i in range(cfg["n_seeds"])]
    grid = [(m, o) for m in METHODS for o in OPTIMIZERS]
    if cfg["ablations"]:
        grid += [(m, "Adam") for m in ABLATIONS]

    finals: dict = {}
    per_seed, histories, backends = [], {}, set()
    init = enc.init_params(
        len(vocab), MAX_LEN, cfg["dim"], cfg["out_dim"], rng=np.random.default_rng([seeds[0], 1]), dtype=DTYPE
    )
    # BLAS and Numba on one thread: the matrices are tiny, and on a shared machine a thread
    # pool costs more than it gains.
    with common.stopwatch() as elapsed, common.blas_threads(numba=True), np.errstate(all="ignore"):
        init_res = evaluator(init, full=True)
        for s in seeds:
            for method, opt_name in grid:
                params, hist, backend = train_one(
                    method, opt_name, cfg, s, train, len(vocab), eval_fn=evaluator, desc=f"{method}/{opt_name} seed {s}"
                )
                backends.add(backend)
                histories[(method, opt_name, s)] = hist
                res = evaluator(params, full=True)
                res["train_loss"] = hist["train_loss"][-1]
                finals.setdefault((method, opt_name), []).append(res)
                per_seed.append(
                    {"method": method, "optimizer": opt_name, "seed": s, **{k: res[k] for k in SUMMARY_METRICS}}
                )

    init_row = {"method": "untrained", "optimizer": "—", **{k: init_res.get(k, float("nan")) for k in SUMMARY_METRICS}}
    summary_rows = [
        {
            "method": method,
            "optimizer": opt_name,
            **common.mean_std_columns(finals[(method, opt_name)], SUMMARY_METRICS),
        }
        for method, opt_name in grid
    ]

    # ---- plots ---------------------------------------------------------------
    plots = [
        _plot_length_curves(
            out_dir / "length_bias_negatives.png",
            finals,
            init_res,
            "neg_curve",
            np.arange(LEN_BINS),
            title="Random held-out pairs: cosine vs |length difference| "
            f"(last bin ≥ {LEN_BINS - 1}); a downward slope is length bias",
            xlabel="|ΔL| (words)",
        ),
        _plot_length_curves(
            out_dir / "length_bias_positives.png",
            finals,
            init_res,
            "pos_curve",
            np.array(DELETIONS),
            title="Positive probes: cosine of a sentence and itself minus k random words",
            xlabel="k = words deleted = |ΔL|",
        ),
        _plot_align_uniform(out_dir / "align_uniform.png", finals, init_res),
    ]
    steps = histories[grid[0] + (seeds[0],)]["step"]
    for metric, label in (
        ("train_loss", "training InfoNCE loss (running mean)"),
        ("topic_auc", "held-out same-topic AUC"),
        ("neg_gap", "neg gap (|ΔL| ≤ 3 − > 3)"),
    ):
        curves = {}
        for method, opt_name in grid:
            arr = np.array([histories[(method, opt_name, s)][metric] for s in seeds], dtype=float)
            with np.errstate(all="ignore"):
                curves[f"{method} / {opt_name}"] = arr.mean(axis=0)
        plots.append(
            common.plot_curves(
                out_dir / f"{metric}.png",
                curves,
                xs=steps,
                title=f"{label}, mean over {len(seeds)} seed(s)",
                xlabel="step",
                ylabel=label,
            )
        )

    # ---- verdict (computed, not assumed) ------------------------------------
    def paired(key, a=("SimCSE", None), b=("ESimCSE", None), better="lower"):
        """b − a over matching (seed, optimizer) runs: mean, 2·SE, how often b is better,
        and "better" / "worse" / "no clear difference" (|mean| ≤ 2·SE)."""
        diffs = []
        for s in seeds:
            for o in OPTIMIZERS:
                ra = [r for r in per_seed if r["method"] == a[0] and r["optimizer"] == (a[1] or o) and r["seed"] == s]
                rb = [r for r in per_seed if r["method"] == b[0] and r["optimizer"] == (b[1] or o) and r["seed"] == s]
                if ra and rb and (a[1] is None or b[1] is None or o == OPTIMIZERS[0]):
                    diffs.append(rb[0][key] - ra[0][key])
        d = np.array(diffs, dtype=float)
        se2 = 2 * d.std(ddof=1) / np.sqrt(d.size) if d.size > 1 else float("inf")
        sign = -1 if better == "lower" else 1
        n_better = int(np.sum(sign * d > 0))
        mean = float(d.mean())
        word = "no clear difference" if abs(mean) <= se2 else ("better" if sign * mean > 0 else "worse")
        return {"diff": mean, "two_se": float(se2), "n_better": n_better, "n": int(d.size), "call": word}

    def mean_of(method, key, opt=None):
        return float(
            np.mean([r[key] for r in per_seed if r["method"] == method and (opt is None or r["optimizer"] == opt)])
        )

    COMPARE = (
        ("neg_gap", "lower"),
        ("neg_corr", "higher"),
        ("len_r2", "lower"),
        ("topic_auc", "higher"),
        ("topic_nn", "higher"),
        ("align", "lower"),
        ("uniform", "lower"),
    )
    v = {"init_neg_gap": init_res["neg_gap"]}
    comp_rows = []
    for key, better in COMPARE:
        c = paired(key, better=better)
        v[key] = {"simcse": mean_of("SimCSE", key), "esimcse": mean_of("ESimCSE", key), **c}
        comp_rows.append(
            {
                "metric": LABELS[key],
                "better": better,
                "SimCSE": v[key]["simcse"],
                "ESimCSE": v[key]["esimcse"],
                "diff": c["diff"],
                "two_se": c["two_se"],
                "wins": f"{c['n_better']}/{c['n']}",
                "call": c["call"],
            }
        )
    coupled = {}
    for method in METHODS:
        for key, better in (("tok_iso", "higher"), ("tok_mu_ratio", "lower"), ("topic_auc", "higher")):
            coupled[f"{method}|{key}"] = paired(key, a=(method, "Adam"), b=(method, "Coupled Adam"), better=better)
    v["coupled_vs_adam"] = coupled
    bias_trained = v["neg_gap"]["simcse"] > init_res["neg_gap"]
    bias_reduced = v["neg_gap"]["call"] == "better"
    r2_reduced = v["len_r2"]["call"] == "better"
    sim_better = v["topic_auc"]["call"] == "better"
    v.update(
        simcse_gap_above_untrained=bool(bias_trained),
        bias_reduced=bool(bias_reduced),
        length_r2_reduced=bool(r2_reduced),
        similarity_improved=bool(sim_better),
    )

    cols = ["method", "optimizer", *common.with_std(SUMMARY_METRICS, ("topic_auc", "neg_gap"))]
    heads = {
        "train_loss": "loss",
        "topic_auc": "topic AUC",
        "topic_auc_std": "± std",
        "topic_nn": "topic 1-NN",
        "neg_gap": "neg gap ≤3−>3",
        "neg_gap_std": "± std",
        "neg_corr": "corr(cos, len diff)",
        "pos_gap": "pos gap ≤3−>3",
        "len_r2": "length R²",
        "align": "align",
        "uniform": "uniform",
        "tok_iso": "Iso(E)",
        "tok_mu_ratio": "‖μ‖/‖e‖ (E)",
        "tok_cond": "cond(E)",
        "sent_iso": "Iso(sent)",
        "sent_mu_ratio": "‖μ‖/‖e‖ (sent)",
    }
    table = common.markdown_table([init_row] + summary_rows, cols, heads)
    left_out = ("pos_gap", "tok_mu_ratio", "tok_cond", "sent_mu_ratio")  # of the per-seed table
    seed_cols = ["method", "optimizer", "seed", *(k for k in SUMMARY_METRICS if k not in left_out)]
    n_params = sum(p.size for p in init)

    ablation_lines = ""
    if cfg["ablations"]:

        def row_of(m, o="Adam"):
            return next(r for r in summary_rows if r["method"] == m and r["optimizer"] == o)

        parts = []
        for m in ("SimCSE", ABLATIONS[0], ABLATIONS[1], "ESimCSE", ABLATIONS[2]):
            r = row_of(m)
            parts.append(
                f"  - {m} (Adam): neg gap {common.fmt(r['neg_gap'])}, corr {common.fmt(r['neg_corr'])}, "
                f"length R² {common.fmt(r['len_r2'])}, topic AUC {common.fmt(r['topic_auc'])}, "
                f"align {common.fmt(r['align'])}, uniform {common.fmt(r['uniform'])}, "
                f"Iso(sent) {common.fmt(r['sent_iso'])}"
            )
        ablation_lines = (
            "- Ablations (Adam; one ESimCSE component added to SimCSE at a time, and ESimCSE with the "
            "anchor's own sentence left in the queue):\n" + "\n".join(parts) + "\n"
        )
    comp_table = common.markdown_table(
        comp_rows,
        ["metric", "better", "SimCSE", "ESimCSE", "diff", "two_se", "wins", "call"],
        {
            "better": "better is",
            "diff": "ESimCSE − SimCSE",
            "two_se": "± 2·SE",
            "wins": "ESimCSE better in",
            "call": "ESimCSE is",
        },
    )

    def coupled_line(method):
        iso, mu, auc = (coupled[f"{method}|{key}"] for key in ("tok_iso", "tok_mu_ratio", "topic_auc"))
        return (
            f"  - {method}: Iso(E) {common.fmt(iso['diff'])} (higher in {iso['n_better']}/{iso['n']}: {iso['call']}), "
            f"‖μ‖/‖e‖ (E) {common.fmt(mu['diff'])} (lower in {mu['n_better']}/{mu['n']}: {mu['call']}), "
            f"topic AUC {common.fmt(auc['diff'])} ({auc['call']})"
        )

    coupled_lines = "\n".join(coupled_line(m) for m in METHODS)

    report = f"""{common.report_title(TITLE, quick)}

Claim (Wu et al. 2021): unsup-SimCSE's positives share their length, so the encoder learns
"similar length ⇒ similar meaning"; ESimCSE (word-repetition positives + a momentum-contrast
queue of negatives) reduces this length bias and improves semantic similarity (+2.02 Spearman on
STS with BERT-base). The paper shows the bias by splitting STS-B pairs at a length difference of
3 words (≤ 3 vs > 3).

## Setup

- Corpus: {len(train)} training / {len(evals)} held-out unique prose sentences of `pydoc_data.topics`
  ({MIN_TOKENS}–{MAX_TOKENS} lower-cased words, {len(set(train_topics.tolist()))} `help()` topics), vocabulary
  {len(vocab)} (words seen twice in training, plus `<pad>`, `<unk>`).
- Encoder (`fisheropt.workloads.esimcse_encoder`, {n_params // 1000}k parameters, float32): token + position
  embeddings (d={cfg["dim"]}), dropout p={cfg["dropout"]}, mean pooling, linear projection to {cfg["out_dim"]}.
- Loss: InfoNCE, cosine similarity, τ={TEMPERATURE}, in-batch negatives (batch {cfg["batch"]}).
  - SimCSE: positive = the same sentence under a second dropout mask.
  - ESimCSE: positive = word repetition (dup_rate {DUP_RATE}) of the sentence, both views with dropout;
    plus a queue of the last {default_queue_size(cfg["batch"])} momentum-encoder embeddings
    (λ={MOMENTUM}, dropout off in the momentum encoder) as extra negatives. Batches are drawn epoch by
    epoch without replacement; queue rows that hold a sentence of the current batch (from an earlier
    step of a small corpus — impossible in the paper's single pass over 10⁶ sentences) are dropped
    from the step's negatives: for its own anchor such a row is a false negative. \
The ablation "ESimCSE, unmasked queue" keeps them, to show what they do.
- Optimizers: Adam, FAdam ({FADAM_EXTRA}), Coupled Adam (token embedding E coupled); all with
  lr={HYPER["lr"]}, betas={HYPER["betas"]}, eps={HYPER["eps"]}, weight decay 0 (set once, not tuned per
  optimizer or method); {cfg["steps"]} steps; seeds {seeds}; same initialisation, batches and dropout stream
  per seed. Backend(s): {", ".join(sorted(backends))}.
- Held-out measures (no dropout). There are no STS labels offline, so:
  - **topic AUC** (semantic-similarity stand-in): over all held-out pairs, the ROC AUC of the cosine
    for "same `help()` topic" vs "different topic"; **topic 1-NN**: the nearest training sentence
    comes from the same topic.
  - **neg gap ≤3−>3**: the paper's split applied to random held-out pairs (different sentences):
    mean cosine of pairs with |ΔL| ≤ 3 minus pairs with |ΔL| > 3. A length-blind encoder gives ≈ 0;
    positive = same-length sentences look more alike. corr(cos, len diff) is the Pearson correlation
    of the cosine with |ΔL| over the same pairs (negative = length bias).
  - **pos gap ≤3−>3**: the same split for positive probes (sentence vs itself minus k = 1..6 random
    words; |ΔL| = k). Part of this gap is content loss, not length: compare it across methods only.
  - **length R²**: how well a ridge regression on the unit embedding predicts the word count
    (fit on {len(evaluator.probe_idx)} training sentences, scored on held-out).
  - Wang & Isola (2020): align = E‖f(x) − f(x⁺)‖² over the k ≤ 3 deletion probes, uniform =
    log E exp(−2‖f(x) − f(y)‖²) over held-out pairs (both lower = better).
  - Isotropy (`fisheropt.refimpl.isotropy`, as in the Coupled Adam experiment) of the token
    embeddings E (without `<pad>`/`<unk>`) and of the held-out sentence embeddings: Iso = min_u Z(u) /
    max_u Z(u), ‖μ‖/mean‖e_i‖, cond = σ_max/σ_min.
- Wall time: {elapsed():.1f} s. {common.environment_line()}.

## Results (mean over {len(seeds)} seed(s); the first row is the untrained encoder of seed {seeds[0]})

{table}
### Per seed

{common.markdown_table(per_seed, seed_cols, heads)}
## Verdict (computed from the runs)

Paired over the {len(seeds) * len(OPTIMIZERS)} (seed, optimizer) runs; "no clear difference" when the mean
difference is within twice its standard error.

{comp_table}
- Length bias under SimCSE: random same-length pairs are more similar (neg gap {
        common.fmt(v["neg_gap"]["simcse"])
    } > 0).
  {
        common.agreement(
            bias_trained,
            "SimCSE training raised the gap above the untrained encoder's (" + common.fmt(init_res["neg_gap"]) + ").",
            "the gap is inherited from the random initialisation (untrained encoder: "
            + common.fmt(init_res["neg_gap"])
            + ") and SimCSE training lowered it; "
            "in the paper the bias is attributed to SimCSE's same-length positives.",
        )
    }
- {
        common.agreement(
            bias_reduced,
            "ESimCSE lowers the ≤3 vs >3 similarity gap of random pairs.",
            "ESimCSE does not clearly lower the ≤3 vs >3 similarity gap of random pairs.",
        )
    }
- {
        common.agreement(
            r2_reduced,
            "less length information is linearly decodable from ESimCSE's embeddings.",
            "ESimCSE's embeddings do not encode length less than SimCSE's (length R² " + v["len_r2"]["call"] + ").",
        )
    }
- {
        common.agreement(
            sim_better,
            "ESimCSE separates the held-out topics better (our STS stand-in).",
            "ESimCSE does not improve the semantic stand-in (topic AUC: " + v["topic_auc"]["call"] + ").",
        )
    }
- Wang & Isola: ESimCSE's alignment is {v["align"]["call"]} and its uniformity {v["uniform"]["call"]} than SimCSE's.
{ablation_lines}- Coupled Adam − Adam, same method, paired over seeds (the Coupled Adam paper predicts more isotropic
  token embeddings, i.e. higher Iso(E) and lower ‖μ‖/‖e‖):
{coupled_lines}

Scale caveat: a {n_params // 1000}k-parameter bag-of-embeddings encoder trained from scratch on
~{len(train)} sentences, not a pre-trained BERT fine-tuned on 10⁶ Wikipedia sentences; topic
agreement is not STS. The encoder has no attention, so its length signals are the mean of the
position embeddings and the 1/n of mean pooling; hyperparameters were set once and not tuned
toward the paper's result.

## Files

{common.file_list(plots)}
- `metrics.json`: every number above, with the curves.
"""
    length_curves = {key: [{c: r[c] for c in ("neg_curve", "pos_curve")} for r in res] for key, res in finals.items()}
    metrics: dict[str, Any] = dict(config=cfg, hyper=HYPER, seeds=seeds, summary=summary_rows, untrained=init_res)
    metrics.update(per_seed=per_seed, verdict=v, curves=histories, length_curves=length_curves)
    text = common.text_table([init_row] + summary_rows, cols, heads)
    tables = dict(rows=summary_rows, per_seed=per_seed, verdict=v)
    return common.publish(out_dir, report, metrics, plots=plots, summary=text, **tables)
