"""The node's one retry policy: exponential backoff with a cap.

Used wherever something is tried again after a failure: a job (``worker.retry_initial_s`` /
``worker.retry_max_s``), a send (``send.retry_initial_s`` / ``send.retry_max_s``) and a worker process
restart (``node.supervisor``).
"""

from __future__ import annotations


def backoff_s(failures: int, initial_s: float, max_s: float) -> float:
    """Seconds to wait after ``failures`` failures in a row (1 = the first): ``initial_s`` doubling per
    failure, at most ``max_s``."""
    return float(min(initial_s * 2 ** max(failures - 1, 0), max_s))
