"""The in-memory scan every loader returns and every method consumes."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .geometry import ConeBeamGeometry, VolumeGrid


@dataclass
class Volume:
    """A volume array (z, y, x) on a grid in the scanner frame."""

    array: np.ndarray
    grid: VolumeGrid

    def __post_init__(self):
        if tuple(self.array.shape) != self.grid.shape_zyx:
            raise ValueError(f"volume array shape {self.array.shape} does not match grid (z, y, x) "
                             f"{self.grid.shape_zyx}")


@dataclass
class ScanData:
    """Line-integral projections with their geometry, as detected from a file or folder."""

    projections: np.ndarray
    """(V, n_v, n_u) float32 line integrals (-log I/I0), dimensionless."""
    geometry: ConeBeamGeometry
    source_format: str
    """Detected format: 'rtk', 'naf', 'r2gaussian', 'stack+json', ..."""
    source_path: str
    grid: VolumeGrid | None = None
    """Reconstruction grid the format prescribes (TIGRE nVoxel/dVoxel), else None (use the FOV)."""
    reference: Volume | None = None
    """Ground-truth volume shipped with the data (NAF 'image', R2-Gaussian vol_gt.npy)."""
    validation: "ScanData | None" = None
    """Held-out views shipped with the data (NAF 'val'), if any."""
    notes: list[str] = field(default_factory=list)
    """What the loader understood or assumed, shown by `info`."""

    def __post_init__(self):
        p = self.projections
        if p.ndim != 3:
            raise ValueError(f"{self.source_path}: projections must be (views, rows, cols), got shape {p.shape}")
        if p.shape[0] != self.geometry.n_views:
            raise ValueError(
                f"{self.source_path}: {p.shape[0]} projections but the geometry has {self.geometry.n_views} "
                "views; give a geometry with one entry per projection")
        if tuple(p.shape[1:]) != self.geometry.det_shape:
            raise ValueError(f"{self.source_path}: projection images are {p.shape[1:]} (rows, cols) but the "
                             f"geometry says the detector is {self.geometry.det_shape}")

    @property
    def n_views(self) -> int:
        return int(self.projections.shape[0])

    def summary(self) -> dict:
        g = self.geometry
        # to the detector's plane (the SDD the scanner states), not to its centre: an offset or displaced
        # detector's centre lies off the perpendicular
        dist = g.source_detector_distance()
        sid = np.linalg.norm(g.sources, axis=1)  # the source's distance from the frame's origin, the isocentre
        info = dict(format=self.source_format, path=self.source_path, views=self.n_views,
                    detector_rows_cols=list(g.det_shape), pixel_pitch_mm=list(g.pixel_pitch),
                    frame=g.frame, parallel=g.parallel,
                    source_detector_mm=[float(dist.min()), float(dist.max())],
                    source_isocentre_mm=[float(sid.min()), float(sid.max())],
                    projection_range=[float(self.projections.min()), float(self.projections.max())])
        if g.angles is not None:
            info["angles_deg"] = [float(np.degrees(g.angles.min())), float(np.degrees(g.angles.max()))]
        from .orbit import displaced_detector

        displaced = displaced_detector(g)
        if displaced is not None:  # a half-fan scan: the default grid is the circle it measures (fov.py)
            info["displaced_detector"] = {"offset_mm": round(float(np.abs(displaced.offsets).mean()), 3),
                                          "overlap_mm": round(float(displaced.overlap.min()), 3)}
        if self.grid is not None:
            info["grid"] = self.grid.to_dict()
        if self.reference is not None:
            info["reference_grid"] = self.reference.grid.to_dict()
        if self.validation is not None:
            info["validation_views"] = self.validation.n_views
        info["notes"] = list(self.notes)
        return info
