"""Param groups for Coupled Adam, built from a model instead of by hand."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from .per_sample import check_module

__all__ = ["coupled_param_groups", "embedding_parameters"]


def embedding_parameters(
    model: nn.Module,
    *,
    extra: Iterable[torch.Tensor | nn.Module] = (),
    exclude: Iterable[torch.Tensor | nn.Module] = (),
) -> list[torch.Tensor]:
    """The vocabulary matrices of ``model``: the weight of every ``nn.Embedding`` and
    ``nn.EmbeddingBag`` (a tied output projection *is* that weight, so it is covered),
    plus ``extra`` (parameters or modules with a ``weight``, e.g. an untied output layer),
    minus ``exclude`` (e.g. positional embeddings written as ``nn.Embedding``)."""

    def weights(items: Iterable[object], what: str) -> list[torch.Tensor]:
        out: list[torch.Tensor] = []
        for x in items:
            if isinstance(x, nn.Module):
                w = getattr(x, "weight", None)
                if not isinstance(w, torch.Tensor):
                    raise TypeError(f"{what}: module {type(x).__name__} has no weight tensor")
                out.append(w)
            elif isinstance(x, torch.Tensor):
                out.append(x)
            else:
                raise TypeError(f"{what} must hold parameters or modules, got {type(x).__name__}")
        return out

    skip = {id(w) for w in weights(exclude, "exclude")}
    found: list[torch.Tensor] = []
    seen: set[int] = set()
    for module in model.modules():
        if isinstance(module, (nn.Embedding, nn.EmbeddingBag)):
            if module.sparse and id(module.weight) not in skip:
                raise ValueError(
                    f"{type(module).__name__} with sparse=True produces sparse gradients, which "
                    "fisheropt.torch does not support; use sparse=False"
                )
            candidates = [module.weight]
        else:
            continue
        for w in candidates:
            if id(w) not in skip and id(w) not in seen:
                seen.add(id(w))
                found.append(w)
    for w in weights(extra, "extra"):
        if id(w) not in skip and id(w) not in seen:
            seen.add(id(w))
            found.append(w)
    return found


def coupled_param_groups(
    model: nn.Module,
    *,
    extra: Iterable[torch.Tensor | nn.Module] = (),
    exclude: Iterable[torch.Tensor | nn.Module] = (),
    named: bool = True,
    **options: Any,
) -> list[dict[str, Any]]:
    """Param groups for :class:`fisheropt.torch.CoupledAdam`: ``[{"params": <embeddings>,
    "coupled": True, **options}, {"params": <everything else>, "coupled": False, **options}]``.

    The embeddings are :func:`embedding_parameters` (every ``nn.Embedding`` weight, hence
    a tied output projection too; ``extra`` adds, ``exclude`` removes). Every parameter of
    ``model`` appears once (``model.named_parameters()``, tied weights once), in model order.
    With ``named`` the groups carry the parameter names (``param_names``), which error
    messages and ``load_state_dict`` use. A coupled tensor must be 2-D with rows = vocabulary.

    >>> opt = fisheropt.torch.CoupledAdam(coupled_param_groups(model, weight_decay=0.1), lr=3e-4)
    """
    check_module(model)
    if "params" in options or "coupled" in options:
        raise TypeError(
            "options are group hyperparameters (lr, weight_decay, ...); 'params' and 'coupled' are set here"
        )
    flagged = {id(w) for w in embedding_parameters(model, extra=extra, exclude=exclude)}
    if not flagged:
        raise ValueError(
            "the model has no nn.Embedding (nor extra parameters to couple); Coupled Adam without a "
            "coupled tensor is AdamW. Pass the vocabulary matrices with extra=[...]"
        )
    named_params = list(model.named_parameters())
    present = {id(p) for _, p in named_params}
    missing = flagged - present
    if missing:
        raise ValueError("extra holds a tensor that is not a parameter of the model")
    for name, p in named_params:
        if id(p) in flagged and p.dim() != 2:
            raise ValueError(
                f"{name} has shape {tuple(p.shape)}; a coupled tensor must be 2-D (V×d, rows = vocabulary)"
            )

    def item(n: str, p: nn.Parameter) -> tuple[str, nn.Parameter] | nn.Parameter:
        return (n, p) if named else p

    coupled = [item(n, p) for n, p in named_params if id(p) in flagged]
    rest = [item(n, p) for n, p in named_params if id(p) not in flagged]
    groups: list[dict[str, Any]] = [{"params": coupled, "coupled": True, **options}]
    if rest:
        groups.append({"params": rest, "coupled": False, **options})
    return groups
