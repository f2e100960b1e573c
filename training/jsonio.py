"""The one numpy-to-JSON converter of ``training/``.

Every JSON file the training code writes goes through :func:`jsonable`: numpy scalars become Python
numbers, arrays and tuples lists, mapping keys strings. What a non-finite float becomes depends on the
file: ``nan="null"`` (``results.json``, ``site_threshold.json``: strict JSON, ``allow_nan=False`` accepts
it) or ``nan="keep"`` (``cohorts.json``, ``audits.json``: written as ``NaN`` as they always were).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Literal

import numpy as np

NanPolicy = Literal["null", "keep"]


def jsonable(obj: Any, nan: NanPolicy = "null") -> Any:
    """A copy of ``obj`` that ``json.dumps`` accepts: numpy -> Python; NaN/inf -> None unless ``nan="keep"``."""
    if isinstance(obj, Mapping):
        return {str(k): jsonable(v, nan) for k, v in obj.items()}
    if isinstance(obj, np.ndarray):
        return jsonable(obj.tolist(), nan)
    if isinstance(obj, list | tuple):
        return [jsonable(v, nan) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if nan == "null" and isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj
