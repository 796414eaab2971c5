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
    defects: np.ndarray | None = None
    """(V, rows, cols) True where a pixel holds no measurement: NaN or infinity in the given projections
    (a panel's dead pixels and lines; `formats.validate.MAX_DEFECT_FRACTION` bounds them). Set here from
    the projections; their values are then filled (`_filled_from_nearest`) so that every method can read
    the stack, and nerf leaves those rays out of its fit."""

    def __post_init__(self):
        self._mark_defects()
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

    def _mark_defects(self):
        missing = ~np.isfinite(self.projections)
        if not missing.any():
            return
        self.defects = missing if self.defects is None else (self.defects | missing)
        self.projections = _filled_from_nearest(self.projections, missing)
        views = int(missing.reshape(len(missing), -1).any(axis=1).sum())
        self.notes.append(f"{int(missing.sum())} detector pixels in {views} of {len(missing)} views hold no value "
                          "(NaN or infinity: dead pixels or lines of the panel, or a log of zero counts): nerf "
                          "leaves their rays out of its fit; FDK and the previews read each from the nearest "
                          "measured pixel of its view")

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
        if self.defects is not None:
            info["defect_pixels"] = int(self.defects.sum())
        info["notes"] = list(self.notes)
        return info


def _filled_from_nearest(projections: np.ndarray, missing: np.ndarray) -> np.ndarray:
    """Each missing pixel takes the value of the nearest measured pixel of its own view (SciPy's exact
    Euclidean distance transform gives the nearest one's index). Why nearest and not an interpolation: a
    dead line then repeats its neighbour, no new values are made up, and a view stays within its measured
    range; nerf does not read them at all."""
    from scipy.ndimage import distance_transform_edt

    out = np.array(projections, dtype=np.float32, copy=True)
    for v in np.flatnonzero(missing.reshape(len(missing), -1).any(axis=1)):
        if missing[v].all():
            out[v] = 0.0
            continue
        nearest = distance_transform_edt(missing[v], return_distances=False, return_indices=True)
        out[v] = out[v][tuple(nearest)]
    return out
