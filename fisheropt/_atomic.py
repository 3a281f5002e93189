"""All-or-nothing sections: a Ctrl-C that arrives while a step writes waits until it is done.

A step writes many tensors. Every check and every allocation happens before the
first write (the backends' contract, backends/interface.py), so the one thing
left that can stop a step half-way is an asynchronous exception: Python raises
``KeyboardInterrupt`` from its SIGINT handler between any two bytecodes, for
instance between the NumPy reference's tensors. Inside :func:`deferred_interrupts`
SIGINT is only recorded; when the section ends the original handler is restored
and the signal re-raised, so the caller sees its ``KeyboardInterrupt`` right
after a step that completed everywhere (and whose step counter says so).

Signals are delivered to the main thread only, so a section in another thread
needs nothing. Other signals keep their handlers: SIGINT is the one users send
to stop a training loop and expect to be able to resume from.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def deferred_interrupts() -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGINT)
    if previous is None:  # installed from C: it could not be restored, so leave it alone
        yield
        return
    received: list[int] = []
    signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if received:
            signal.raise_signal(signal.SIGINT)  # delivered to the restored handler
