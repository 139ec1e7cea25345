"""bdh_fast: train and watch the BDH (Dragon Hatchling) language model.

`BDH` and `BDHConfig` are imported on first use, not with the package: `python -m bdh_fast.train`
can then catch a preemption signal before torch is imported (a second or more of start-up).
"""

from __future__ import annotations

from typing import Any

__all__ = ["BDH", "BDHConfig"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name in __all__:
        from bdh_fast import model

        return getattr(model, name)
    raise AttributeError(f"module 'bdh_fast' has no attribute {name!r}")
