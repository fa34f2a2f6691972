"""Stopping a long run cleanly: Ctrl-C asks for a stop, long loops stop at their next safe point after saving.

    with graceful_sigint(on_first=lambda: print("stopping at the next checkpoint ...")):
        run_recipe(...)                      # loops call check(save=...) at safe points

The first Ctrl-C only sets a flag; the distillation loop (after an optimizer step) and the recipe runner
(after a stage) call `check(save)`, which saves and raises `Interrupted`. A second Ctrl-C raises
KeyboardInterrupt at once (what happened since the last checkpoint is then lost). Without
`graceful_sigint` (e.g. in a notebook) Ctrl-C behaves as Python's default.
"""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from typing import Callable, Iterator

_stop = threading.Event()


class Interrupted(KeyboardInterrupt):
    """A run stopped at a safe point after saving its progress (`where` says which point)."""

    def __init__(self, where: str) -> None:
        super().__init__(where)
        self.where = where


def request_stop() -> None:
    """Ask running loops to stop at their next safe point (what the first Ctrl-C does)."""
    _stop.set()


def stop_requested() -> bool:
    """True once a stop was asked for and not yet cleared."""
    return _stop.is_set()


def clear() -> None:
    """Forget a stop request (a new run starts)."""
    _stop.clear()


def check(save: Callable[[], None] | None = None, where: str = "") -> None:
    """At a safe point: when a stop was asked for, run `save` and raise Interrupted(where)."""
    if _stop.is_set():
        if save is not None:
            save()
        raise Interrupted(where)


@contextmanager
def graceful_sigint(on_first: Callable[[], None] | None = None) -> Iterator[None]:
    """Within the block, the first SIGINT calls `request_stop()` (and `on_first`), the second raises
    KeyboardInterrupt. Outside the main thread this is a no-op (signals are delivered there only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    clear()

    def handler(signum, frame):  # noqa: ANN001
        if _stop.is_set():
            raise KeyboardInterrupt
        request_stop()
        if on_first is not None:
            on_first()

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        clear()


__all__ = ["Interrupted", "check", "clear", "graceful_sigint", "request_stop", "stop_requested"]
