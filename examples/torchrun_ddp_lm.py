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
For FSDP2 (fully_shard, DTensor parameters) see examples/torchrun_fsdp_lm.py.
"""

import torch
import torch.distributed as dist
from _lm_common import HYPER, OPTIMIZERS, data_and_model, param_groups, parser, sequences, setup, step_or_skip
from torch.nn.parallel import DistributedDataParallel as DDP


def main():
    ap = parser(__doc__.splitlines()[0])
    ap.add_argument("--zero", action="store_true", help="shard the optimizer state (ZeroRedundancyOptimizer)")
    args = ap.parse_args()
    rank, world, device = setup(args.device)
    cfg, train, (val_x, val_y), vocab, model = data_and_model(device)
    ddp = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    cls, params, hyper = OPTIMIZERS[args.optimizer], param_groups(args.optimizer, model), dict(HYPER, lr=args.lr)
    if args.zero:
        from torch.distributed.optim import ZeroRedundancyOptimizer

        opt = ZeroRedundancyOptimizer(params, optimizer_class=cls, **hyper)
    else:
        opt = cls(params, **hyper)

    T = cfg["context"]
    for step in range(args.steps):
        chunk = sequences(train, step, rank, args.batch, T, device)
        logits = ddp(chunk[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, vocab), chunk[:, 1:].reshape(-1))
        loss.backward()
        step_or_skip(opt, step, rank)
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
