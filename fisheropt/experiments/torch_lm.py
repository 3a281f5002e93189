"""PyTorch: a tied-embedding transformer LM trained with torch AdamW and fisheropt.torch AdamW, FAdam, Coupled Adam.

Shows fisheropt as a drop-in ``torch.optim.Optimizer`` on a real PyTorch model, and
checks on a transformer the Coupled Adam paper's claim (Stollenwerk & Stollenwerk,
2025): with a tied embedding, Adam's per-element second moment pushes all embeddings
along a common direction; sharing the second moment across the vocabulary
(Coupled Adam) gives far more isotropic embeddings at equal or better loss.

Setup (offline): the word-level English corpus of CPython's ``help()`` topics
(:func:`fisheropt.workloads.word_lm.load_pydoc_corpus`, as in the coupled-adam
experiment); a GPT-style pre-LayerNorm transformer whose output projection is the
token embedding (:class:`TransformerLM`); the same initialisation, batch order,
warm-up + cosine schedule (``torch.optim.lr_scheduler.LambdaLR``) and
hyperparameters for every optimizer and seed. ``torch.optim.AdamW(fused=True)``
and ``fisheropt.torch.AdamW`` run the same update rule: their curves should agree
to float32 rounding, a check of the adapter.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np

from . import _common as common
from .coupled_adam import (
    EMBEDDING_FILES,
    EMBEDDING_PLOTS,
    HEADS,
    METRICS,
    claim_lines,
    final_values,
    isotropy_claim,
    new_history,
    publish_claim,
    record_evaluation,
    run_key,
    save_embeddings,
)

TITLE = "PyTorch: tied-embedding transformer LM with torch AdamW and fisheropt.torch optimizers"

# threads: torch's and numba's during the run (the matrices are small; more threads only spin)
FULL = dict(
    vocab=2000,
    dim=64,
    layers=2,
    heads=4,
    context=32,
    batch=32,
    steps=800,
    warmup=50,
    evals=10,
    n_seeds=3,
    n_val=256,
    threads=1,
)
QUICK = dict(
    FULL, vocab=300, dim=32, layers=1, heads=2, context=16, batch=16, steps=60, warmup=5, evals=3, n_seeds=2, n_val=48
)
HYPER = dict(lr=2e-3, betas=(0.9, 0.95), weight_decay=0.1)
OPTIMIZERS = ("torch AdamW", "fot AdamW", "fot FAdam", "fot CoupledAdam")


def _torch():
    return common.import_torch("torch-lm")


def transformer_lm_class():
    """The model class (defined lazily so that importing this module needs no torch)."""
    torch = _torch()
    nn = torch.nn
    F = nn.functional

    class Block(nn.Module):
        def __init__(self, d, heads):
            super().__init__()
            self.heads = heads
            self.ln1 = nn.LayerNorm(d)
            self.qkv = nn.Linear(d, 3 * d)
            self.proj = nn.Linear(d, d)
            self.ln2 = nn.LayerNorm(d)
            self.fc = nn.Linear(d, 4 * d)
            self.out = nn.Linear(4 * d, d)

        def forward(self, x):
            B, T, D = x.shape
            q, k, v = self.qkv(self.ln1(x)).split(D, dim=2)
            q, k, v = (t.view(B, T, self.heads, D // self.heads).transpose(1, 2) for t in (q, k, v))
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = x + self.proj(y.transpose(1, 2).reshape(B, T, D))
            return x + self.out(F.gelu(self.fc(self.ln2(x))))

    class TransformerLM(nn.Module):
        """GPT-style LM: token embedding ``tok`` (V×d) tied to the output projection, learned
        positions (a plain parameter, so that only the vocabulary matrix is an nn.Embedding),
        pre-LayerNorm blocks, final LayerNorm. Weights N(0, 0.02²), biases 0."""

        def __init__(self, vocab, dim, layers, heads, context):
            super().__init__()
            self.context = context
            self.tok = nn.Embedding(vocab, dim)
            self.pos = nn.Parameter(torch.zeros(context, dim))
            self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(layers))
            self.ln_f = nn.LayerNorm(dim)
            self.head = nn.Linear(dim, vocab, bias=False)
            self.head.weight = self.tok.weight
            for name, p in self.named_parameters():
                if p.dim() >= 2:
                    nn.init.normal_(p, 0.0, 0.02)
                elif not name.endswith(".weight"):  # biases (LayerNorm weights stay 1)
                    nn.init.zeros_(p)

        def forward(self, ids):
            x = self.tok(ids) + self.pos[: ids.shape[1]]
            for block in self.blocks:
                x = block(x)
            return self.head(self.ln_f(x))

        def loss(self, ids, targets):
            logits = self(ids)
            return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))

    return TransformerLM


def build_model(cfg, seed):
    torch = _torch()
    torch.manual_seed(seed)
    return transformer_lm_class()(cfg["vocab"], cfg["dim"], cfg["layers"], cfg["heads"], cfg["context"])


def load_data(cfg):
    """(train ids, val windows (ids, targets), vocab size, counts) as torch tensors."""
    torch = _torch()
    from fisheropt.workloads.word_lm import load_pydoc_corpus

    train_ids, val_ids, vocab, counts = load_pydoc_corpus(vocab_size=cfg["vocab"])
    T = cfg["context"]
    starts = np.linspace(0, val_ids.size - T - 1, cfg["n_val"]).astype(np.int64)
    val = np.stack([val_ids[s : s + T + 1] for s in starts])
    return (
        torch.from_numpy(train_ids),
        (torch.from_numpy(val[:, :-1]), torch.from_numpy(val[:, 1:])),
        len(vocab),
        counts,
    )


def batch_at(train, cfg, rng):
    torch = _torch()
    T = cfg["context"]
    starts = rng.integers(0, train.numel() - T - 1, size=cfg["batch"])
    idx = torch.from_numpy(starts[:, None] + np.arange(T + 1)[None, :])
    chunk = train[idx]
    return chunk[:, :-1], chunk[:, 1:]


def make_optimizer(name, model, hyper=HYPER):
    torch = _torch()
    import fisheropt.torch as fot

    if name == "torch AdamW":
        return torch.optim.AdamW(model.parameters(), fused=True, **hyper)
    if name == "fot AdamW":
        return fot.AdamW(model.parameters(), **hyper)
    if name == "fot FAdam":
        return fot.FAdam(model.parameters(), **hyper)
    if name == "fot CoupledAdam":
        return fot.CoupledAdam(fot.coupled_param_groups(model, named=False), **hyper)
    raise ValueError(f"unknown optimizer {name!r}")


def schedule(cfg):
    """Linear warm-up, then cosine decay to 10 % (a LambdaLR factor)."""
    warm, total = cfg["warmup"], cfg["steps"]

    def factor(k):
        if k < warm:
            return (k + 1) / warm
        frac = (k - warm) / max(1, total - warm)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, frac)))

    return factor


def train_one(name, cfg, seed, data, *, desc=None):
    """Train one model; returns (final embedding (V×d, float64), history, timings)."""
    torch = _torch()
    train, (val_x, val_y), _, _ = data
    model = build_model(cfg, seed)
    opt = make_optimizer(name, model)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule(cfg))
    rng = np.random.default_rng([seed, 11])  # batch order: the same for every optimizer
    eval_at = common.evaluation_steps(cfg["steps"], cfg["evals"])
    hist = new_history()
    run_loss, opt_times, step_times = [], [], []
    for step in common.progress(range(cfg["steps"] + 1), desc=desc):
        if step in eval_at:
            with torch.no_grad():
                model.eval()
                val = float(model.loss(val_x, val_y))
                model.train()
            record_evaluation(hist, step, run_loss, val, model.tok.weight.detach().double().numpy())
            run_loss = []
        if step == cfg["steps"]:
            break
        x, y = batch_at(train, cfg, rng)
        t0 = time.perf_counter()
        loss = model.loss(x, y)
        loss.backward()
        t1 = time.perf_counter()
        opt.step()
        t2 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        sched.step()
        run_loss.append(float(loss.detach()))
        opt_times.append(t2 - t1)
        step_times.append(t2 - t0)
    skip = min(3, len(opt_times) - 1)  # first steps: kernel loading, allocation
    timings = {"opt_ms": 1e3 * float(np.median(opt_times[skip:])), "step_ms": 1e3 * float(np.median(step_times[skip:]))}
    backend = getattr(opt, "backends", {}).get("cpu", "torch (fused)")
    return model.tok.weight.detach().double().numpy().copy(), hist, timings, backend


def run(*, quick: bool, out_dir: Path, seed: int = 0) -> dict:
    torch = _torch()
    cfg = dict(QUICK if quick else FULL)
    # The same number of threads for torch's and fisheropt's kernels (numba), so that step times compare
    # like with like; the matrices are small, and on a busy machine idle threads only get in the way.
    with common.torch_threads(cfg["threads"], numba=True):
        return _run(torch, cfg, quick=quick, out_dir=out_dir, seed=seed)


def _run(torch, cfg, *, quick: bool, out_dir: Path, seed: int) -> dict:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    data = load_data(cfg)
    train, (val_x, _), vocab_size, counts = data
    cfg["vocab"] = vocab_size
    seeds = [seed + i for i in range(cfg["n_seeds"])]
    n_params = sum(p.numel() for p in build_model(cfg, 0).parameters())

    per_seed, histories, final_E, backends = [], {}, {}, {}
    with common.stopwatch() as elapsed:
        for s in seeds:
            for name in OPTIMIZERS:
                E, hist, timings, backend = train_one(name, cfg, s, data, desc=f"{name} seed {s}")
                backends[name] = backend
                histories[(name, s)] = hist
                final_E[run_key(name, s)] = E
                per_seed.append({"optimizer": name, "seed": s, **final_values(hist), **timings})
    save_embeddings(out_dir, final_E, counts)

    summary_rows = [
        {
            "optimizer": name,
            "backend": backends[name],
            **common.mean_std_columns([r for r in per_seed if r["optimizer"] == name], (*METRICS, "opt_ms", "step_ms")),
        }
        for name in OPTIMIZERS
    ]
    by = {r["optimizer"]: r for r in summary_rows}

    # ---- plots -------------------------------------------------------------
    plots = common.plot_seed_curves(out_dir, histories, OPTIMIZERS, seeds, EMBEDDING_PLOTS)
    plots.append(
        common.plot_bars(
            out_dir / "step_time.png",
            list(OPTIMIZERS),
            [by[n]["opt_ms"] for n in OPTIMIZERS],
            [by[n]["opt_ms_std"] for n in OPTIMIZERS],
            title="optimizer step time (median per run, mean ± std over seeds)",
            ylabel="ms",
        )
    )

    # ---- verdict (computed, not assumed) ----------------------------------
    claim = isotropy_claim(per_seed, seeds, by, base="fot AdamW", coupled="fot CoupledAdam")
    a, c = by["fot AdamW"], by["fot CoupledAdam"]
    loss_cmp = claim["val_loss_diff_coupled_minus_adamw"]
    fot_adamw, torch_adamw = (common.seed_values(per_seed, seeds, "val_loss", optimizer=n) for n in OPTIMIZERS[1::-1])
    adapter_gap = max(abs(x - y) for x, y in zip(fot_adamw, torch_adamw))
    verdict = {**claim, "max_val_loss_gap_fot_vs_torch_adamw": adapter_gap}

    if quick:
        iso_line = mu_line = loss_line = f"{common.INCONCLUSIVE}: quick mode is a smoke test ({cfg['steps']} steps)."
    else:
        iso_line, mu_line, loss_line = claim_lines(claim)

    cols = ["optimizer", "backend", *common.with_std(METRICS[:2], METRICS[:2]), *METRICS[3:], "opt_ms", "step_ms"]
    seed_cols = ["optimizer", "seed", "train_loss", "val_loss", "isotropy", *METRICS[3:], "opt_ms", "step_ms"]
    heads = {**HEADS, "opt_ms": "opt.step ms", "step_ms": "train step ms"}
    passes = cfg["steps"] * cfg["batch"] * cfg["context"] / train.numel()
    report = f"""{common.report_title(TITLE, quick)}

The switch from PyTorch is three lines:

```python
import fisheropt.torch as fot
opt = fot.AdamW(model.parameters(), lr=..., weight_decay=...)     # was torch.optim.AdamW(...)
opt = fot.CoupledAdam(fot.coupled_param_groups(model), lr=...)     # Coupled Adam: embeddings flagged
```

Claim (Stollenwerk & Stollenwerk 2025): with a tied embedding, Adam's per-element second moment
drives all embeddings along a common direction (large ‖μ‖, low isotropy); Coupled Adam yields far
more isotropic embeddings at equal or better loss. Here on a transformer, in PyTorch.

## Setup

- Corpus: `pydoc_data.topics` (CPython's `help()` text), lower-cased `[a-z]+` words, {train.numel()} training
  tokens, vocabulary {vocab_size} (incl. `<unk>`); validation loss on {val_x.shape[0]} fixed windows of
  {cfg["context"]} tokens from the held-out last 10 %.
- Model: GPT-style pre-LayerNorm transformer, {cfg["layers"]} layer(s), d={cfg["dim"]}, {cfg["heads"]} heads,
  context {cfg["context"]}, output projection tied to the token embedding E ({n_params} parameters, float32).
- Training: {cfg["steps"]} steps of {cfg["batch"]} windows ({passes:.1f}
  passes over the training tokens: compare train and validation loss for overfitting), \
warm-up {cfg["warmup"]} steps then cosine to 10 %
  (`LambdaLR`), seeds {seeds}; every optimizer lr={HYPER["lr"]}, betas={HYPER["betas"]},
  weight_decay={HYPER["weight_decay"]}, other hyperparameters at their defaults (FAdam: eps2, clip, p;
  its weight decay is Fisher-preconditioned). Coupled Adam: `fot.coupled_param_groups(model)` (E coupled).
  Backends: {", ".join(f"{k}: {v}" for k, v in backends.items())}; torch {torch.__version__};
  {torch.get_num_threads()} thread(s) for torch and for numba.
- Measures of the final E (`fisheropt.refimpl.isotropy`): Iso(E), ‖μ‖/mean‖e_i‖, cond(E), as in the
  coupled-adam experiment. Times: median per run of `opt.step()` and of forward + backward + step.
- Wall time: {elapsed():.1f} s. {common.environment_line()}.

## Results (mean over seeds)

{common.markdown_table(summary_rows, cols, heads)}
### Per seed

{common.markdown_table(per_seed, seed_cols, heads)}
## Verdict

- Adapter check: `fot.AdamW` and `torch.optim.AdamW(fused=True)` run the same rule; their final
  validation losses differ by at most {common.fmt(adapter_gap)} nats over the seeds (float32 rounding,
  amplified by training).
- Isotropy: Iso(E) {common.fmt(c["isotropy"])} (Coupled Adam) vs {common.fmt(a["isotropy"])} (AdamW); Coupled higher in
  {claim["isotropy_wins"]}/{len(seeds)} seeds; anisotropy 1 − Iso(E) Coupled/AdamW = \
{common.fmt(claim["anisotropy_ratio_coupled_over_adamw"])}.
  {iso_line}
- Mean embedding: ‖μ‖/mean‖e‖ {common.fmt(c["mu_ratio"])} (Coupled) vs {common.fmt(a["mu_ratio"])} (AdamW). {mu_line}
- Loss: validation loss Coupled − AdamW, paired by seed: {common.fmt(loss_cmp["mean"])} ± \
{common.fmt(loss_cmp["se"], 2)}
  (SE, n={loss_cmp["n"]}). {loss_line}
- FAdam: validation loss {common.fmt(by["fot FAdam"]["val_loss"])}, Iso(E) {common.fmt(by["fot FAdam"]["isotropy"])}
  (not part of the claim; same learning rate as AdamW, untuned).

A {n_params}-parameter model on a {train.numel()}-token corpus, not the paper's GPT-2-scale runs;
hyperparameters were set once and not tuned toward any result.

## Files

{common.file_list(plots)}
{EMBEDDING_FILES}
"""
    record = dict(config=cfg, hyper=HYPER, seeds=seeds, summary=summary_rows, per_seed=per_seed, verdict=verdict)
    text = common.text_table(summary_rows, cols, heads)
    return publish_claim(out_dir, report, record, histories=histories, plots=plots, summary=text, backends=backends)
