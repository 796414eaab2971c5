"""The deep-prior TensoRF-VM method (ZeroRF's generator, NAF's Beer-Lambert rendering)."""
from .config import NerfConfig, PRESETS
from .method import NerfMethod

__all__ = ["NerfConfig", "PRESETS", "NerfMethod"]
