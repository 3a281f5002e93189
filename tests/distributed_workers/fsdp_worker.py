"""One rank of tests/test_torch_fsdp.py: python fsdp_worker.py RANK WORLD PORT OUTDIR SCENARIOS.

fisheropt.torch optimizers on DTensor parameters (spec/distributed.md §5): FSDP2's fully_shard (training
with a NaN injected into one rank's gradient shard), distribute_tensor with Shard(1)/Shard(0) placements
and synthetic gradients, and DCP checkpoints (save on one world size, resume on another). Saves the
gathered (full) gradients, parameters and state for the test to replay in one process."""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("OMP_NUM_THREADS", "1")

import common  # noqa: E402
import torch  # noqa: E402
import torch.distributed.checkpoint as dcp  # noqa: E402
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict  # noqa: E402
from torch.distributed.fsdp import fully_shard  # noqa: E402
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor, init_device_mesh  # noqa: E402

import fisheropt.torch as fot  # noqa: E402
from fisheropt.torch import sharded  # noqa: E402

torch.set_num_threads(1)
RULES = sorted(fot.CLASSES)
CHECKPOINT_STEP = 5  # the DCP scenarios save after this many steps


def full(t):
    return t.full_tensor() if isinstance(t, DTensor) else t


def gathered(tensors):
    return common.flat([full(t.detach()) for t in tensors])


def state_of(opt, params):
    """Every state tensor, whole (DTensors gathered), flat in float64; and the replicated ones as stored."""
    whole, replicated = [], []
    for p in params:
        st = opt.state.get(p, {})
        for k in sorted(st):
            whole.append(full(st[k]).to(torch.float64).reshape(-1))
            if isinstance(st[k], DTensor) and all(isinstance(pl, Replicate) for pl in st[k].placements):
                replicated.append(st[k].to_local().clone())
    return torch.cat(whole), replicated


def fsdp_model(world):
    model = common.make_shard_model()
    fully_shard(model, mesh=init_device_mesh("cpu", (world,)))
    return model


def record(opt, params, **extra):
    state, replicated = state_of(opt, params)
    return {"param": gathered(params), "state": state, "replicated": replicated, **extra}


def run_fsdp(rank, world, out):
    """FSDP2 training, every rule, twice (bitwise across runs); a NaN in the last rank's shard at BAD_STEP."""
    res = {}
    for name in RULES:
        runs = []
        for _run in range(2):
            model = fsdp_model(world)
            params = list(model.parameters())
            opt = fot.CLASSES[name](common.param_groups(name, model), **common.HYPER[name])
            trace = []
            for step in range(common.STEPS):
                x, y = common.batch(step, world)
                sl = slice(rank * common.B, (rank + 1) * common.B)
                common.loss_of(model, x[sl], y[sl]).backward()
                if step == common.BAD_STEP and rank == world - 1:
                    model.emb.weight.grad.to_local()[0, 0] = float("nan")  # this rank's shard only
                before = gathered(params)
                grads = gathered([p.grad for p in params])
                try:
                    opt.step()
                    raised = None
                except FloatingPointError as exc:
                    raised = str(exc)
                trace.append(record(opt, params, grad=grads, before=before, raised=raised))
                opt.zero_grad()
            runs.append(trace)
        res[name] = runs
        res[name + "-placements"] = [(tuple(p.shape), tuple(p.to_local().shape)) for p in params]
    out["fsdp"] = res


SHAPES = [(13, 8), (5,), (2, 3)]  # Shard(1): 8 columns; Shard(0): 5 rows; Shard(0): 2 rows (one shard empty on 3)
PLACEMENTS = [Shard(1), Shard(0), Shard(0)]


def run_dtensor(rank, world, out):
    """distribute_tensor with Shard(1) and Shard(0), synthetic gradients (tensor 1 tiny on odd steps)."""
    mesh = init_device_mesh("cpu", (world,))
    res = {}
    for name in RULES:
        torch.manual_seed(1)
        whole = [torch.randn(s, dtype=torch.float64) for s in SHAPES]
        params = [torch.nn.Parameter(distribute_tensor(w, mesh, [pl])) for w, pl in zip(whole, PLACEMENTS)]
        groups = [{"params": params[:1], "coupled": True}, {"params": params[1:]}] if name == "coupled_adam" else params
        opt = fot.CLASSES[name](groups, **common.HYPER[name])
        trace = []
        for step in range(common.STEPS):
            for p, g in zip(params, common.synthetic_grads(step, SHAPES)):
                p.grad = distribute_tensor(g, mesh, p.placements)
            before = dict(sharded.STATS.__dict__)
            opt.step()
            sent = {k: v - before[k] for k, v in sharded.STATS.__dict__.items()}
            trace.append(record(opt, params, sent=sent))
        res[name] = trace
    out["dtensor"] = res


CKPT_RULES = ("adamw", "fadam", "coupled_adam")


def _train(model, opt, steps):
    params = list(model.parameters())
    shapes = [tuple(p.shape) for p in params]
    for step in steps:
        for p, g in zip(params, common.synthetic_grads(step, shapes)):
            p.grad = distribute_tensor(g, p.device_mesh, p.placements)
        opt.step()
        opt.zero_grad()


def _fresh(name, world):
    model = fsdp_model(world)
    return model, fot.CLASSES[name](common.param_groups(name, model), **common.HYPER[name])


def _resume(name, world, path):
    model, opt = _fresh(name, world)
    model_sd, optim_sd = get_state_dict(model, opt)
    dcp.load({"model": model_sd, "optim": optim_sd}, checkpoint_id=path)
    set_state_dict(model, opt, model_state_dict=model_sd, optim_state_dict=optim_sd)
    loaded = record(opt, list(model.parameters()))
    _train(model, opt, range(CHECKPOINT_STEP, common.STEPS))
    return loaded, record(opt, list(model.parameters()))


def run_save(rank, world, out):
    """Uninterrupted 10 steps; 5 steps, a DCP save, and (same world) a resume from it."""
    res = {}
    for name in CKPT_RULES:
        model, opt = _fresh(name, world)
        _train(model, opt, range(common.STEPS))
        uninterrupted = record(opt, list(model.parameters()))
        model, opt = _fresh(name, world)
        _train(model, opt, range(CHECKPOINT_STEP))
        path = os.path.join(os.environ["FISHEROPT_CKPT"], name)
        model_sd, optim_sd = get_state_dict(model, opt)
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=path)
        saved = record(opt, list(model.parameters()))
        loaded, resumed = _resume(name, world, path)
        res[name] = {"uninterrupted": uninterrupted, "saved": saved, "loaded": loaded, "resumed": resumed}
    out["save"] = res


def run_resume(rank, world, out):
    """Resume the checkpoints another world size saved (DCP reshards the DTensor state)."""
    out["resume"] = {
        name: _resume(name, world, os.path.join(os.environ["FISHEROPT_CKPT"], name)) for name in CKPT_RULES
    }


def run_timing(rank, world, out):
    """The extra collective alone: an ordered all-gather sum of n float64 (median of 30)."""
    group = torch.distributed.group.WORLD
    res = {}
    for n in (1, 3 * 148 + 1, 768 + 1):
        buf = torch.zeros(n, dtype=torch.float64)
        times = []
        for _ in range(30):
            torch.distributed.barrier()
            t0 = time.perf_counter()
            sharded._reduce(buf, group, ordered=True)
            times.append(time.perf_counter() - t0)
        res[n] = sorted(times)[len(times) // 2]
    out["timing"] = res


SCENARIOS = {"fsdp": run_fsdp, "dtensor": run_dtensor, "save": run_save, "resume": run_resume, "timing": run_timing}

if __name__ == "__main__":
    from launcher import run_worker

    run_worker(SCENARIOS)
