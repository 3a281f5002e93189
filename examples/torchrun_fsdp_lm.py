"""FSDP2 training of the tied-embedding transformer LM (fisheropt.experiments.torch_lm) with
fisheropt.torch.FAdam or CoupledAdam: parameters, gradients and optimizer state sharded across ranks as
DTensors (torch.distributed.fsdp.fully_shard). spec/distributed.md §5.

CPU (gloo), 2 processes::

    torchrun --nproc-per-node 2 examples/torchrun_fsdp_lm.py --optimizer fadam --steps 50
    torchrun --nproc-per-node 2 examples/torchrun_fsdp_lm.py --quick          # 10 steps

GPU (NCCL), one process per GPU (the optimizer then runs the cupy backend on each rank's shards)::

    torchrun --nproc-per-node 8 examples/torchrun_fsdp_lm.py --optimizer coupled_adam --device cuda

Each rank updates only its own shards. What FAdam and Coupled Adam need from the whole tensors (FAdam's
three RMS values per tensor, Coupled Adam's column means over all vocabulary rows) is completed by one
grouped collective per step, which also carries every rank's finiteness flag: a NaN in one rank's
shard makes every rank refuse the step (FloatingPointError, nothing written; skipped here).
"""

import time

import torch
import torch.distributed as dist
from _lm_common import HYPER, OPTIMIZERS, data_and_model, param_groups, parser, sequences, setup, step_or_skip
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard


def main():
    ap = parser(__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="10 steps")
    args = ap.parse_args()
    steps = 10 if args.quick else args.steps
    rank, world, device = setup(args.device)
    cfg, train, (val_x, val_y), vocab, model = data_and_model(device)
    fully_shard(model, mesh=init_device_mesh(device.type, (world,)))  # parameters become DTensor shards
    opt = OPTIMIZERS[args.optimizer](param_groups(args.optimizer, model), **HYPER, lr=args.lr)
    if rank == 0:
        shards = [tuple(p.to_local().shape) for p in model.parameters()][:3]
        print(f"{world} ranks, {args.optimizer}: rank 0 holds shards {shards}, ...")

    T = cfg["context"]
    t0 = time.perf_counter()
    for step in range(steps):
        chunk = sequences(train, step, rank, args.batch, T, device)
        loss = model.loss(chunk[:, :-1], chunk[:, 1:])
        loss.backward()
        step_or_skip(opt, step, rank)
        if step % 10 == 0 or step == steps - 1:
            with torch.no_grad():  # every rank takes part in FSDP's forward
                val = model.loss(val_x.to(device), val_y.to(device)).item()
            if rank == 0:
                print(f"step {step:4d}  train loss {loss.item():.4f}  val loss {val:.4f}")
    if rank == 0:
        print(f"{steps} steps in {time.perf_counter() - t0:.1f} s")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
