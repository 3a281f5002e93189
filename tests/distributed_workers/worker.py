"""One rank of tests/test_torch_distributed.py: python worker.py RANK WORLD PORT OUTDIR SCENARIOS.

Runs the comma-separated scenarios (ddp, zero, finite, ngd, natgrad) on a gloo group over localhost and
saves what the test compares to OUTDIR/rank{RANK}.pt (launcher.run_worker)."""

import os
import sys

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

torch.set_num_threads(1)


def run_ddp(rank, world, out):
    from torch.nn.parallel import DistributedDataParallel as DDP

    import fisheropt.torch as fot

    res = {}
    for name, cls in fot.CLASSES.items():
        model = common.make_model()
        ddp = DDP(model)
        params = list(model.parameters())
        opt = cls(common.param_groups(name, model), **common.HYPER[name])
        trace = []
        for step in range(common.STEPS):
            x, y = common.batch(step, world)
            sl = slice(rank * common.B, (rank + 1) * common.B)
            loss = common.loss_of(ddp, x[sl], y[sl])
            if step == common.BAD_STEP and rank == world - 1:
                loss = loss * float("nan")
            loss.backward()
            grads = common.flat([p.grad for p in params])
            before = common.flat(params)
            try:
                opt.step()
                raised = None
            except FloatingPointError as exc:
                raised = str(exc)
            trace.append(
                {
                    "grad": grads,
                    "raised": raised,
                    "before": before,
                    "param": common.flat(params),
                    "state": common.state_flat(opt, params),
                }
            )
            opt.zero_grad()
        res[name] = trace
    out["ddp"] = res


def run_zero(rank, world, out):
    from torch.distributed.optim import ZeroRedundancyOptimizer
    from torch.nn.parallel import DistributedDataParallel as DDP

    import fisheropt.torch as fot

    res = {}
    for name in ("fadam", "coupled_adam"):
        model = common.make_model()
        ddp = DDP(model)
        params = list(model.parameters())
        opt = ZeroRedundancyOptimizer(
            common.param_groups(name, model), optimizer_class=fot.CLASSES[name], **common.HYPER[name]
        )
        trace = []
        for step in range(common.STEPS):
            x, y = common.batch(step, world)
            sl = slice(rank * common.B, (rank + 1) * common.B)
            common.loss_of(ddp, x[sl], y[sl]).backward()
            grads = common.flat([p.grad for p in params])
            opt.step()
            trace.append({"grad": grads, "param": common.flat(params)})
            opt.zero_grad()
        owned = [p for g in opt.optim.param_groups for p in g["params"]]
        opt.consolidate_state_dict(to=0)
        full = opt.state_dict() if rank == 0 else None
        res[name] = {
            "trace": trace,
            "owned": [next(i for i, q in enumerate(params) if q is p) for p in owned],
            "inner": type(opt.optim).__name__,
            "state_dict": full,
        }
    out["zero"] = res


def run_finite(rank, world, out):
    from fisheropt.torch.distributed import all_finite

    good = [torch.ones(3), torch.zeros(2, 2)]
    bad = [torch.ones(3), torch.tensor([1.0, float("nan")]) if rank == world - 1 else torch.zeros(2)]
    out["finite"] = {"good": all_finite(good), "bad": all_finite(bad)}


def run_ngd(rank, world, out):
    from fisheropt.torch import distributed as fd

    res = {}
    configs = []
    for kind in ("ef", "ief", "sf", "exact"):
        for columns in ("balanced", "shard0"):
            for ordered in (False, True):
                configs.append((kind, columns, ordered, torch.float64, None))
    configs += [
        ("ief", "balanced", False, torch.float32, None),
        ("ef", "balanced", False, torch.float32, None),
        ("ief", "shard0", False, torch.float64, 1),
        ("sf", "balanced", False, torch.float64, 1),
    ]
    from fisheropt.refimpl.fisher_exact import fisher_factor
    from fisheropt.refimpl.fisher_sampled import sampled_grads

    for kind, columns, ordered, dtype, empty in configs:
        G, s, J, probs, labels, ls = common.fisher_problem(rank, world, empty_rank=empty, dtype=dtype)
        cols = fd.shard_columns(common.SHAPES, world) if columns == "shard0" else None
        kw = {}
        if kind == "ief":
            kw["s"] = s.to(dtype)
        if kind == "sf":
            kw["A"] = torch.from_numpy(sampled_grads(J.numpy(), probs.numpy(), ls.numpy(), dtype="float64"))
        if kind == "exact":
            kw["A"] = torch.from_numpy(fisher_factor(J.numpy(), probs.numpy()))
        stats = {}
        key = f"{kind}-{columns}-{'ordered' if ordered else 'allreduce'}-{str(dtype)[6:]}-empty{empty}"
        d = fd.ngd_direction(kind, G=G, damping=0.5, group=None, columns=cols, ordered=ordered, stats=stats, **kw)
        full = fd.gather_columns(d, common.P, columns=cols)
        res[key] = {"d": d, "full": full, "stats": stats}
    # a NaN in one rank's G: every rank raises, with the same message
    G, s, *_ = common.fisher_problem(rank, world)
    if rank == world - 1:
        G[0, 3] = float("nan")
    try:
        fd.ngd_direction("ief", G=G, s=s, damping=0.5)
        res["nan"] = None
    except ValueError as exc:
        res["nan"] = str(exc)
    # a damping too small for a singular Gram (duplicated samples on two ranks): raises on every rank
    G, s, *_ = common.fisher_problem(0, world)
    try:
        fd.ngd_direction("ief", G=G, s=s, damping=1e-300)
        res["tiny"] = None
    except ValueError as exc:
        res["tiny"] = type(exc).__name__
    out["ngd"] = res


def natgrad_problem(seed=3, per_rank=5, world=2):
    """A small float64 classifier and a global batch of per_rank·world samples (the same on every rank)."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).double()
    x = torch.randn(per_rank * world, 6, dtype=torch.float64)
    y = torch.randint(0, 3, (per_rank * world,))
    return model, x, y


def run_natgrad(rank, world, out):
    """fot.NaturalGradient with a process group: each rank steps on its own slice of the global batch."""
    import fisheropt.torch as fot

    res = {}
    for kind in ("ief", "ef"):
        model, x, y = natgrad_problem(world=world)
        opt = fot.NaturalGradient(
            model, kind=kind, lr=0.5, damping=1e-2, process_group=dist.group.WORLD, backend="numpy"
        )
        rows = slice(5 * rank, 5 * (rank + 1))
        losses = [float(opt.step(x[rows], y[rows])) for _ in range(3)]
        res[kind] = {"params": [p.detach().clone() for p in model.parameters()], "losses": losses}
    out["natgrad"] = res


SCENARIOS = {"ddp": run_ddp, "zero": run_zero, "finite": run_finite, "ngd": run_ngd, "natgrad": run_natgrad}

if __name__ == "__main__":
    from launcher import run_worker

    run_worker(SCENARIOS)
