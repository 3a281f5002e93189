"""fisheropt.torch.per_sample_grads / logit_jacobians / ParamLayout against plain autograd."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
# torch's forward-mode AD scripts its decompositions on first use (torch's own DeprecationWarning)
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")

import fisheropt.torch as fot  # noqa: E402
from fisheropt import fisher  # noqa: E402
from fisheropt.torch.per_sample import logit_statistics  # noqa: E402

nn = torch.nn


def mlp(dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.LayerNorm(7), nn.Linear(7, 3)).to(dtype)


class SeqModel(nn.Module):
    """A tiny causal-ish sequence model: logits (N, T, C)."""

    def __init__(self, vocab=6, dim=4, C=5):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.mix = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, C)

    def forward(self, ids):
        h = self.emb(ids)
        h = torch.tanh(self.mix(h.cumsum(1)))
        return self.out(h)


def loop_grads(model, x, y, params, loss_fn):
    rows = []
    for n in range(x.shape[0]):
        for p in params:
            p.grad = None
        loss_fn(model(x[n : n + 1]), y[n : n + 1]).backward()
        rows.append(torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params]))
    return torch.stack(rows)


def ce_sum(logits, y, ignore_index=-100):
    return nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), y.reshape(-1), ignore_index=ignore_index, reduction="sum"
    )


@pytest.mark.parametrize("chunk_size", [None, 1, 3])
def test_per_sample_grads_match_single_sample_backward(chunk_size):
    m = mlp()
    x, y = torch.randn(7, 5, dtype=torch.float64), torch.randint(0, 3, (7,))
    G, logits, layout = fot.per_sample_grads(m, x, y, chunk_size=chunk_size)
    ref = loop_grads(m, x, y, list(m.parameters()), ce_sum)
    assert G.shape == (7, layout.P) and G.dtype == torch.float64
    torch.testing.assert_close(G, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(logits, m(x).detach())


def test_per_sample_grads_subset_order_and_float32():
    m = mlp(torch.float32)
    params = [m[3].weight, m[0].bias]  # the given order, not the model's
    x, y = torch.randn(4, 5), torch.randint(0, 3, (4,))
    G, _, layout = fot.per_sample_grads(m, x, y, params=params)
    assert G.dtype == torch.float32 and layout.names == ["3.weight", "0.bias"] and layout.P == 21 + 7
    torch.testing.assert_close(G, loop_grads(m, x, y, params, ce_sum), rtol=1e-5, atol=1e-6)
    d = torch.arange(layout.P, dtype=torch.float32)
    views = layout.unflatten(d)
    assert [tuple(v.shape) for v in views] == [(3, 7), (7,)]
    torch.testing.assert_close(layout.flatten(views), d)


def test_sequence_model_sample_is_a_sequence_with_ignore_index():
    torch.manual_seed(1)
    m = SeqModel().double()
    ids = torch.randint(0, 6, (4, 5))
    y = torch.randint(0, 5, (4, 5))
    y[0, :2] = -100  # prompt tokens
    y[2, 3:] = -100  # padding
    G, logits, layout = fot.per_sample_grads(m, ids, y, chunk_size=3)
    ref = loop_grads(m, ids, y, list(m.parameters()), ce_sum)
    torch.testing.assert_close(G, ref, rtol=1e-12, atol=1e-12)
    assert logits.shape == (4, 5, 5)
    st = logit_statistics(logits, y)
    p = torch.softmax(logits.double(), -1)
    mask = (y != -100).double()
    r = p - nn.functional.one_hot(y.clamp(min=0), 5).double()
    torch.testing.assert_close(st.s, ((r**2).sum(-1) * mask).sum(1))


def test_logit_jacobians_match_autograd_and_give_G():
    m = mlp()
    x, y = torch.randn(3, 5, dtype=torch.float64), torch.randint(0, 3, (3,))
    J = fot.logit_jacobians(m, x, chunk_size=2)
    layout = fot.ParamLayout(m)
    theta = layout.get_flat()

    def f(flat):
        return torch.func.functional_call(m, layout.unflatten_dict(flat), (x,))

    ref = torch.autograd.functional.jacobian(f, theta)  # (N, C, P)
    torch.testing.assert_close(J, ref, rtol=1e-12, atol=1e-12)
    G = fot.per_sample_grads(m, x, y).G
    probs = torch.softmax(m(x), 1).detach().numpy()
    np.testing.assert_allclose(fisher.per_sample_grads(J.numpy(), probs, y.numpy()), G.numpy(), atol=1e-12)


# ---- bad input ------------------------------------------------------------------------
class TupleOut(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2)

    def forward(self, x):
        return self.lin(x), x


@pytest.mark.parametrize(
    "model, x, y, match",
    [
        (TupleOut(), torch.randn(4, 3), torch.zeros(4, dtype=torch.long), "logits tensor"),
        (nn.Linear(3, 1), torch.randn(4, 3), torch.zeros(4, dtype=torch.long), "C >= 2"),
        (
            nn.Sequential(nn.Linear(3, 2), nn.Flatten(0)),
            torch.randn(4, 3),
            torch.zeros(4, dtype=torch.long),
            "expected logits",
        ),
        (nn.Linear(3, 4), torch.randn(4, 3), torch.tensor([0, 1, 4, 2]), "0..3"),
        (nn.Linear(3, 4), torch.randn(4, 3), torch.tensor([0, -1, 2, 2]), "0..3"),
        (nn.Linear(3, 4), torch.randn(4, 3), torch.zeros(4), "integer class indices"),
        (nn.Linear(3, 4), torch.randn(4, 3), torch.zeros(5, dtype=torch.long), "shape"),
        (nn.Linear(3, 4), torch.randn(4, 3), torch.zeros(4, 2, dtype=torch.long), "targets"),
    ],
)
def test_bad_models_and_targets_are_refused(model, x, y, match):
    with pytest.raises((ValueError, TypeError), match=match):
        fot.per_sample_grads(model, x, y)


def test_params_must_belong_to_the_model_and_share_a_dtype():
    m = mlp()
    with pytest.raises(ValueError, match="not a parameter of the model"):
        fot.ParamLayout(m, [nn.Parameter(torch.zeros(3))])
    with pytest.raises(ValueError, match="listed twice"):
        fot.ParamLayout(m, [m[0].weight, m[0].weight])
    m[0].bias.data = m[0].bias.data.float()
    with pytest.raises(TypeError, match="mix dtypes"):
        fot.ParamLayout(m)


def test_batchnorm_in_training_mode_is_refused():
    m = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    x, y = torch.randn(5, 3), torch.zeros(5, dtype=torch.long)
    with pytest.raises(ValueError, match="BatchNorm"):
        fot.per_sample_grads(m, x, y)
    m.eval()
    assert fot.per_sample_grads(m, x, y).G.shape == (5, 4 * 3 + 4 + 8 + 8 + 2)
