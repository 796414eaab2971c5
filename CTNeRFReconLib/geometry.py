"""The one geometry representation every format is adapted onto.

A scan is a list of views; each view has its own X-ray source point, detector centre and detector
row/column unit vectors, in millimetres, in the scanner frame of the data's format. Rays are made
from that alone, so circular, helical, offset or tilted scans need no special cases downstream.

Conventions fixed here (and tested against RTK's Joseph projector):

* Projection arrays are ``(view, row, col)`` = ``(V, n_v, n_u)``: numpy/ITK order of RTK's
  ``[u, v, view]`` stack.
* The centre of detector pixel ``(row i, col j)`` of view ``k`` is
  ``det_centers[k] + (j - (n_u - 1) / 2) * pitch_u * det_u[k] + (i - (n_v - 1) / 2) * pitch_v * det_v[k]``.
* Volume arrays are ``(z, y, x)`` (SimpleITK's ``GetArrayFromImage`` order); a grid's ``origin``
  is the world position of the centre of voxel ``(x=0, y=0, z=0)`` (ITK's meaning of origin).
* Parallel beam is the far-source limit: ``parallel=True`` makes every ray of a view run along
  ``det_centers - sources`` (normalised) through its own pixel.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class ConeBeamGeometry:
    """Per-view source/detector description of a scan (all lengths in mm)."""

    sources: np.ndarray
    """(V, 3) X-ray source positions."""
    det_centers: np.ndarray
    """(V, 3) positions of the geometric centre of the pixel array."""
    det_u: np.ndarray
    """(V, 3) unit vectors along increasing column index."""
    det_v: np.ndarray
    """(V, 3) unit vectors along increasing row index."""
    det_shape: tuple[int, int]
    """(n_v rows, n_u columns) of the detector."""
    pixel_pitch: tuple[float, float]
    """(pitch_v, pitch_u): centre-to-centre pixel distances in mm."""
    angles: np.ndarray | None = None
    """(V,) gantry angles in radians, when the format has them (informative and for FDK weights)."""
    parallel: bool = False
    """Parallel beam: rays run along the central direction of each view."""
    frame: str = "scanner"
    """Name of the scanner frame, e.g. 'rtk' (rotation axis y) or 'tigre' (rotation axis z)."""

    def __post_init__(self):
        for name in ("sources", "det_centers", "det_u", "det_v"):
            arr = np.asarray(getattr(self, name), dtype=np.float64)
            if arr.ndim != 2 or arr.shape[1] != 3:
                raise ValueError(f"geometry field '{name}' must have shape (views, 3), got {arr.shape}")
            object.__setattr__(self, name, arr)
        n = self.sources.shape[0]
        for name in ("det_centers", "det_u", "det_v"):
            if getattr(self, name).shape[0] != n:
                raise ValueError(
                    f"geometry field '{name}' has {getattr(self, name).shape[0]} views, sources have {n}")
        if self.angles is not None:
            object.__setattr__(self, "angles", np.asarray(self.angles, dtype=np.float64).reshape(-1))
        object.__setattr__(self, "det_shape", (int(self.det_shape[0]), int(self.det_shape[1])))
        object.__setattr__(self, "pixel_pitch", (float(self.pixel_pitch[0]), float(self.pixel_pitch[1])))
        if min(self.det_shape) < 1:
            raise ValueError(f"detector shape must be positive, got {self.det_shape}")
        if min(self.pixel_pitch) <= 0 or not np.all(np.isfinite(self.pixel_pitch)):
            raise ValueError(f"pixel pitch must be positive, got {self.pixel_pitch}")

    @property
    def n_views(self) -> int:
        return int(self.sources.shape[0])

    def subset(self, views) -> "ConeBeamGeometry":
        """Geometry of a subset of views (index array or slice)."""
        idx = np.arange(self.n_views)[views]
        return dataclasses.replace(
            self,
            sources=self.sources[idx], det_centers=self.det_centers[idx],
            det_u=self.det_u[idx], det_v=self.det_v[idx],
            angles=None if self.angles is None else self.angles[idx])

    def pixel_positions(self, view: int, rows=None, cols=None) -> np.ndarray:
        """World positions (n_rows, n_cols, 3) of pixel centres of one view."""
        n_v, n_u = self.det_shape
        rows = np.arange(n_v) if rows is None else np.asarray(rows)
        cols = np.arange(n_u) if cols is None else np.asarray(cols)
        su = (cols - (n_u - 1) / 2.0) * self.pixel_pitch[1]
        sv = (rows - (n_v - 1) / 2.0) * self.pixel_pitch[0]
        return (self.det_centers[view][None, None, :]
                + su[None, :, None] * self.det_u[view][None, None, :]
                + sv[:, None, None] * self.det_v[view][None, None, :])

    def source_detector_distance(self) -> np.ndarray:
        """(V,) perpendicular distance from each source to its detector plane."""
        normal = np.cross(self.det_u, self.det_v)
        normal /= np.linalg.norm(normal, axis=1, keepdims=True)
        return np.abs(np.einsum("vi,vi->v", self.det_centers - self.sources, normal))

    def project_points(self, points: np.ndarray, view: int) -> np.ndarray:
        """Continuous (row, col) detector index where each world point (N, 3) lands in a view.

        This is the hand-computable forward model used to check adapters (a bead must land on a
        known pixel): intersect the source->point line with the detector plane.
        """
        points = np.asarray(points, dtype=np.float64).reshape(-1, 3)
        u, v, c, s = self.det_u[view], self.det_v[view], self.det_centers[view], self.sources[view]
        normal = np.cross(u, v)
        if self.parallel:
            d = c - s
            d = np.broadcast_to(d / np.linalg.norm(d), points.shape)
        else:
            d = points - s
        t = ((c - points) @ normal) / (d @ normal)
        hit = points + t[:, None] * d
        rel = hit - c
        n_v, n_u = self.det_shape
        col = rel @ u / self.pixel_pitch[1] + (n_u - 1) / 2.0
        row = rel @ v / self.pixel_pitch[0] + (n_v - 1) / 2.0
        return np.stack([row, col], axis=1)


@dataclass(frozen=True)
class VolumeGrid:
    """A regular grid in the scanner frame: shape, voxel size, origin and direction."""

    shape_xyz: tuple[int, int, int]
    """Number of voxels along x, y, z (arrays are stored (z, y, x))."""
    spacing_xyz: tuple[float, float, float]
    """Voxel size in mm along each grid axis."""
    origin_xyz: tuple[float, float, float]
    """World position (mm) of the centre of voxel (0, 0, 0)."""
    direction: np.ndarray = field(default_factory=lambda: np.eye(3))
    """3x3 matrix whose columns are the world directions of the grid's i, j, k axes (ITK meaning)."""

    def __post_init__(self):
        object.__setattr__(self, "shape_xyz", tuple(int(s) for s in self.shape_xyz))
        object.__setattr__(self, "spacing_xyz", tuple(float(s) for s in self.spacing_xyz))
        object.__setattr__(self, "origin_xyz", tuple(float(s) for s in self.origin_xyz))
        object.__setattr__(self, "direction", np.asarray(self.direction, dtype=np.float64).reshape(3, 3))
        if len(self.shape_xyz) != 3 or min(self.shape_xyz) < 1:
            raise ValueError(f"grid shape must be three positive sizes, got {self.shape_xyz}")
        if min(self.spacing_xyz) <= 0:
            raise ValueError(f"grid spacing must be positive, got {self.spacing_xyz}")

    @property
    def shape_zyx(self) -> tuple[int, int, int]:
        return tuple(reversed(self.shape_xyz))

    @property
    def n_voxels(self) -> int:
        return int(np.prod(self.shape_xyz))

    @property
    def is_axis_aligned(self) -> bool:
        return bool(np.allclose(self.direction, np.eye(3)))

    @classmethod
    def centered(cls, shape_xyz, spacing_xyz, center_xyz=(0.0, 0.0, 0.0)) -> "VolumeGrid":
        """Axis-aligned grid whose centre sits at ``center_xyz``."""
        shape = np.asarray(shape_xyz, dtype=np.float64)
        spacing = np.asarray(spacing_xyz, dtype=np.float64)
        origin = np.asarray(center_xyz, dtype=np.float64) - (shape - 1) / 2.0 * spacing
        return cls(tuple(shape_xyz), tuple(spacing), tuple(origin))

    def index_to_world_matrix(self) -> np.ndarray:
        """4x4 homogeneous matrix from (i, j, k) = (x, y, z) voxel index to world mm."""
        m = np.eye(4)
        m[:3, :3] = self.direction @ np.diag(self.spacing_xyz)
        m[:3, 3] = self.origin_xyz
        return m

    def world_points(self, dtype=np.float32) -> np.ndarray:
        """World coordinates of every voxel centre, shape (z, y, x, 3)."""
        nx, ny, nz = self.shape_xyz
        k, j, i = np.meshgrid(np.arange(nz), np.arange(ny), np.arange(nx), indexing="ij")
        idx = np.stack([i, j, k], axis=-1).astype(np.float64)
        m = self.index_to_world_matrix()
        return (idx @ m[:3, :3].T + m[:3, 3]).astype(dtype)

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """World-space axis-aligned box enclosing the grid's voxels (edges, not centres)."""
        nx, ny, nz = self.shape_xyz
        corners = np.array([[a, b, c] for a in (-0.5, nx - 0.5) for b in (-0.5, ny - 0.5)
                            for c in (-0.5, nz - 0.5)])
        m = self.index_to_world_matrix()
        world = corners @ m[:3, :3].T + m[:3, 3]
        return world.min(axis=0), world.max(axis=0)

    def with_spacing(self, spacing_xyz) -> "VolumeGrid":
        """Same box (same edges) at another voxel size: arbitrary-scale output."""
        lo, hi = self.bounds()
        spacing = np.broadcast_to(np.asarray(spacing_xyz, dtype=np.float64), (3,))
        shape = np.maximum(1, np.round((hi - lo) / spacing)).astype(int)
        return VolumeGrid.centered(tuple(shape), tuple(spacing), tuple((lo + hi) / 2.0))

    def to_dict(self) -> dict:
        return dict(shape_xyz=list(self.shape_xyz), spacing_xyz=list(self.spacing_xyz),
                    origin_xyz=list(self.origin_xyz), direction=self.direction.tolist())

    @classmethod
    def from_dict(cls, d: dict) -> "VolumeGrid":
        return cls(tuple(d["shape_xyz"]), tuple(d["spacing_xyz"]), tuple(d["origin_xyz"]),
                   np.asarray(d.get("direction", np.eye(3))))


def circular_geometry(sid: float, sdd: float, angles_rad, det_shape, pixel_pitch,
                      det_offset=(0.0, 0.0), axis: str = "z", parallel: bool = False) -> ConeBeamGeometry:
    """A circular orbit given by a few numbers, in a right-handed frame with the chosen rotation axis.

    ``axis='z'`` is TIGRE's frame with rows stored as NAF and R2-Gaussian store them (verified
    against TIGRE's projector source, see formats/tigre.py): angle 0 has the source at (+sid, 0, 0),
    columns along +y, rows along -z (row 0 at the top). TIGRE's own ``Ax`` output has row 0 at
    the bottom (rows along +z): use formats.tigre.tigre_geometry for TIGRE arrays and offsets.
    ``det_offset`` moves the centre along the stored row/column vectors, not TIGRE's offDetector.
    ``axis='y'`` follows RTK (angle 0: source on +z, columns along +x, rows along +y).
    ``det_offset`` = (offset_v, offset_u) in mm shifts the detector centre within its plane.
    """
    angles = np.asarray(angles_rad, dtype=np.float64).reshape(-1)
    c, s = np.cos(angles), np.sin(angles)
    zeros, ones = np.zeros_like(angles), np.ones_like(angles)
    off_v, off_u = det_offset
    if axis == "y":
        # RTK: source at R_y(theta) (0, 0, sid); detector plane at distance sdd - sid beyond the axis.
        src = np.stack([sid * s, zeros, sid * c], axis=1)
        u = np.stack([c, zeros, -s], axis=1)
        v = np.stack([zeros, ones, zeros], axis=1)
        back = -np.stack([s, zeros, c], axis=1)
    elif axis == "z":
        # TIGRE frame, NAF/R2 row order: source at R_z(theta) (sid, 0, 0); u along +y rotated, v along -z.
        src = np.stack([sid * c, sid * s, zeros], axis=1)
        u = np.stack([-s, c, zeros], axis=1)
        v = np.stack([zeros, zeros, -ones], axis=1)
        back = -np.stack([c, s, zeros], axis=1)
    else:
        raise ValueError(f"rotation axis must be 'y' or 'z', got {axis!r}")
    center = src + sdd * back + off_u * u + off_v * v
    return ConeBeamGeometry(src, center, u, v, det_shape, pixel_pitch, angles=angles,
                            parallel=parallel, frame="rtk" if axis == "y" else "tigre")
