"""Data-parallel training of the tied-embedding transformer LM (fisheropt.experiments.torch_lm) with
fisheropt.torch.FAdam or CoupledAdam under DistributedDataParallel, optionally with the optimizer
state sharded by torch.distributed.optim.ZeroRedundancyOptimizer. spec/distributed.md.

CPU (gloo), 2 processes::

    torchrun --nproc-per-node 2 examples/torchrun_ddp_lm.py --optimizer fadam --steps 50

GPU (NCCL), one process per GPU::

    torchrun --nproc-per-node 8 examples/torchrun_ddp_lm.py --optimizer coupled_adam --device cuda

Every rank holds the whole model and DDP's averaged gradient, so every rank takes the single-process
step, bit for bit (tests/test_torch_distributed.py checks it); a NaN on one rank reaches all ranks
through the average and every rank refuses that step (FloatingPointError; skipped here).
FSDP2 (fully_shard, DTensor parameters) is not supported yet: FAdam and Coupled Adam need their
reductions completed across the shards (spec/distributed.md §5).
"""

import argparse
import os

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import fisheropt.torch as fot
from fisheropt.experiments.torch_lm import QUICK, build_model, load_data


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--optimizer", choices=("fadam", "coupled_adam", "adamw"), default="fadam")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--batch", type=int, default=16, help="sequences per rank")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--zero", action="store_true", help="shard the optimizer state (ZeroRedundancyOptimizer)")
    args = ap.parse_args()

    cuda = args.device.startswith("cuda")
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}") if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    torch.set_num_threads(1)

    cfg = dict(QUICK)
    train, (val_x, val_y), vocab, _ = load_data(cfg)
    cfg["vocab"] = vocab
    model = build_model(cfg, seed=0).to(device)  # the same initialisation on every rank
    ddp = DDP(model, device_ids=[device.index] if cuda else None)
    cls = {"fadam": fot.FAdam, "coupled_adam": fot.CoupledAdam, "adamw": fot.AdamW}[args.optimizer]
    hyper = dict(lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    params = (
        fot.coupled_param_groups(model, named=False) if args.optimizer == "coupled_adam" else list(model.parameters())
    )
    if args.zero:
        from torch.distributed.optim import ZeroRedundancyOptimizer

        opt = ZeroRedundancyOptimizer(params, optimizer_class=cls, **hyper)
    else:
        opt = cls(params, **hyper)

    T = cfg["context"]
    for step in range(args.steps):
        rng = np.random.default_rng([step, rank])  # each rank its own sequences
        starts = rng.integers(0, train.numel() - T - 1, size=args.batch)
        chunk = train[torch.from_numpy(starts[:, None] + np.arange(T + 1)[None, :])].to(device)
        logits = ddp(chunk[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, vocab), chunk[:, 1:].reshape(-1))
        loss.backward()
        try:
            opt.step()
        except FloatingPointError as exc:  # raised on every rank alike
            if rank == 0:
                print(f"step {step}: skipped ({exc})")
        opt.zero_grad(set_to_none=True)
        if rank == 0 and (step % 10 == 0 or step == args.steps - 1):
            with torch.no_grad():
                val = model.loss(val_x.to(device), val_y.to(device)).item()
            print(f"step {step:4d}  train loss {loss.item():.4f}  val loss {val:.4f}")
    # every rank holds the same parameters, bit for bit
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).to(torch.float64)
    digest = torch.tensor([float(flat.sum()), float((flat * flat).sum())], device=device, dtype=torch.float64)
    ref = digest.clone()
    dist.broadcast(ref, 0)
    assert torch.equal(digest, ref), "ranks diverged"
    if rank == 0:
        print(f"{world} ranks, {args.optimizer}{' + ZeRO' if args.zero else ''}: parameters identical on every rank")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
