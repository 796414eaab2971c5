"""The in-memory scan every loader returns and every method consumes."""
from __future__ import annotations

import copy
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
    """(V, rows, cols) True where a pixel reading holds no measurement: NaN or infinity in the given
    projections (`formats.validate.MAX_DEFECT_FRACTION` bounds them), or a pixel stuck at air in the object's
    shadow (`stuck_at_air`): a panel's dead pixels and lines. Set here from the projections; their values
    are then filled (`_filled_from_nearest`) so that every method can read the stack, and nerf leaves those
    rays out of its fit."""
    projections_file: str | None = None
    """The file the projections were read from where it is not `source_path` (an RTK case's stack beside
    its geometry XML), for messages about them."""
    bad_views: dict[int, str] = field(default_factory=dict)
    """Views that hold nothing to fit, with what is wrong: entirely zero (a dropped frame), or more than
    `formats.validate.MAX_DEFECT_FRACTION` of the pixels without a value. Set here from the projections;
    `formats.load_scan` refuses a scan with any that the user did not leave out (`--drop-views`)."""

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
        if self.defects is not None and (self.defects.shape != p.shape or self.defects.dtype != bool):
            raise ValueError(f"{self.source_path}: defects must be a bool mask of the projections' shape {p.shape}")
        self._mark_defects()

    def _mark_defects(self):
        missing = ~np.isfinite(self.projections)
        self._find_bad_views(missing)
        stuck = stuck_at_air(self.projections, _orbit_plane_rows(self.geometry))
        if stuck.mean() > STUCK_MAX_FRACTION:  # not a panel's lines: an object that fools the test
            self.notes.append(f"{int(stuck.sum())} detector pixels ({stuck.mean():.1%}) read air in the object's "
                              "shadow in most views while their neighbours read object; more than a panel's dead "
                              "lines, so they are kept as measured")
            stuck = np.zeros_like(stuck)
        still = still_pixels(self.projections) & ~stuck
        if still.mean() > STILL_MAX_FRACTION:  # a test gone wrong costs less kept than a panel's pixels dropped
            self.notes.append(f"{int(still.sum())} detector pixels ({still.mean():.1%}) read the same in every view, "
                              "without photon noise; more than a panel's defects, so they are kept as measured (a "
                              "region the beam does not reach is better cropped before reconstruction)")
            still = np.zeros_like(still)
        if not missing.any() and not stuck.any() and not still.any() and self.defects is None:
            return
        if missing.any():
            views = int(missing.reshape(len(missing), -1).any(axis=1).sum())
            self.notes.append(f"{int(missing.sum())} detector pixels in {views} of {len(missing)} views hold no "
                              "value (NaN or infinity: dead pixels or lines of the panel, or a log of zero counts)")
        if stuck.any():
            self.notes.append(f"{int(stuck.sum())} detector pixels read air in the object's shadow in most views "
                              "while their neighbours on both sides read object (a line of the panel stuck at zero, "
                              "or dead pixels a reader turned into zeros): taken as dead")
        if still.any():
            self.notes.append(f"{int(still.sum())} detector pixels ({still.mean():.1%}) read the same in every view, "
                              "without the photon noise every measured reading has (pixels or lines of the panel "
                              "stuck at a value, or readings clipped in every view): taken as dead")
        if missing.any() or stuck.any() or still.any():  # a mask given with the scan (without_views) was noted
            self.notes.append("nerf leaves the dead pixels' rays out of its fit; FDK and the previews read each "
                              "from the nearest measured pixel of its view")
        dead = missing | (stuck | still)[None]
        self.defects = dead if self.defects is None else (self.defects | dead)
        self.projections = _filled_from_nearest(self.projections, self.defects)

    def _find_bad_views(self, missing: np.ndarray):
        from .formats.validate import MAX_DEFECT_FRACTION

        views = len(missing)
        share = missing.reshape(views, -1).mean(axis=1)
        peak = np.where(missing, 0.0, np.abs(self.projections)).reshape(views, -1).max(axis=1)
        for v in range(views):
            if share[v] > MAX_DEFECT_FRACTION:
                self.bad_views[v] = (f"has {share[v]:.1%} of its pixels without a value (more than the "
                                     f"{MAX_DEFECT_FRACTION:.0%} a panel's dead pixels and lines explain)")
            elif peak[v] == 0:
                self.bad_views[v] = "is entirely zero (a dropped frame?)"

    def without_views(self, drop, reason: str = "--drop-views") -> "ScanData":
        """The scan without the given views (indices into this scan), for `--drop-views`: every method, the
        support and the checks see only the views left, numbered anew. A bad request is a ScanFormatError
        naming `--drop-views`. The views left keep what was found in them (defects, filled values, bad
        views): the search is not run again on a stack already filled (seconds on a large panel)."""
        from .formats.validate import ScanFormatError

        drop = sorted({int(v) for v in drop})
        wrong = [v for v in drop if not 0 <= v < self.n_views]
        if wrong:
            raise ScanFormatError("--drop-views", "--drop-views", f"names view(s) {wrong}; {self.source_path} has "
                                  f"views 0 to {self.n_views - 1}", "give indices into the data's views")
        keep = np.setdiff1d(np.arange(self.n_views), drop)
        if len(keep) < 3:
            raise ScanFormatError("--drop-views", "--drop-views", f"would leave {len(keep)} of {self.n_views} "
                                  "views", "drop fewer views: a reconstruction needs at least 3")
        note = (f"views {drop} left out ({reason}): the {len(keep)} views left are numbered 0 to {len(keep) - 1}"
                + ("" if self.geometry.angles is None else
                   f"; the dropped ones at {[round(float(np.degrees(self.geometry.angles[v])), 2) for v in drop]} deg"))
        kept = copy.copy(self)  # a subset of a checked scan: nothing to check or search again
        kept.projections = self.projections[keep]
        kept.geometry = self.geometry.subset(keep)
        kept.notes = [*self.notes, note]
        kept.defects = None if self.defects is None else self.defects[keep]
        kept.bad_views = {new: self.bad_views[int(old)] for new, old in enumerate(keep) if int(old) in self.bad_views}
        return kept

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
        if self.bad_views:
            info["bad_views"] = {str(v): why for v, why in sorted(self.bad_views.items())}
        info["notes"] = list(self.notes)
        return info


def evenly_spaced(n: int, count: int) -> np.ndarray:
    """Indices of at most `count` of `n` items (views), evenly spaced from the first to the last, each once:
    what the tests across views read where a few views tell as much as all of them."""
    return np.unique(np.linspace(0, n - 1, min(count, n)).round().astype(int))


STUCK_OBJECT_SHARE = 0.05
"""A pixel can only be stuck at air where its neighbours read clearly object: at least this share of the
stack's 99th percentile (the thickest rays; 0.4 on the abdomen) and at least `STUCK_OBJECT_MIN`. On the
abdomen with three columns at zero, 0.25 found 456 of each view's stuck pixels in the body's shadow and
36.23 dB after 120 s; 0.05 finds 513. No benchmark case has a pixel found at 0.25, 0.1 or 0.05."""
STUCK_OBJECT_MIN = 0.1
"""Line integral (10 % attenuation): far above the photon noise of any air a scan has (0.03 at 1e3 photons)."""
STUCK_MAX_FRACTION = 0.02
"""More pixels than this share of the panel found stuck are kept as measured (with a note): a panel's dead
lines are a few of its columns and rows (`formats.validate.MAX_DEFECT_FRACTION` for the missing values), so
more says an object (many thin slots lined up) is what the test reads."""
STUCK_VOTING_VIEWS = 64
"""Views the test reads (evenly spaced): a panel's defect is in every view, so 64 decide as well as 720, in a
tenth of the time on a large scan (7 ms a 512^2 view)."""
ORBIT_PLANE_BAND = 0.1
"""Rows within this share of the detector's height (at least 3) of the orbit plane's row are not tested
across the rows: near that plane a ray's height changes little across the object, so a thin horizontal gap
(stacked samples, a layered phantom) reads air there in every view as a dead row would (a 0.2 mm slot 1 mm
off the plane stays in air over a 100 mm object at 500 mm from the source)."""
STUCK_RATIO = 0.1
"""...and it reads at most this share of the lesser side: no real projection drops tenfold and rises again
within a few pixels, except where a gap lines up with the ray, which happens in a few views, not most."""
STUCK_MAX_RUN = 4
"""Each side is the largest of the next this many pixels, so up to this many adjacent dead lines are found
(a tiled panel's seam, a dead readout group); wider runs are not tested (a wider air slot lined up with the
rays in most views is more likely an object than a panel)."""


def _largest_of_next(padded: np.ndarray, axis: int, step: int) -> np.ndarray:
    """For each pixel of an image padded by `STUCK_MAX_RUN` (NaN), the largest of the pixels 1 to
    `STUCK_MAX_RUN` steps away along `axis` (NaN-aware: a border or dead neighbour does not count)."""
    k = STUCK_MAX_RUN
    rows, cols = padded.shape[0] - 2 * k, padded.shape[1] - 2 * k
    size = (rows, cols)[axis]
    out = None
    for d in range(1, k + 1):
        window = [slice(k, k + rows), slice(k, k + cols)]
        window[axis] = slice(k + d * step, k + d * step + size)
        out = padded[tuple(window)] if out is None else np.fmax(out, padded[tuple(window)])
    return out


def _orbit_plane_rows(geometry: ConeBeamGeometry) -> np.ndarray | None:
    """(V,) the detector row where the plane of a cone-beam orbit lands in each view (the projection of the
    sources' mean, a point of that plane also when the sources sit above or below the isocentre), or None for
    parallel beam (and a geometry that does not say)."""
    if geometry.parallel or geometry.det_shape[0] < 1:
        return None
    centre = geometry.sources.mean(axis=0)
    try:
        with np.errstate(all="raise"):
            return np.array([geometry.project_points(centre, v)[0, 0] for v in range(geometry.n_views)])
    except (ValueError, FloatingPointError, ZeroDivisionError):
        return None


def stuck_at_air(projections: np.ndarray, orbit_plane_rows: np.ndarray | None = None) -> np.ndarray:
    """(rows, cols) True at pixels stuck at (or near) zero: in at least half of the views (and 3) where both sides
    of them read object (the largest of the next `STUCK_MAX_RUN` pixels on each side, along a row or a column,
    at least `STUCK_OBJECT_SHARE` of the stack's 99th percentile), they read at most `STUCK_RATIO` of the lesser
    side. Reading several pixels on each side finds up to `STUCK_MAX_RUN` adjacent dead lines. A pixel stuck
    high cannot be told from a thin dense wire on the rotation axis by its neighbours, which also stands out in
    every view, so only the low side is read here (`still_pixels` finds one by the photon noise it lacks). Nor
    can a row stuck low be told from a thin air gap in or near the orbit's plane, whose rays stay in that gap in
    every view: rows within `ORBIT_PLANE_BAND` of the plane's row
    (`orbit_plane_rows`) are read along the row only; with parallel rays (None) every row keeps its plane, so no
    pixel is read across the rows. A detector rolled about its normal moves the plane's row across the columns;
    the band's width covers a small roll. Why by hand: no library offers a defect test across the views of a
    projection stack; this is a few numpy shifts per view."""
    views, rows, cols = projections.shape
    voting = evenly_spaced(views, STUCK_VOTING_VIEWS)
    sample = np.asarray(projections[voting[evenly_spaced(len(voting), 16)]])
    finite = sample[np.isfinite(sample)]
    floor = max(STUCK_OBJECT_MIN, STUCK_OBJECT_SHARE * float(np.percentile(finite, 99))) if finite.size else np.inf
    row_index = np.arange(rows)[:, None]
    band = max(3.0, ORBIT_PLANE_BAND * rows)
    chances = np.zeros((rows, cols), dtype=np.int32)
    votes = np.zeros((rows, cols), dtype=np.int32)
    for v in voting:
        p = np.asarray(projections[v], dtype=np.float32)
        padded = np.pad(p, STUCK_MAX_RUN, constant_values=np.nan)
        seen = np.zeros((rows, cols), dtype=bool)
        low = np.zeros((rows, cols), dtype=bool)
        for axis in (0, 1):
            with np.errstate(invalid="ignore"):
                # np.minimum, not fmin: a side with no reading (border, NaN) gives no chance
                both = np.minimum(_largest_of_next(padded, axis, -1), _largest_of_next(padded, axis, 1))
                chance = both >= floor
                if axis == 0:  # across the rows: not near the orbit plane's row, nor at all with parallel rays
                    if orbit_plane_rows is None:
                        continue
                    chance &= np.abs(row_index - orbit_plane_rows[v]) > band
                seen |= chance
                low |= chance & (p <= STUCK_RATIO * both)
        chances += seen
        votes += low
    return (chances >= 3) & (2 * votes >= chances)


STILL_SHARE = 0.1
"""A pixel is still where its spread over the views is below this share of the photon noise a pixel reading
its level shows. Every measured reading carries photon noise; a pixel stuck at one value (a defect, a line
of the panel stuck high or low, a reading clipped in every view) does not. The spread of noise alone over
n views falls below a tenth of its standard deviation with the chance of chi-square(n - 1) < n / 100: 1e-6
a pixel at 8 views (a pixel or two of a 1536^2 panel, left out at no cost), 3e-8 at 10, 4e-13 at 16."""
STILL_MIN_VIEWS = 8
"""Views the still-pixel test needs."""
STILL_MAX_FRACTION = 0.05
"""More of the panel than this found still is kept as measured, with a note. No object takes photon noise
away, but the test's noise is read from the data, and a noise read too high would take a third of the panel
for still (it did, before the low quartile: see `still_pixels`); six dead columns, a dead row and scattered
pixels of a 240-pixel panel are 3 %."""


def still_pixels(projections: np.ndarray) -> np.ndarray:
    """(rows, cols) True at pixels that read the same in every view, without the photon noise a reading at
    their level has (`STILL_SHARE`). The noise is the spread over the views of pixels in air in (nearly) every
    view (the detector's corners and sides), after each view's air level (tube output, flat-field drift) is
    taken out; a pixel at line integral p shows sqrt(exp(p)) times it (Poisson counts, log-transformed). Unlike
    `stuck_at_air` this asks nothing of the neighbours, so it also finds a pixel stuck high, a row stuck near
    the orbit plane, and lines wider than `STUCK_MAX_RUN`: no object, on the axis or not, takes away the
    photon noise. Nothing is found on data without noise (simulated exact projections) or without pixels in
    air in every view (no noise to compare with). Why by hand: a per-pixel spread over views, numpy's std."""
    views, rows, cols = projections.shape
    none = np.zeros((rows, cols), dtype=bool)
    if views < STILL_MIN_VIEWS:
        return none
    sample = np.asarray(projections[evenly_spaced(views, STUCK_VOTING_VIEWS)], dtype=np.float32)
    with np.errstate(invalid="ignore"):
        finite = np.isfinite(sample).all(axis=0)
        if finite.sum() < 1000:
            return none
        p99 = float(np.percentile(sample[:, ::4, ::4][:, finite[::4, ::4]], 99))  # a 16th: a large stack, once
        # air in (nearly) every view: low on average, and never far above (an edge crossing in a view or two
        # passes; a noisy pixel's largest reading would not pass a bound on the largest alone)
        air = finite & (sample.mean(axis=0) < 0.01 * p99) & (sample.max(axis=0) < 0.1 * p99)
        if air.sum() < 100:
            return none
        levels = np.median(sample[:, air], axis=1)  # each view's air level
        spread = np.empty((rows, cols), dtype=np.float32)
        mean_exp = np.empty((rows, cols), dtype=np.float32)  # the photons' variance over the air's
        for r in range(0, rows, 64):  # in bands of rows: a float32 copy of the sample at a time
            band = sample[:, r:r + 64] - levels[:, None, None]
            spread[r:r + 64] = band.std(axis=0)
            mean_exp[r:r + 64] = np.exp(np.clip(band, 0.0, 30.0)).mean(axis=0)
        # the noise is a low quartile of the air's spreads, not counting those far below the rest (stuck
        # pixels in air, a dead line through it, would pull it to zero): "air" also holds pixels that an
        # object's edge crosses in a few views, whose spread is the object's, and a noise read too high
        # would take noisy pixels for still ones. On the 25-view abdomen with its counts blurred (noise
        # correlated as a scintillator makes it), the median of what lay above a tenth of the 90th
        # percentile read 0.031 for a noise of 0.0017 and took 36 % of the panel for still
        spreads = spread[air]
        noisy = spreads[spreads > STILL_SHARE * np.median(spreads)]
        if noisy.size < 100:
            return none
        sigma_air = float(np.percentile(noisy, 25))
        if not sigma_air > 0:
            return none
        return finite & (spread < STILL_SHARE * sigma_air * np.sqrt(mean_exp))


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
