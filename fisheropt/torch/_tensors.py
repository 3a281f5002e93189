"""Torch tensors as backend arrays: zero-copy views, and the checks that make them safe.

A fisheropt backend updates NumPy (CPU) or CuPy (CUDA) arrays in place. Here a
parameter, its gradient and its optimizer state become such arrays without a
copy: ``Tensor.numpy()`` on the CPU, DLPack (``cupy.from_dlpack``) on CUDA.
Everything the kernels could silently get wrong is refused here with a message
that names the parameter: dtypes NumPy cannot hold (bfloat16, float16), complex
and integer tensors, sparse layouts, devices other than CPU and CUDA, and
memory layouts that are not dense.

Dense layouts other than C order (``channels_last``, a transposed weight) are
handled: such a tensor is viewed in its memory order (its dimensions permuted so
that the view is C-contiguous), and its gradient and state in the same order. The
rules' elementwise updates and whole-tensor RMS do not depend on the order of
the elements; a tensor flagged by a rule's tensor flag (Coupled Adam's
``coupled``: rows are vocabulary items) must be C-contiguous.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any, NoReturn

import numpy as np
import numpy.typing as npt
import torch

#: torch dtype -> NumPy dtype of the parameters fisheropt can update.
SUPPORTED_DTYPES: dict[torch.dtype, np.dtype[Any]] = {
    torch.float32: np.dtype(np.float32),
    torch.float64: np.dtype(np.float64),
}
SUPPORTED_TEXT = "torch.float32 and torch.float64"
#: Where a tensor lives, as the optimizers key their backends: "cpu", or the CUDA device index.
DeviceKey = str | int | None


class UnsupportedTensor(TypeError):
    """A parameter or gradient fisheropt.torch cannot update (the message says why and what to do)."""


def device_key(t: torch.Tensor) -> DeviceKey:
    """'cpu', or the CUDA device index (an int)."""
    dev = t.device
    return "cpu" if dev.type == "cpu" else dev.index


def check_param(p: object, label: str) -> None:
    """Refuse a parameter tensor the kernels cannot update in place."""
    if not isinstance(p, torch.Tensor):
        raise TypeError(
            f"{label} is a {type(p).__module__}.{type(p).__name__}; fisheropt.torch optimizes "
            "torch Tensors (for NumPy arrays use fisheropt.<Optimizer>)"
        )
    if p.layout != torch.strided:
        raise UnsupportedTensor(f"{label} has layout {p.layout}; only dense (strided) parameters are supported")
    if p.device.type not in ("cpu", "cuda"):
        raise UnsupportedTensor(
            f"{label} is on device {p.device}; fisheropt.torch runs on CPU tensors (NumPy "
            "views, numba or numpy backend) and CUDA tensors (cupy backend) only"
        )
    if p.is_complex():
        raise UnsupportedTensor(
            f"{label} is complex ({p.dtype}); complex parameters are not supported (supported dtypes: {SUPPORTED_TEXT})"
        )
    if p.dtype not in SUPPORTED_DTYPES:
        hint = ""
        if p.dtype in (torch.bfloat16, torch.float16):
            hint = (
                " NumPy, whose arrays the CPU kernels update in place, has no bfloat16, and the kernels "
                "compute in the parameter dtype, so half-precision parameters are not supported: keep "
                "float32 master weights and use torch.autocast for bf16/fp16 compute."
            )
        raise UnsupportedTensor(
            f"{label} has dtype {p.dtype}; fisheropt.torch supports {SUPPORTED_TEXT} parameters only.{hint}"
        )
    if p.is_meta:
        raise UnsupportedTensor(f"{label} is a meta tensor (no data); materialize the model first")
    memory_order(p, label)  # raises for a layout with gaps or overlaps


def memory_order(t: torch.Tensor, label: str) -> tuple[int, ...] | None:
    """None when ``t`` is C-contiguous; else the permutation of its dimensions that lists them
    from the largest stride to the smallest, under which it is C-contiguous (channels_last,
    a transposed matrix). Refuses tensors whose elements are not one dense block."""
    if t.is_contiguous():
        return None
    order = tuple(sorted(range(t.dim()), key=lambda d: (-t.stride(d), -t.size(d))))
    if t.permute(order).is_contiguous():
        return order
    raise UnsupportedTensor(
        f"{label} is not a dense tensor (shape {tuple(t.shape)}, strides {tuple(t.stride())}: a slice or an "
        "expanded view with gaps or overlaps between its elements); the kernels update one contiguous "
        "block of memory. Make it a parameter of its own (e.g. nn.Parameter(t.contiguous()))."
    )


def host_view(t: torch.Tensor, order: tuple[int, ...] | None) -> npt.NDArray[Any]:
    """The NumPy array on ``t``'s memory (no copy), in memory order when ``order`` is given."""
    return _detached(t, order).numpy()


def _detached(t: torch.Tensor, order: tuple[int, ...] | None) -> torch.Tensor:
    """``t`` detached, its dimensions permuted to ``order`` when given (a view: no copy)."""
    t = t.detach()
    return t if order is None else t.permute(order)


def cupy_views(
    backend: ModuleType, tensors: Sequence[torch.Tensor], order_of: Callable[[int], tuple[int, ...] | None]
) -> list[Any]:
    """CuPy arrays on the memory of CUDA ``tensors`` (DLPack, no copy; see backends/cupy/optim.py)."""
    prepared = [_detached(t, order_of(i)) for i, t in enumerate(tensors)]
    return backend.from_dlpack_list(prepared)


def explain_bad_grad(g: object, p: torch.Tensor, label: str) -> NoReturn:
    """Raise the error that says why ``g`` cannot be the gradient of ``p`` (``label``)."""
    if not isinstance(g, torch.Tensor):
        raise TypeError(f"{label}.grad is a {type(g).__name__}, not a Tensor")
    if g.layout != torch.strided:
        raise UnsupportedTensor(
            f"{label} has a sparse gradient ({g.layout}); sparse gradients are not supported "
            "(for nn.Embedding use sparse=False)"
        )
    if g.device != p.device:
        raise UnsupportedTensor(f"{label} is on {p.device} but its gradient is on {g.device}")
    if g.dtype != p.dtype:
        raise UnsupportedTensor(f"{label} has dtype {p.dtype} but its gradient has dtype {g.dtype}; they must match")
    if tuple(g.shape) != tuple(p.shape):
        raise ValueError(f"{label} has shape {tuple(p.shape)} but its gradient has shape {tuple(g.shape)}")
    raise ValueError(f"{label}: its gradient cannot be read (shape {tuple(g.shape)}, strides {tuple(g.stride())})")


def grad_tensor(g: object, p: torch.Tensor, label: str, order: tuple[int, ...] | None) -> torch.Tensor:
    """``g`` as a tensor laid out like the parameter's view (memory order), detached; a
    contiguous copy only when autograd produced another layout (gradients are read, never
    written, so a copy changes nothing but speed)."""
    if (
        not isinstance(g, torch.Tensor)
        or g.layout != torch.strided
        or g.device != p.device
        or g.dtype != p.dtype
        or g.shape != p.shape
    ):
        explain_bad_grad(g, p, label)
    g = g.detach()
    if g.is_neg():
        g = g.resolve_neg()
    if order is not None:
        g = g.permute(order)
    if not g.is_contiguous():
        g = g.contiguous()
    return g


def from_numpy(a: npt.NDArray[Any]) -> torch.Tensor:
    """``torch.from_numpy``, annotated (torch's is not): a tensor on ``a``'s memory, no copy."""
    return torch.from_numpy(a)


def row_sq_norms(X: torch.Tensor) -> torch.Tensor:
    """The squared norm of each row of a 2-D tensor, as float64 (norms computed in ``X``'s dtype)."""
    norms: torch.Tensor = torch.linalg.vector_norm(X, dim=1)
    return norms.to(torch.float64).square()
