"""A reference CT for scoring: read it, and bring it to attenuation (1/mm) if it is in HU.

Reconstructions are linear attenuation mu in 1/mm. A reference in Hounsfield units is converted
with mu = mu_water (1 + HU / 1000), clipped at 0, the same calibration the simulator and the
benchmark harness use. With units 'auto' a volume is taken as HU when it has values below -100
or its 99.9th percentile exceeds 5 (no tissue attenuates 5/mm; HU volumes reach hundreds).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .data import Volume
from .phantom import MU_WATER
from .volume_io import read_input_volume

REFERENCE_UNITS = ("auto", "mu", "hu")


def looks_like_hu(array: np.ndarray) -> bool:
    finite = array[np.isfinite(array)]
    if finite.size == 0:
        return False
    return bool(finite.min() < -100 or np.percentile(finite, 99.9) > 5)


def hu_to_mu(array: np.ndarray, mu_water: float = MU_WATER) -> np.ndarray:
    return np.clip(mu_water * (1.0 + array.astype(np.float32) / 1000.0), 0.0, None).astype(np.float32)


def load_reference(path, units: str = "auto", mu_water: float = MU_WATER) -> tuple[Volume, str]:
    """The reference as attenuation (1/mm) and the units it was read in ('mu' or 'hu')."""
    if units not in REFERENCE_UNITS:
        raise ValueError(f"reference units '{units}' unknown; use one of {', '.join(REFERENCE_UNITS)}")
    if mu_water <= 0:
        raise ValueError(f"water attenuation must be positive (1/mm), got {mu_water}; 0.02 is water at ~70 keV")
    volume = read_input_volume(Path(path), "--reference", "give a 3D CT volume (NRRD, MHA or NIfTI) with finite "
                               "values in HU or 1/mm, or leave --reference out")
    if units == "auto":
        units = "hu" if looks_like_hu(volume.array) else "mu"
    if units == "hu":
        volume = Volume(hu_to_mu(volume.array, mu_water), volume.grid)
    return volume, units
