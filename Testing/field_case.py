"""Shared by the field-export, surface and projection-check tests: an analytic ellipsoid phantom,
exact cone-beam line integrals written as an RTK case, and short real runs of the command line's
`reconstruct` (in this process, so no interpreter start-up)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from CTNeRFReconLib.data import ScanData, Volume
from CTNeRFReconLib.geometry import VolumeGrid, circular_geometry
from CTNeRFReconLib.phantom import Ellipsoid, phantom_line_integrals, voxelize
from CTNeRFReconLib.rays import all_pixel_indices, view_rays

BODY = Ellipsoid((0.0, 0.0, 0.0), (30.0, 24.0, 20.0), 0.02)
"""The body: semi-axes 30, 24, 20 mm, water."""
INSERT = Ellipsoid((8.0, -5.0, 3.0), (7.0, 5.0, 6.0), 0.02)
"""A denser insert (body + insert = 0.04 /mm, about +1000 HU)."""
PHANTOM = [BODY, INSERT]
VOXEL = 2.0
GRID = VolumeGrid.centered((40, 34, 30), (VOXEL,) * 3)
"""The output (reference) grid: 80 x 68 x 60 mm at 2 mm."""


def projections(phantom, geometry, views=None) -> np.ndarray:
    v, r, c = all_pixel_indices(geometry, views)
    rays = view_rays(geometry, v, r, c, np.full(3, -1000.0), np.full(3, 1000.0))
    p = phantom_line_integrals(phantom, rays.origins.double().numpy(), rays.directions.double().numpy())
    n = geometry.n_views if views is None else len(np.atleast_1d(views))
    return p.reshape(n, *geometry.det_shape)


def geometry(views: int = 24, det: int = 64, angle_offsets_deg=None):
    """RTK-frame orbit (source-isocentre 300 mm, source-detector 450 mm), detector 64 x 64 of 2.25 mm
    (1.5 mm at the isocentre); `angle_offsets_deg` (view -> degrees) moves single views."""
    angles = np.arange(views) * 360.0 / views
    if angle_offsets_deg:
        angles = angles.copy()
        for view, off in angle_offsets_deg.items():
            angles[view] += off
    return circular_geometry(300.0, 450.0, np.radians(angles), (det, det), (2.25, 2.25), axis="y")


def write_case(folder: Path, views: int = 24, det: int = 64, i0: float = 0.0, seed: int = 0) -> Path:
    """The phantom's RTK case (geometry.xml, projections.mha, reference.nrrd on GRID) in `folder`."""
    from CTNeRFReconLib.formats.rtk import write_rtk_case

    geo = geometry(views, det)
    p = projections(PHANTOM, geo)
    if i0 > 0:
        counts = np.random.default_rng(seed).poisson(i0 * np.exp(-p)).clip(1, None)
        p = -np.log(counts / i0)
    scan = ScanData(p.astype(np.float32), geo, "synthetic", "<field test phantom>")
    write_rtk_case(scan, folder, reference=Volume(voxelize(PHANTOM, GRID, supersample=4), GRID))
    return Path(folder)


def reconstruct(data: Path, out: Path, method: str = "nerf", iterations: int = 300, **extra) -> Path:
    """`reconstruct DATA --out OUT --reference DATA/reference.nrrd` in this process; returns OUT."""
    from CTNeRFReconLib.events import ExitCode
    from CTNeRFReconLib.worker import ReconstructOptions, run_reconstruction

    opts = ReconstructOptions(data=data, out=out, reference=data / "reference.nrrd", reference_units="mu",
                              method=method, preset="preview", device="cpu", quiet=True, overwrite=True,
                              iterations=iterations if method == "nerf" else None,
                              snapshot_every=0 if method == "nerf" else None, **extra)
    code = run_reconstruction(opts, stream=False)
    assert code == ExitCode.OK, f"reconstruct failed with exit code {code}"
    return Path(out)


def ellipsoid_grid(spacing: float, lo, hi) -> VolumeGrid:
    lo, hi = np.asarray(lo, float), np.asarray(hi, float)
    shape = np.maximum(1, np.round((hi - lo) / spacing)).astype(int)
    return VolumeGrid.centered(tuple(int(k) for k in shape), (spacing,) * 3, tuple((lo + hi) / 2))


_RUNS: dict = {}


def cached_run(method: str = "nerf", iterations: int = 200) -> Path:
    """One run of the phantom case per process and setting (shared by the test modules of one pytest run)."""
    import tempfile

    key = (method, iterations)
    if key not in _RUNS:
        root = Path(tempfile.mkdtemp(prefix="ctnerf_field_case_"))
        data = write_case(root / "data")
        _RUNS[key] = reconstruct(data, root / f"run_{method}", method=method, iterations=iterations)
    return _RUNS[key]


# -- analytic ellipsoid geometry ---------------------------------------------------------------------
def ellipsoid_area(a: float, b: float, c: float) -> float:
    """Surface area of an ellipsoid with semi-axes a >= b >= c (Legendre's form with incomplete
    elliptic integrals)."""
    from scipy.special import ellipeinc, ellipkinc

    a, b, c = sorted((a, b, c), reverse=True)
    phi = np.arccos(c / a)
    m = (a * a * (b * b - c * c)) / (b * b * (a * a - c * c))
    s = np.sin(phi)
    return float(2 * np.pi * c * c + 2 * np.pi * a * b / s * (ellipeinc(phi, m) * s * s + ellipkinc(phi, m) * np.cos(phi) ** 2))


def ellipsoid_volume(a: float, b: float, c: float) -> float:
    return float(4.0 / 3.0 * np.pi * a * b * c)


def distance_to_ellipsoid(points: np.ndarray, centre, axes) -> np.ndarray:
    """Exact Euclidean distance of points to an axis-aligned ellipsoid's surface: the closest point is
    p_i a_i^2 / (a_i^2 + t) with sum (a_i p_i / (a_i^2 + t))^2 = 1 (one root t > -min a_i^2), by bisection."""
    p = np.abs(np.asarray(points, float) - np.asarray(centre, float))
    a2 = np.asarray(axes, float) ** 2

    def f(t):
        return (((np.sqrt(a2) * p) / (a2 + t[:, None])) ** 2).sum(axis=1) - 1.0

    lo = np.full(len(p), -a2.min() + 1e-12)
    hi = np.full(len(p), np.linalg.norm(p, axis=1) * np.sqrt(a2.max()) + 1.0)
    for _ in range(100):
        mid = (lo + hi) / 2
        pos = f(mid) > 0
        lo = np.where(pos, mid, lo)
        hi = np.where(pos, hi, mid)
    t = (lo + hi) / 2
    closest = p * a2 / (a2 + t[:, None])
    return np.linalg.norm(p - closest, axis=1)


def ellipsoid_samples(centre, axes, n: int = 20000, seed: int = 0) -> np.ndarray:
    """Points on the ellipsoid's surface, about evenly spread (rejection sampling of area)."""
    rng = np.random.default_rng(seed)
    a = np.asarray(axes, float)
    out = []
    while sum(len(o) for o in out) < n:
        u = rng.normal(size=(4 * n, 3))
        u /= np.linalg.norm(u, axis=1, keepdims=True)
        x = u * a
        # area element of the map from the sphere is proportional to |grad| * |x|... accept by the
        # ratio of the surface element to its largest value
        g = np.linalg.norm(x / a ** 2, axis=1) * np.prod(a)
        keep = rng.random(len(x)) < g / g.max()
        out.append(x[keep])
    return np.concatenate(out)[:n] + np.asarray(centre, float)


def symmetric_hd95(poly, centre, axes) -> float:
    """95th percentile of the distances mesh vertices -> ellipsoid and ellipsoid samples -> mesh (mm)."""
    from vtkmodules.util.numpy_support import vtk_to_numpy
    from vtkmodules.vtkFiltersCore import vtkImplicitPolyDataDistance

    verts = vtk_to_numpy(poly.GetPoints().GetData()).astype(float)
    d1 = distance_to_ellipsoid(verts, centre, axes)
    dist = vtkImplicitPolyDataDistance()
    dist.SetInput(poly)
    d2 = np.array([abs(dist.EvaluateFunction(*p)) for p in ellipsoid_samples(centre, axes, 4000)])
    return float(np.percentile(np.concatenate([d1, d2]), 95))
