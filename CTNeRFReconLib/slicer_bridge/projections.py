"""A projection stack as a volume node, to scroll through the views in a slice viewer.

The stack (view, row, col) becomes a volume whose slices are the views: IJK = (col, row, view)
maps to RAS through ``diag(-pitch_u, -pitch_v, 1)``, so in the axial (red) viewer each slice is one
view seen as an image: column 0 on the left, row 0 at the top (the LPS placement of an ITK image,
as Slicer shows a 2D stack file), and scrolling moves from view to view. It is a picture of the
data, not placed in the scanner frame.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..data import ScanData, Volume
from ..geometry import VolumeGrid
from ..nerf.prior_weight import FIXED_PATTERN_SAY_RATIO
from . import volume_nodes as vn


def projection_volume(scan: ScanData) -> Volume:
    """The stack as a Volume whose grid puts views along k and pixels at their pitch."""
    pitch_v, pitch_u = scan.geometry.pixel_pitch
    v, rows, cols = scan.projections.shape
    grid = VolumeGrid((cols, rows, v), (pitch_u, pitch_v, 1.0), (0.0, 0.0, 0.0))
    return Volume(np.ascontiguousarray(scan.projections, dtype=np.float32), grid)


def load_scan_file(path, projections=None) -> ScanData:
    """Read a scan in any format the engine detects (numpy, SimpleITK, yaml needed in this Python). Views
    with nothing to fit (a dropped frame) are kept: the panel shows the stack so the user can look at them;
    the run refuses them until they are left out (`ScanData.bad_views`)."""
    try:
        from ..formats import load_scan
    except ImportError as exc:
        raise ValueError(f"reading scans in this Python needs the package '{exc.name}'; install the engine's "
                         "dependencies (see the module's setup)") from None
    return load_scan(Path(path), projections=None if projections is None else Path(projections), keep_bad_views=True)


def _span(values, unit: str) -> str:
    lo, hi = float(min(values)), float(max(values))
    return f"{lo:.4g} {unit}" if abs(hi - lo) <= 1e-6 * max(1.0, abs(hi)) else f"{lo:.4g}-{hi:.4g} {unit}"


def describe_scan(scan: ScanData) -> str:
    """What the engine understood of a scan, in one line for the panel: format, views, detector,
    angles and distances, e.g. ``rtk: 40 views, detector 128 x 128 pixels of 2.4 mm, angles 0-351 deg,
    source-isocentre 1000 mm, source-detector 1500 mm``."""
    return describe_summary(scan.summary())


def describe_summary(summary: dict) -> str:
    """The same line from a scan's summary (`ScanData.summary`, what ``info --json`` prints), so the
    panel can read the scan in a subprocess and word it here."""
    rows, cols = summary["detector_rows_cols"]
    pitch_v, pitch_u = summary["pixel_pitch_mm"]
    pitch = f"{pitch_u:.3g} mm" if abs(pitch_u - pitch_v) < 1e-9 else f"{pitch_u:.3g} x {pitch_v:.3g} mm"
    parts = [f"{summary['format']}: {summary['views']} views", f"detector {rows} x {cols} pixels of {pitch}"]
    if summary.get("angles_deg"):
        parts.append("angles " + _span(summary["angles_deg"], "deg"))
    if summary.get("parallel"):
        parts.append("parallel beam")
    else:
        parts.append("source-isocentre " + _span(summary["source_isocentre_mm"], "mm"))
        parts.append("source-detector " + _span(summary["source_detector_mm"], "mm"))
    if summary.get("displaced_detector"):
        parts.append(f"detector displaced {summary['displaced_detector']['offset_mm']:.4g} mm on a full orbit "
                     "(half-fan: the whole circle it measures is reconstructed)")
    if summary.get("defect_pixels"):
        parts.append(f"{summary['defect_pixels']} pixel readings without a measurement (dead pixels: left out "
                     "of the fit)")
    noise = summary.get("air_noise") or {}
    pattern, photons = noise.get("fixed_pattern_rms"), noise.get("photon_sigma")
    if pattern and photons and pattern > FIXED_PATTERN_SAY_RATIO * photons:  # `info` measures it
        parts.append(f"a gain pattern the flat field left ({100 * pattern:.1f} % rms, {pattern / photons:.1f} x the "
                     "photon noise): rings are likely; a new flat field (gain calibration) removes them")
    bad = summary.get("bad_views") or {}
    if bad:
        views = ", ".join(sorted(bad, key=int))
        named = sorted(bad.items(), key=lambda item: int(item[0]))[:3]
        parts.append("; ".join(f"view {v} {why}" for v, why in named) + ": nothing to reconstruct from; Start "
                     f"refuses the scan until Advanced > Leave out views holds {views}")
    return ", ".join(parts)


def create_projection_node(scene, scan: ScanData, name: str = "projections", node=None):
    """A scalar volume node showing the line-integral stack, one view per axial slice."""
    volume = projection_volume(scan)
    if node is None:
        node = vn.create_volume_node(scene, volume, name)
    else:
        vn.update_volume_node(node, volume)
    node.SetAttribute("CTNeRFRecon.Role", "projections")
    node.SetAttribute("CTNeRFRecon.Views", str(scan.n_views))
    return node
