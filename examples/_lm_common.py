"""What the torchrun examples share: arguments, process group and device, the data and the model of
fisheropt.experiments.torch_lm, the optimizer's parameter groups, each rank's sequences."""

import argparse
import os

import numpy as np
import torch
import torch.distributed as dist

import fisheropt.torch as fot
from fisheropt.experiments.torch_lm import QUICK, build_model, load_data

OPTIMIZERS = {"fadam": fot.FAdam, "coupled_adam": fot.CoupledAdam, "adamw": fot.AdamW}
HYPER = dict(betas=(0.9, 0.95), weight_decay=0.1)


def parser(description: str) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--optimizer", choices=tuple(OPTIMIZERS), default="fadam")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--batch", type=int, default=16, help="sequences per rank")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--device", default="cpu")
    return ap


def setup(device_name: str):
    """(rank, world, device) after init_process_group: NCCL for CUDA (one GPU per process), else gloo."""
    cuda = device_name.startswith("cuda")
    dist.init_process_group("nccl" if cuda else "gloo")
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}") if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    torch.set_num_threads(1)
    return dist.get_rank(), dist.get_world_size(), device


def data_and_model(device):
    """(config, train ids, (val ids, val targets), vocab, model): the same initialisation on every rank."""
    cfg = dict(QUICK)
    train, val, vocab, _ = load_data(cfg)
    cfg["vocab"] = vocab
    return cfg, train, val, vocab, build_model(cfg, seed=0).to(device)


def param_groups(optimizer: str, model):
    return fot.coupled_param_groups(model, named=False) if optimizer == "coupled_adam" else list(model.parameters())


def sequences(train, step, rank, batch, T, device):
    """This rank's ``batch`` windows of T + 1 tokens at ``step`` (each rank its own)."""
    rng = np.random.default_rng([step, rank])
    starts = rng.integers(0, train.numel() - T - 1, size=batch)
    return train[torch.from_numpy(starts[:, None] + np.arange(T + 1)[None, :])].to(device)


def step_or_skip(opt, step, rank) -> None:
    """opt.step(), or a line saying why not: a non-finite gradient raises on every rank alike."""
    try:
        opt.step()
    except FloatingPointError as exc:
        if rank == 0:
            print(f"step {step}: skipped ({exc})")
    opt.zero_grad(set_to_none=True)
