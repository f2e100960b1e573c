"""The node's one retry policy (node/backoff.py) and the settings that feed it."""

from __future__ import annotations

from pathlib import Path

import pytest

from node.backoff import backoff_s
from node.config import ConfigError, load_settings


def test_backoff_doubles_per_failure_up_to_its_cap() -> None:
    assert [backoff_s(n, 10.0, 600.0) for n in range(1, 9)] == [10, 20, 40, 80, 160, 320, 600, 600]
    assert backoff_s(0, 0.5, 30.0) == 0.5  # no failure yet counts as the first


def test_worker_retry_cap_is_validated_like_the_send_cap(tmp_path: Path) -> None:
    path = tmp_path / "node.toml"
    path.write_text("[worker]\nretry_initial_s = 30\nretry_max_s = 10\n")
    with pytest.raises(ConfigError, match=r"worker.retry_initial_s/retry_max_s: expected 0 < retry_initial_s <= "
                                          r"retry_max_s, found 30.0 and 10.0"):
        load_settings(path)
    path.write_text("[worker]\nretry_initial_s = 5\nretry_max_s = 60\n")
    assert load_settings(path).worker.retry_max_s == 60.0
