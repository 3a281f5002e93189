# CuPy ships no type information (a Cython extension) and is not installed where the type check
# usually runs: to the type checker every name of this module is Any (see [tool.pyright] in pyproject.toml).
from typing import Any

def __getattr__(name: str) -> Any: ...
