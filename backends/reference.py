"""The "numpy" backend: the reference implementation itself, always available.

It exists so that the reference and the fused backends are reached through
one registry with one interface; its functions are fisheropt.refimpl's: every
rule's ``<rule>_step`` (from the registry), the Fisher directions and ESimCSE's
momentum update.
"""

import numpy as np

from fisheropt.refimpl import RULES, all_finite  # noqa: F401  (the pre-step check)
from fisheropt.refimpl.coupled_adam import coupled_adam_apply, coupled_adam_partials  # noqa: F401  (sharded steps)
from fisheropt.refimpl.esimcse_momentum import ema_update  # noqa: F401  (ESimCSE momentum encoder)
from fisheropt.refimpl.fadam import fadam_apply, fadam_partials  # noqa: F401  (sharded steps)
from fisheropt.refimpl.fisher_ngd import fisher_gram, fisher_sample_space_direction  # noqa: F401  (Fisher directions)

NAME = "numpy"
array_module = np

globals().update({rule.step_function: rule.step for rule in RULES.values()})


def owns(array) -> bool:
    return isinstance(array, np.ndarray)
