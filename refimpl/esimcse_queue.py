r"""ESimCSE momentum-contrast queue (Wu et al., 2021, §3.2).

Spec: spec/esimcse.md. The queue holds the sentence embeddings of the last Q
sentences of the preceding mini-batches, as encoded by the momentum (EMA)
encoder; they serve as extra negatives in the InfoNCE loss. It is a FIFO: a
new batch is appended at the newest end and the oldest entries beyond Q are
dropped. Q defaults to 2.5 × batch size (the paper's best ratio; ``int()`` of it).

The current batch is enqueued *after* its loss is computed, so a sentence is
never its own negative within one step.
"""

from __future__ import annotations

import numpy as np

QUEUE_RATIO = 2.5


def default_queue_size(batch_size: int, ratio: float = QUEUE_RATIO) -> int:
    return int(ratio * batch_size)


class MomentumQueue:
    """A FIFO of at most ``size`` embeddings of dimension ``dim``.

    ``negatives()`` returns them oldest first as a (n, dim) array, n ≤ size.
    """

    def __init__(self, dim: int, size: int, dtype=np.float64):
        if dim <= 0 or size < 0:
            raise ValueError(f"need dim > 0 and size >= 0, got dim={dim}, size={size}")
        self.dim, self.size = int(dim), int(size)
        self._buf = np.zeros((0, self.dim), dtype=dtype)

    def __len__(self) -> int:
        return self._buf.shape[0]

    def enqueue(self, embeddings) -> None:
        """Append a batch (rows in order) at the newest end; drop the oldest beyond ``size``."""
        e = np.asarray(embeddings, dtype=self._buf.dtype)
        if e.ndim != 2 or e.shape[1] != self.dim:
            raise ValueError(f"expected shape (n, {self.dim}), got {e.shape}")
        buf = np.concatenate([self._buf, e], axis=0)
        self._buf = buf[buf.shape[0] - min(buf.shape[0], self.size) :].copy()

    def negatives(self) -> np.ndarray:
        """A copy of the queue, oldest first."""
        return self._buf.copy()

    def clear(self) -> None:
        self._buf = self._buf[:0]
