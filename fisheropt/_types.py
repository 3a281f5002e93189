"""Type aliases of fisheropt's annotations.

Real objects, not strings: the documentation's signatures are made from the evaluated
annotations, so an alias must exist at run time.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NoReturn

import numpy as np
import numpy.typing as npt

#: A float32 or float64 array: NumPy, or CuPy where the function says so (CuPy has no type stubs,
#: so a CuPy array is accepted wherever this is).
FloatArray = npt.NDArray[np.floating[Any]]
#: An array of integer class labels.
IntArray = npt.NDArray[np.integer[Any]]
#: A JAX pytree (arrays in any nesting of lists, tuples and dicts): what optax transforms.
PyTree = Any
#: A validated hyperparameter: a float, or a pair of floats such as ``betas``.
Hyperparameter = float | tuple[float, ...]


def missing_attribute(module: str) -> Callable[[str], Any]:
    """A module ``__getattr__`` that refuses every name, as Python does for a module without one.

    For a module that puts the registry's classes into its namespace at import (``fisheropt``,
    ``fisheropt.torch``): type checkers cannot see them, so the module declares
    ``__getattr__: Callable[[str], type[RuleOptimizer]] = missing_attribute(__name__)`` and they
    type those names by its return type."""

    def refuse(name: str) -> NoReturn:
        raise AttributeError(f"module {module!r} has no attribute {name!r}")

    return refuse
