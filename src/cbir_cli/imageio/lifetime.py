"""Decoding workers must not outlive the process that started them: once in 78
SIGKILLs of ``cbir index`` a worker lived on for 18 minutes (300 MB) because a
killed parent cannot tell its children to stop."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

WATCHDOG_SECONDS = 1.0


def exit_with_parent() -> None:
    """Call in a freshly started worker process: it is killed when its parent dies.

    On Linux the kernel does it (``prctl(PR_SET_PDEATHSIG, SIGKILL)``); everywhere,
    a daemon thread also checks once a second that the parent is still the one that
    started us (an orphan is re-parented) and exits if not. The thread covers what
    the signal misses: other systems, and a parent thread (not process) exiting."""
    parent = os.getppid()
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            pr_set_pdeathsig = 1
            libc.prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent or parent == 1:  # the parent died before we asked
        os._exit(1)

    def watch() -> None:
        while True:
            time.sleep(WATCHDOG_SECONDS)
            if os.getppid() != parent:
                os._exit(1)

    threading.Thread(target=watch, name="cbir-parent-watchdog", daemon=True).start()
