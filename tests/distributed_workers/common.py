"""What the distributed workers and tests/test_torch_distributed.py share: the model, the data,
the hyperparameters and the Fisher test problems (everything deterministic from seeds)."""

import math

import torch
from torch import nn

V, D, B, T = 13, 8, 4, 5  # vocabulary, width, samples per rank, tokens per sample
STEPS = 10
BAD_STEP = 4  # the step at which the last rank's gradient is NaN
HYPER = {
    "adam": dict(lr=1e-2),
    "adamw": dict(lr=1e-2),
    "fadam": dict(lr=1e-2),
    "coupled_adam": dict(lr=1e-2),
    "lion": dict(lr=1e-3),
}


class TinyLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(V, D)
        self.lin = nn.Linear(D, D)
        self.head = nn.Linear(D, V)

    def forward(self, x):
        return self.head(torch.tanh(self.lin(self.emb(x))))


def make_model():
    torch.manual_seed(0)
    return TinyLM().to(torch.float64)


def batch(step, world):
    """The global batch of ``step``: (world*B, T) inputs and targets; rank r takes rows r*B:(r+1)*B."""
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randint(0, V, (world * B, T), generator=g)
    y = torch.randint(0, V, (world * B, T), generator=g)
    return x, y


def loss_of(model, x, y):
    logits = model(x)
    return nn.functional.cross_entropy(logits.reshape(-1, V), y.reshape(-1))


def param_groups(name, model):
    import fisheropt.torch as fot

    if name == "coupled_adam":
        return fot.coupled_param_groups(model, named=False)
    return list(model.parameters())


def flat(tensors):
    return torch.cat([t.detach().reshape(-1).clone() for t in tensors])


def state_flat(opt, params):
    out = []
    for p in params:
        st = opt.state.get(p, {})
        for k in sorted(st):
            out.append(torch.as_tensor(st[k], dtype=torch.float64).reshape(-1))
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)


# ---- Fisher problems: rank r's local rows -------------------------------------------------------
SHAPES = [(9, 4), (5,), (3, 3)]  # P = 50: split 25/25 on 2 ranks, 17/17/16 on 3; Shard(0) uneven
P = sum(math.prod(s) for s in SHAPES)
C, K = 3, 2


def rows_of(rank, world, empty_rank=None):
    if rank == empty_rank:
        return 0
    return 2 + rank


def fisher_problem(rank, world, seed=0, empty_rank=None, dtype=torch.float64):
    """G_r, s_r, J_r, probs_r, labels_sampled_r of rank r (N_r rows)."""
    n = rows_of(rank, world, empty_rank)
    g = torch.Generator().manual_seed(7000 + 101 * seed + rank)
    J = torch.randn(n, C, P, generator=g, dtype=torch.float64)
    probs = torch.softmax(torch.randn(n, C, generator=g, dtype=torch.float64), dim=1)
    labels = torch.randint(0, C, (n,), generator=g)
    ls = (
        torch.multinomial(probs, K, replacement=True, generator=g).T.contiguous()
        if n
        else torch.zeros(K, 0, dtype=torch.int64)
    )
    r = probs.clone()
    r[torch.arange(n), labels] -= 1.0
    G = torch.einsum("ncp,nc->np", J, r)
    s = (r * r).sum(1)
    return G.to(dtype), s, J, probs, labels, ls


# ---- FSDP2 / DTensor (tests/test_torch_fsdp.py) ----------------------------------------------------
class ShardLM(TinyLM):
    """TinyLM and a (2,) gain: under Shard(0) on 3 ranks its shards hold 1, 1 and 0 elements (one empty);
    the other tensors split unevenly (13 rows: 5, 5, 3)."""

    def __init__(self):
        super().__init__()
        self.gain = nn.Parameter(torch.tensor([1.0, 0.0]))

    def forward(self, x):
        return super().forward(x) * self.gain[0] + self.gain[1]


def make_shard_model():
    torch.manual_seed(0)
    return ShardLM().to(torch.float64)


def synthetic_grads(step, shapes, dtype=torch.float64):
    """Full gradients of ``step``, the same on every rank and for every world size; tensor 1 is tiny
    on odd steps (RMS(g) < ε/ε₂: FAdam's guessed ε_t fails, the second collective runs)."""
    g = torch.Generator().manual_seed(5000 + step)
    grads = [torch.randn(s, generator=g, dtype=torch.float64).to(dtype) for s in shapes]
    if step % 2 and len(grads) > 1:
        grads[1] = grads[1] * 1e-12
    return grads
