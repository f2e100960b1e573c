"""Logging of every node process: one format naming the process, the privacy guard installed first."""

from __future__ import annotations

import logging


def setup_logging(level: str) -> None:
    """Log to stderr at ``level``; each line names its process (``scp.processes`` > 1 runs several).

    Installs the privacy guard first (``node.privacy``): every record, warning and uncaught exception of
    this process is made value-free at the source, whatever pydicom later does to its logger.
    """
    from node.privacy import install as install_privacy_guard

    install_privacy_guard()
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s",
    )
    # pydicom's warnings also arrive through ``warnings`` (logged once, value-free, by the guard)
    logging.getLogger("pydicom").setLevel(logging.ERROR)
    for noisy in ("pynetdicom", "apscheduler", "highdicom"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # "skipped: maximum number of running instances reached" is the send job being woken while it runs
    logging.getLogger("apscheduler.scheduler").setLevel(logging.ERROR)
