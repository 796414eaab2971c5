"""The deep-prior TensoRF-VM method (ZeroRF's generator, NAF's Beer-Lambert rendering).

`NerfMethod` (and torch with it) loads on first use, so that the command line can check a run's nerf
settings (`NerfConfig`) and refuse bad ones before it pays for importing torch (about 3 s).
"""
from .config import NerfConfig, PRESETS

__all__ = ["NerfConfig", "PRESETS", "NerfMethod"]


def __getattr__(name: str):
    if name == "NerfMethod":
        from .method import NerfMethod

        return NerfMethod
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
