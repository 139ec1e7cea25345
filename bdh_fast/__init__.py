"""bdh_fast: train and watch the BDH (Dragon Hatchling) language model."""

from bdh_fast.model import BDH, BDHConfig

__all__ = ["BDH", "BDHConfig"]
__version__ = "0.1.0"
