"""SIGTERM as Ctrl+C: how a uipe process stops when a scheduler, `kill` or a chaos run asks it to."""

from __future__ import annotations

import signal
import threading


def stop_on_sigterm() -> None:
    """A SIGTERM (a scheduler's stop, `kill`) stops the process as Ctrl+C does: Tune stops its trials and uipe says
    `--resume`. Installed when the CLI starts and again after ray.init, whose own handler replaces it: that one prints
    a C++ stack to the log and exits 15 with nothing on the console (seen in scripts/chaos.py's driver-sigterm runs).
    Main thread only, where Python handles signals."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _as_interrupt)


def _as_interrupt(signum: int, frame: object) -> None:
    # SIGINT's handler: Tune's graceful stop during a fit, else Python's KeyboardInterrupt. A process started in the
    # background inherits SIGINT ignored, which would swallow the SIGTERM too (seen in a chaos run): raise then.
    handler = signal.getsignal(signal.SIGINT)
    if not callable(handler):
        raise KeyboardInterrupt
    handler(signal.SIGINT, frame)
