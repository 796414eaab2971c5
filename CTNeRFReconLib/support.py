"""The object's support from the projections alone: space carving (the visual hull).

A voxel whose ray measures air in some view holds no material: its attenuation is zero. Every view
that shows air behind a voxel therefore carves it away; what no view carves is the support, the
object's visual hull (Laurentini, "The visual hull concept for silhouette-based image
understanding", IEEE PAMI 16(2), 1994; as a reconstruction constraint in sparse-view CT, e.g. the
support constraints of POCS methods). A reconstruction then pays for the object, not for the air
of the default grid (the box every view sees): the training grid shrinks to the support's bounding
box and the field is held at zero outside the support.

Carving must never remove object, so every decision leans to keeping voxels:

* the air level is estimated from the data (the lowest clear mode of the smoothed line integrals),
  not assumed to be zero, and carving is relative to it; when no clear air population exists
  (an object wider than the field of view in every view, a badly flat-fielded scan whose "air" is
  far from zero) nothing is carved and the reason is reported;
* a pixel is air only when its 3x3 mean lies within a margin of the air level that covers the
  noise (Immerkaer's estimate on the air pixels, nerf/prior_weight.py) and a small fraction of the
  object's own line integrals, and when its whole 3x3 neighbourhood is air too (a voxel's footprint
  is about a pixel; blur and isolated noisy pixels then cannot carve);
* a voxel is carved only by a view whose detector it projects onto: a voxel outside a view's
  detector (a truncated detector, along the axis or across it) is not carved by that view, so an
  object that leaves the detector keeps its extent in that direction; rows at the detector's edge
  that see object carve nothing;
* the support is dilated by a margin of voxels (grazing rays through an object's edge measure
  little and must not eat into it);
* anything in the beam is object: a table or sample holder is kept, as the data say it is there.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from .data import evenly_spaced
from .geometry import ConeBeamGeometry, VolumeGrid


@dataclass
class SupportSettings:
    """How cautious carving is; the defaults keep every object voxel of the tests' phantoms."""

    noise_sigmas: float = 6.0
    """Margin above the air level in noise standard deviations (of a pixel's 3x3 mean)."""
    relative_margin: float = 0.01
    """Margin above the air level as a fraction of the line integrals' 99th percentile (blur, scatter,
    a beam that is not quite flat): at least this much material along a ray means object."""
    margin_voxels: int = 2
    """Dilation of the carved support, in voxels."""
    min_air_fraction: float = 0.002
    """Fewer air pixels than this fraction of the examined pixels (and than min_air_pixels): no carving."""
    min_air_pixels: int = 500
    max_air_level: float = 0.05
    """The air level must lie within this fraction of the 99th-percentile line integral from zero;
    an estimate farther away is taken for object, not air (no carving)."""
    max_views_for_statistics: int = 64


@dataclass
class Support:
    """The carved support of the object on a grid, and what was found (for `info` and run.json)."""

    grid: VolumeGrid
    """The grid the mask lives on."""
    mask: np.ndarray | None
    """(z, y, x) bool, True where the object may be; None when nothing was carved (see `reason`)."""
    air_level: float | None = None
    threshold: float | None = None
    noise_sigma: float | None = None
    air_pixel_fraction: float | None = None
    reason: str | None = None
    """Why no support was carved (None when one was)."""
    box_index: tuple | None = None
    """((x0, y0, z0), (x1, y1, z1)) inclusive voxel index range of the support on `grid`."""
    extra: dict = field(default_factory=dict)

    @property
    def found(self) -> bool:
        return self.mask is not None

    @property
    def fraction(self) -> float:
        """Fraction of the grid's voxels in the support (1 when none was carved)."""
        return 1.0 if self.mask is None else float(self.mask.mean())

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """World box (lo, hi) of the support's voxels (their outer faces); the grid's box when none."""
        if self.box_index is None:
            return self.grid.bounds()
        (i0, i1) = (np.asarray(b, dtype=float) for b in self.box_index)
        sp = np.asarray(self.grid.spacing_xyz)
        org = np.asarray(self.grid.origin_xyz)
        return org + (i0 - 0.5) * sp, org + (i1 + 0.5) * sp

    @property
    def box_fraction(self) -> float:
        """Fraction of the grid's voxels in the support's bounding box."""
        if self.box_index is None:
            return 1.0
        n = np.asarray(self.box_index[1]) - np.asarray(self.box_index[0]) + 1
        return float(np.prod(n) / self.grid.n_voxels)

    @property
    def faces_reached(self) -> list[str]:
        """The grid's faces the support reaches ("x-", "x+", "y-", ... in the grid's index axes).

        The object probably goes on beyond such a face: wider than the box (an object wider than the
        region every view sees) or cut by the detector along the axis. Its material outside the box is
        still in the line integrals, and a reconstruction confined to the box has to explain it with
        voxels inside, near that face. Empty when nothing was carved (no support, nothing to say)."""
        if self.box_index is None:
            return []
        faces = []
        for axis, name in enumerate("xyz"):
            if self.box_index[0][axis] <= 0:
                faces.append(f"{name}-")
            if self.box_index[1][axis] >= self.grid.shape_xyz[axis] - 1:
                faces.append(f"{name}+")
        return faces

    def summary(self) -> dict:
        """What `info` and run.json report."""
        out = {"found": self.found, "air_level": _r(self.air_level), "threshold": _r(self.threshold),
               "noise_sigma": _r(self.noise_sigma), "air_pixel_fraction": _r(self.air_pixel_fraction)}
        if self.found:
            lo, hi = self.bounds()
            out.update(box_lo_mm=[round(float(v), 3) for v in lo], box_hi_mm=[round(float(v), 3) for v in hi],
                       box_shape_xyz=[int(b - a + 1) for a, b in zip(*self.box_index)],
                       fraction=round(self.fraction, 4), box_fraction=round(self.box_fraction, 4),
                       grid_shape_xyz=list(self.grid.shape_xyz), faces_reached=self.faces_reached)
        else:
            out["reason"] = self.reason
        out.update(self.extra)
        return out

    def to_plain(self) -> dict | None:
        """The carved mask (bit-packed) and what it was carved on, as plain data for a checkpoint; None
        when nothing was carved. Export, surface and resume then reuse it instead of carving again
        (seconds on a clinical grid), and the field they evaluate keeps the support it was trained with."""
        if self.mask is None:
            return None
        return dict(grid=self.grid.to_dict(), mask=np.packbits(self.mask.reshape(-1)),
                    box_index=[list(map(int, b)) for b in self.box_index],
                    stats=dict(air_level=self.air_level, threshold=self.threshold, noise_sigma=self.noise_sigma,
                               air_pixel_fraction=self.air_pixel_fraction))

    @classmethod
    def from_plain(cls, value) -> "Support":
        """The Support of `to_plain`'s output; ValueError saying what is wrong when it is not one."""
        try:
            grid = VolumeGrid.from_dict(value["grid"])
            bits = np.asarray(value["mask"], dtype=np.uint8).reshape(-1)
            box = tuple(tuple(int(v) for v in b) for b in value["box_index"])
            stats = {k: (None if v is None else float(v)) for k, v in dict(value["stats"]).items()}
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"is not a carved support ({' '.join(str(exc).split())[:120]})") from None
        n = grid.n_voxels
        if len(bits) != (n + 7) // 8:
            raise ValueError(f"holds {len(bits)} bytes of mask for a grid of {n} voxels")
        mask = np.unpackbits(bits, count=n).astype(bool).reshape(grid.shape_zyx)
        if len(box) != 2 or any(len(b) != 3 for b in box) or not mask.any():
            raise ValueError("has no voxel in its mask, or its box is not two (x, y, z) index triples")
        if box != bounding_box(mask):
            raise ValueError("has a box that is not its mask's bounding box")
        known = ("air_level", "threshold", "noise_sigma", "air_pixel_fraction")
        return cls(grid, mask, box_index=box, **{k: stats.get(k) for k in known})

    def extended(self, extension) -> "Support":
        """This support on its grid grown by an `axial_extension.AxialExtension` (whole voxels at the two
        ends of one world axis; axis-aligned grids), for an object that goes on past them. The new slabs
        hold every cross-section the mask has along that axis (their union): what lies past a cut end
        is unknown, and carving must never remove object."""
        if self.mask is None or not self.grid.is_axis_aligned:
            return self
        dim = 2 - extension.axis  # the mask is stored (z, y, x)
        section = self.mask.any(axis=dim, keepdims=True)
        mask = np.concatenate([np.repeat(section, extension.voxels_low, axis=dim), self.mask,
                               np.repeat(section, extension.voxels_high, axis=dim)], axis=dim)
        grid = extension.grown(self.grid)
        return Support(grid, mask, box_index=bounding_box(mask), reason=self.reason, air_level=self.air_level,
                       threshold=self.threshold, noise_sigma=self.noise_sigma,
                       air_pixel_fraction=self.air_pixel_fraction,
                       extra=dict(self.extra, extended=extension.summary()))

    def mask_on(self, grid: VolumeGrid) -> np.ndarray | None:
        """The mask at another grid's voxel centres (nearest voxel; False outside this grid)."""
        if self.mask is None:
            return None
        if grid.is_axis_aligned and self.grid.is_axis_aligned:
            # separable: the nearest voxel index along each axis, then one gather
            index = []
            for a in range(3):
                w = grid.origin_xyz[a] + grid.spacing_xyz[a] * np.arange(grid.shape_xyz[a])
                k = np.rint((w - self.grid.origin_xyz[a]) / self.grid.spacing_xyz[a]).astype(np.int64)
                index.append((k, (k >= 0) & (k < self.grid.shape_xyz[a])))
            (kx, okx), (ky, oky), (kz, okz) = index
            out = self.mask[np.ix_(kz.clip(0, self.grid.shape_xyz[2] - 1), ky.clip(0, self.grid.shape_xyz[1] - 1),
                                   kx.clip(0, self.grid.shape_xyz[0] - 1))]
            return out & okz[:, None, None] & oky[None, :, None] & okx[None, None, :]
        pts = grid.world_points(np.float64).reshape(-1, 3)
        idx = np.linalg.solve(self.grid.index_to_world_matrix()[:3, :3],
                              (pts - np.asarray(self.grid.origin_xyz)).T).T
        idx = np.rint(idx).astype(np.int64)
        n = np.asarray(self.grid.shape_xyz)
        ok = np.all((idx >= 0) & (idx < n), axis=1)
        out = np.zeros(len(pts), dtype=bool)
        i = idx[ok]
        out[ok] = self.mask[i[:, 2], i[:, 1], i[:, 0]]
        return out.reshape(grid.shape_zyx)


def faces_warning(faces: list[str], grid: VolumeGrid, trained_past: bool = False) -> str | None:
    """One line for the user when the support reaches the faces of `grid` (the output grid), else None;
    `trained_past`: the training grid goes on past the box there (lateral_extension.py,
    axial_extension.py), so the material outside has voxels of its own and no rim is to be expected."""
    if not faces:
        return None
    shape = " ".join(str(n) for n in grid.shape_xyz)
    spacing = "/".join(f"{v:.4g}" for v in sorted(set(grid.spacing_xyz)))
    outside = ("the training grid goes on past the box there, so its material outside is trained but not output"
               if trained_past else
               "its material outside is still in the projections, so expect a brighter rim there")
    return (f"the object reaches the box's {', '.join(faces)} face(s): it probably goes on beyond the box "
            f"(wider than the region every view sees, or cut by the detector along the axis), and {outside}; "
            f"to reconstruct it too, give a larger box (now --grid-spacing {spacing} --grid-size {shape}: raise "
            "the counts of those axes; voxels outside the region every view sees are constrained by fewer views)")


def bounding_box(mask: np.ndarray) -> tuple:
    """((x0, y0, z0), (x1, y1, z1)): the inclusive voxel index range of the True voxels of a (z, y, x)
    mask (at least one)."""
    zz, yy, xx = np.nonzero(mask)
    return (int(xx.min()), int(yy.min()), int(zz.min())), (int(xx.max()), int(yy.max()), int(zz.max()))


def _r(v, digits: int = 6):
    return None if v is None else float(round(float(v), digits))


def _box3(images: np.ndarray) -> np.ndarray:
    """3x3 mean of each (view) image, edges replicated."""
    return ndimage.uniform_filter(np.asarray(images, dtype=np.float32), size=(1, 3, 3), mode="nearest")


def air_statistics(projections: np.ndarray, settings: SupportSettings = SupportSettings()) -> dict:
    """Air level, noise and decision threshold of the line integrals, or a reason there is no clear air.

    The air level is the lowest mode of the 3x3-mean line integrals: where no object is in the beam the
    detector sees the same level everywhere (zero after a perfect flat field, a little off it in
    practice), a sharp peak at the bottom of the histogram; object pixels spread over everything
    above it.
    """
    from .nerf.prior_weight import immerkaer_variance

    s = settings
    n = len(projections)
    pick = evenly_spaced(n, s.max_views_for_statistics)
    views = np.asarray(projections[pick], dtype=np.float32)
    smooth = _box3(views)
    flat = smooth.reshape(-1)
    p99 = float(np.percentile(flat, 99))
    lo = float(np.percentile(flat, 0.05))
    if not (p99 > lo):
        return dict(reason="the projections are constant: no object to carve around")
    scale = p99 - lo
    # the lowest fifth of the range holds air if there is any; its histogram's highest bin is the mode
    hist, edges = np.histogram(flat, bins=400, range=(lo, lo + 0.2 * scale))
    k = int(np.argmax(hist))
    width = edges[1] - edges[0]
    near = np.abs(flat - (edges[k] + width / 2)) <= 2 * width
    air_level = float(np.median(flat[near]))
    # the noise of single pixels in that population (Immerkaer: structure-free estimate), over the pixels
    # whose 3x3 mean lies within the air peak. The peak's width is the noise, not the histogram's bins:
    # below the air level there is only air, so the distances of the means below it are half-normal,
    # sigma = median / 0.6745 (the median, so that a few bad pixels far below do not widen it). A band of
    # a few bins alone was narrower than the noise on a noisy scan (a 48 px phantom at 1e4 photons:
    # 0.0007 against 0.0033), no pixel kept its whole 3x3 block in it, the noise came out 0, the
    # threshold fell to 1 % of p99 and noisy air at the detector's edges read as a truncated object.
    # Within views, not between them (nerf/prior_weight.between_view_variance): a gain pattern the flat field
    # left is how far from its level the air really reads, so the threshold must clear it too
    below = air_level - flat[flat < air_level]
    spread = float(np.median(below)) / 0.6745 if below.size else 0.0
    cand = np.abs(smooth - air_level) <= max(3 * width, 2 * spread)
    variance, n_used = immerkaer_variance(views, cand)
    sigma = math.sqrt(max(variance, 0.0))
    sigma_box = sigma / 3.0  # a 3x3 mean of independent noise
    threshold = air_level + max(s.noise_sigmas * sigma_box, s.relative_margin * p99)
    air = smooth <= threshold
    frac = float(air.mean())
    stats = dict(air_level=air_level, noise_sigma=sigma, threshold=float(threshold), p99=p99,
                 air_pixel_fraction=frac)
    if abs(air_level) > s.max_air_level * p99:
        stats["reason"] = (f"no clear air population: the lowest mode of the line integrals is {air_level:.4g}, "
                           f"far from zero against their 99th percentile {p99:.4g} (an object wider than the "
                           "detector, or projections not normalised to air)")
    elif air.sum() < max(s.min_air_pixels, s.min_air_fraction * air.size):
        stats["reason"] = (f"no clear air population: {int(air.sum())} of {air.size} examined pixels are at the "
                           "air level (the object fills the detector)")
    return stats


def air_masks(projections: np.ndarray, threshold: float) -> np.ndarray:
    """(views, rows, cols) bool: pixels that see air, with their whole 3x3 neighbourhood in air.

    At the detector's border the neighbourhood is what lies on the detector: a border pixel that
    measures air is air (a border pixel that sees object, as on a detector too short for the object,
    carves nothing)."""
    air = _box3(projections) <= threshold
    return ndimage.binary_erosion(air, structure=np.ones((1, 3, 3), dtype=bool), border_value=1)


def detector_edges_cut(projections: np.ndarray, threshold: float, min_fraction: float = 0.01) -> list[str]:
    """The detector's edges ("columns-", "columns+", "rows-", "rows+") along which the object goes on
    beyond the detector: at least `min_fraction` of that edge's pixels, over all views, see more than
    air (their 3x3 mean above the carving threshold). An object wider than the field of view cuts the
    column edges, one longer than the detector along the axis (or a table) the row edges. Its material
    beyond the detector is still in the line integrals, which no volume inside the field of view fits."""
    p = projections  # only the strips are read (and converted): a large scan is never copied whole
    outer = {"columns-": _box3(p[:, :, :2])[:, :, 0], "columns+": _box3(p[:, :, -2:])[:, :, -1],
             "rows-": _box3(p[:, :2, :])[:, 0, :], "rows+": _box3(p[:, -2:, :])[:, -1, :]}
    return [name for name, pixels in outer.items() if float((pixels > threshold).mean()) >= min_fraction]


def _view_affine(geometry: ConeBeamGeometry, view: int) -> tuple[np.ndarray, float]:
    """(3, 4) rows [col_num, row_num, w] and the depth sign: a world point p lands at detector
    (col, row) = (col_num . [p, 1], row_num . [p, 1]) / (w . [p, 1]) (in mm from the detector centre).

    Cone beam: the ray from the source s through p meets the detector plane (centre c, unit normal n,
    depth = (c - s) . n) at s + (depth / w) (p - s) with w = (p - s) . n, so both coordinates are ratios
    of affine functions of p. Parallel beam: w = 1 and the coordinates are affine."""
    u, v = geometry.det_u[view], geometry.det_v[view]
    c, s = geometry.det_centers[view], geometry.sources[view]
    normal = np.cross(u, v)
    normal = normal / np.linalg.norm(normal)
    rows = np.zeros((3, 4))
    if geometry.parallel:
        axis = (c - s) / np.linalg.norm(c - s)
        for m, e in enumerate((u, v)):
            # p + t axis on the plane: t = (c - p) . n / (axis . n); rel = p + t axis - c
            e_eff = e - normal * (axis @ e) / (axis @ normal)
            rows[m, :3], rows[m, 3] = e_eff, -(e_eff @ c)
        rows[2, 3] = 1.0
        return rows, 1.0
    depth = float((c - s) @ normal)
    rows[2, :3], rows[2, 3] = normal, -(normal @ s)
    for m, e in enumerate((u, v)):
        # rel . e = (s - c) . e + depth (p - s) . e / w
        rows[m, :3] = ((s - c) @ e) * normal + depth * e
        rows[m, 3] = ((s - c) @ e) * rows[2, 3] - depth * (e @ s)
    return rows, float(np.sign(depth))


def carve(geometry: ConeBeamGeometry, air: np.ndarray, grid: VolumeGrid, chunk_voxels: int = 1 << 20) -> np.ndarray:
    """(z, y, x) bool: voxel centres that no view shows in air (before the margin's dilation).

    Each view projects the voxel centres onto its detector; a centre landing on an air pixel (the
    nearest pixel) is carved; one landing off the detector, or behind the source, is left to the other
    views. The projection is a ratio of affine functions of the voxel index, evaluated separably
    (three broadcast axes), slab by slab of the grid so the temporaries stay small; the detector's
    air mask gets a border of non-air pixels, so a centre off the detector lands on the border."""
    import torch

    n_v, n_u = geometry.det_shape
    m = grid.index_to_world_matrix()
    nx, ny, nz = grid.shape_xyz
    views = [k for k in range(geometry.n_views) if air[k].any()]
    # well-spread views first (a golden-ratio stride): most air goes in the first few, and later views
    # only look at the block of the slab that is still kept
    n = len(views)
    if n > 2:
        stride = max(1, int(round(n / 1.618)))
        while math.gcd(stride, n) != 1:
            stride += 1
        views = [views[(i * stride) % n] for i in range(n)]
    plans = []
    for view in views:
        rows, sign = _view_affine(geometry, view)
        coef = rows[:, :3] @ m[:3, :3]
        const = rows[:, :3] @ m[:3, 3] + rows[:, 3]
        # col = (A0 . idx + b0) / (w pitch_u) + (n_u - 1) / 2 + 1 (the +1: the padded border), same for rows
        plans.append((coef, const, sign))
    padded = np.zeros((len(views), n_v + 2, n_u + 2), dtype=bool)
    padded[:, 1:-1, 1:-1] = air[views]
    air_t = torch.as_tensor(padded).reshape(len(views), -1)
    ii = torch.arange(nx, dtype=torch.float32).reshape(1, 1, nx)
    jj = torch.arange(ny, dtype=torch.float32).reshape(1, ny, 1)
    keep = np.ones(grid.shape_zyx, dtype=bool)
    step = max(1, chunk_voxels // max(1, nx * ny))
    for k0 in range(0, nz, step):
        kk = torch.arange(k0, min(nz, k0 + step), dtype=torch.float32).reshape(-1, 1, 1)
        slab = torch.ones((kk.shape[0], ny, nx), dtype=torch.bool)
        for v, (coef, const, sign) in enumerate(plans):
            plane = slab.any(dim=0) if slab.shape[0] > 1 else slab[0]
            ys, xs = torch.nonzero(plane.any(dim=1)).reshape(-1), torch.nonzero(plane.any(dim=0)).reshape(-1)
            if len(ys) == 0:
                break
            y0, y1, x0, x1 = int(ys[0]), int(ys[-1]) + 1, int(xs[0]), int(xs[-1]) + 1
            ib, jb = ii[..., x0:x1], jj[:, y0:y1]

            def affine(q, scale=1.0):
                # in-plane part (1, ny, nx) plus the slab's z part: one full-size add
                return (ib * float(coef[q, 0] * scale) + jb * float(coef[q, 1] * scale)) \
                    + (kk * float(coef[q, 2] * scale) + float(const[q] * scale))
            w = affine(2, sign)  # positive in front of the source
            inv = torch.where(w > 0, 1.0 / w, torch.full_like(w, float("inf")))
            col = (affine(0, sign / geometry.pixel_pitch[1]) * inv).add_((n_u - 1) / 2.0 + 1.0).round_()
            row = (affine(1, sign / geometry.pixel_pitch[0]) * inv).add_((n_v - 1) / 2.0 + 1.0).round_()
            col = torch.nan_to_num(col, nan=0.0, posinf=0.0, neginf=0.0).clamp_(0, n_u + 1)
            row = torch.nan_to_num(row, nan=0.0, posinf=0.0, neginf=0.0).clamp_(0, n_v + 1)
            idx = row.mul_(n_u + 2).add_(col).long()
            slab[:, y0:y1, x0:x1] &= ~air_t[v][idx]
        keep[k0:k0 + kk.shape[0]] = slab.numpy()
    return keep


def object_support(projections: np.ndarray, geometry: ConeBeamGeometry, grid: VolumeGrid,
                   settings: SupportSettings = SupportSettings(), stats: dict | None = None) -> Support:
    """Carve the object's support on `grid` from the line integrals (views, rows, cols); `stats`:
    their `air_statistics` with these settings when the caller has them already."""
    if stats is None:
        stats = air_statistics(projections, settings)
    common = dict(air_level=stats.get("air_level"), threshold=stats.get("threshold"),
                  noise_sigma=stats.get("noise_sigma"), air_pixel_fraction=stats.get("air_pixel_fraction"))
    if "reason" in stats:
        return Support(grid, None, reason=stats["reason"], **common)
    air = air_masks(projections, stats["threshold"])
    kept = carve(geometry, air, grid)
    if settings.margin_voxels > 0 and kept.any():
        kept = ndimage.binary_dilation(kept, structure=np.ones((3, 3, 3), dtype=bool),
                                       iterations=settings.margin_voxels)
    if not kept.any():
        return Support(grid, None, reason="every voxel was carved: the projections show no object", **common)
    if kept.all():
        return Support(grid, None, reason="nothing was carved: every voxel is seen through object in every view",
                       **common)
    return Support(grid, kept, box_index=bounding_box(kept), **common)
