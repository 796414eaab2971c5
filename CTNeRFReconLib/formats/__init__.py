"""Reading scans in the common formats, detected from the data itself.

``load_scan(path)`` recognises:

* a NAF pickle (dict with 'train' projections/angles and TIGRE fields in NAF's order) or a TIGRE
  pickle (TIGRE Python fields + 'angles' + 'projections'), by the pickle's content; pickles are
  read with a restricted unpickler that never runs code;
* an R2-Gaussian folder (meta_data.json with a 'scanner' block + proj_train/*.npy);
* an RTK case (ThreeDCircularProjectionGeometry XML + projection stack [u, v, view]);
* our stack + JSON/YAML description (see :mod:`.stack`), line integrals or raw intensities.

A folder is searched for exactly one of these; a projection image given directly is paired
with the RTK XML beside it. Everything else is refused with a ScanFormatError.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..data import ScanData
from .r2gaussian import load_r2gaussian
from .rtk import IMAGE_SUFFIXES, is_rtk_xml, load_rtk, read_rtk_geometry_xml, write_rtk_case
from .safe_pickle import safe_load
from .stack import load_stack, read_description, write_stack
from .tigre import naf_to_scan, tigre_dict_to_scan
from .validate import ScanFormatError

__all__ = ["load_scan", "describe", "ScanFormatError", "write_rtk_case", "write_stack"]

_PICKLE_SUFFIXES = (".pickle", ".pkl")
_DESC_SUFFIXES = (".json", ".yaml", ".yml")


def _looks_like_pickle(path: Path) -> bool:
    with open(path, "rb") as fh:
        head = fh.read(2)
    return (len(head) == 2 and head[0] == 0x80 and 2 <= head[1] <= 5) or path.suffix.lower() in _PICKLE_SUFFIXES


def _load_pickle(path: Path) -> ScanData:
    data = safe_load(path)
    if not isinstance(data, dict):
        raise ScanFormatError(path, "pickle", f"holds a {type(data).__name__}, expected a dict of fields",
                              "store a NAF-style dict (DSD, DSO, ..., 'train') or TIGRE fields + projections")
    if "train" in data:
        return naf_to_scan(data, path)
    if "projections" in data or "geo" in data:
        return tigre_dict_to_scan(data, path)
    raise ScanFormatError(path, "train", f"the dict has neither 'train' (NAF) nor 'projections' (TIGRE); keys: "
                          f"{sorted(map(str, data))[:12]}", "store projections under 'train' (NAF) or 'projections'")


def _description_kind(path: Path) -> str | None:
    try:
        desc = read_description(path)
    except ScanFormatError:
        return None
    if "scanner" in desc and "proj_train" in desc:
        return "r2gaussian"
    if "geometry" in desc and "projections" in desc:
        return "stack"
    return None


def _load_file(path: Path, projections) -> ScanData:
    if path.stat().st_size == 0:
        raise ScanFormatError(path, "file", "is empty (truncated download or failed write?)", "copy the file again")
    if _looks_like_pickle(path):
        return _load_pickle(path)
    if path.suffix.lower() == ".xml":
        if is_rtk_xml(path):
            return load_rtk(path, projections)
        read_rtk_geometry_xml(path)  # names what is wrong: not well-formed (where), or another root element
        raise ScanFormatError(path, "root", "is not an RTK ThreeDCircularProjectionGeometry XML (or not "
                              "well-formed)", "give RTK's geometry file, written by rtksimulatedgeometry or "
                              "ThreeDCircularProjectionGeometryXMLFileWriter")
    if path.suffix.lower() in _DESC_SUFFIXES:
        desc = read_description(path)
        if "scanner" in desc:
            return load_r2gaussian(path)
        if "geometry" in desc or "projections" in desc:
            return load_stack(path)
        raise ScanFormatError(path, "geometry", f"is neither our scan description nor R2-Gaussian's meta data "
                              f"(keys: {sorted(desc)[:12]})", "add 'projections' and 'geometry' (docs/formats.md)")
    if any(path.name.lower().endswith(s) for s in IMAGE_SUFFIXES):
        xmls = [p for p in sorted(path.parent.glob("*.xml")) if is_rtk_xml(p)]
        if len(xmls) == 1:
            return load_rtk(xmls[0], projections or path)
        raise ScanFormatError(path, "geometry", "a projection stack needs its geometry: "
                              + ("no RTK XML beside it" if not xmls else f"{len(xmls)} RTK XML files beside it"),
                              "give the geometry file (RTK XML or our JSON/YAML naming this stack) instead")
    raise ScanFormatError(path, "format", "unknown format", "give a NAF/TIGRE pickle, an R2-Gaussian folder, an "
                          "RTK geometry XML with its stack, or a JSON/YAML scan description")


def _near_miss(folder: Path, files: list[Path], projections) -> ScanData | None:
    """A folder with no scan found may still hold a file meant as one: a geometry.xml that does not parse, a
    scan description missing its keys (or R2-Gaussian's meta data under another name, which loads). "No scan
    found" would hide what is wrong with it, so one such file is loaded: its scan, or its own error (which
    names its field); several are named. None when there is none."""
    misses = [p for p in files if p.suffix.lower() in (".xml",) + _DESC_SUFFIXES and p.name != "meta_data.json"]
    if len(misses) == 1:
        return _load_file(misses[0], projections)
    if misses:
        names = ", ".join(p.name for p in misses[:6])
        raise ScanFormatError(folder, "format", f"no scan found in this folder: none of {names} is an RTK "
                              "geometry XML or a scan description (JSON/YAML with 'geometry' and 'projections')",
                              "give the file meant as the scan itself, to see what is wrong with it")
    return None


def _load_folder(path: Path, projections) -> ScanData:
    if (path / "meta_data.json").exists():
        return load_r2gaussian(path)
    files = sorted(p for p in path.iterdir() if p.is_file())
    xmls = [p for p in files if p.suffix.lower() == ".xml" and is_rtk_xml(p)]
    descs = [p for p in files if p.suffix.lower() in _DESC_SUFFIXES and _description_kind(p) == "stack"]
    pickles = [p for p in files if p.suffix.lower() in _PICKLE_SUFFIXES]
    found = [("RTK geometry", xmls), ("scan description", descs), ("pickle", pickles)]
    candidates = [(kind, p) for kind, ps in found for p in ps]
    if len(candidates) == 1:
        kind, p = candidates[0]
        return load_rtk(p, projections) if kind == "RTK geometry" else _load_file(p, projections)
    if not candidates:
        found = _near_miss(path, files, projections)
        if found is not None:
            return found
        raise ScanFormatError(path, "format", "no scan found in this folder (no meta_data.json, RTK geometry "
                              "XML, scan JSON/YAML or pickle)", "give the scan file itself, or a folder holding one")
    names = ", ".join(f"{p.name} ({kind})" for kind, p in candidates[:6])
    raise ScanFormatError(path, "format", f"several scans found: {names}", "give the file to load instead of the folder")


def load_scan(path, projections=None, drop_views=(), keep_bad_views: bool = False) -> ScanData:
    """Load a scan from a file or folder, detecting its format from the content.

    ``projections`` names the stack of an RTK case when it is neither projections.* nor the
    only image beside the XML. ``drop_views`` (indices into the data) are left out
    (`ScanData.without_views`). A view with nothing to fit (`ScanData.bad_views`: a dropped frame, a
    view mostly without values) that is not left out is refused, naming `--drop-views`, unless
    ``keep_bad_views`` (for looking at the data: `info`, the panel's projection stack).
    """
    path = Path(path)
    if not path.exists():
        raise ScanFormatError(path, "path", "does not exist", "check the path")
    try:
        scan = _load_folder(path, projections) if path.is_dir() else _load_file(path, projections)
    except OSError as exc:  # unreadable: permissions, a folder where a file belongs, I/O errors
        raise ScanFormatError(exc.filename or path, "file", f"cannot be read ({exc.strerror or exc})",
                              "check that the file exists and that you may read it (permissions)") from None
    except ScanFormatError:
        raise
    except _UNEXPECTED as exc:  # a reader met content no check foresaw: still a refusal naming the file
        raise _unforeseen(path, exc) from None
    if not keep_bad_views:
        refuse_bad_views(scan, drop_views)
    return scan.without_views(drop_views) if len(drop_views) else scan


def refuse_bad_views(scan: ScanData, drop_views=()) -> None:
    """A ScanFormatError for views with nothing to fit (`ScanData.bad_views`) that `drop_views` does not
    leave out, with the `--drop-views` that does; held-out views the same, to be removed from the file."""
    dropped = {int(v) for v in drop_views}
    bad = {v: why for v, why in scan.bad_views.items() if v not in dropped}
    if bad:
        what = "; ".join(f"view {v} {why}" for v, why in list(bad.items())[:5]) + ("; ..." if len(bad) > 5 else "")
        views = " ".join(str(v) for v in sorted(dropped | set(bad)))
        raise ScanFormatError(scan.projections_file or scan.source_path, "projections",
                              f"{what}: nothing there to reconstruct from",
                              f"leave {'it' if len(bad) == 1 else 'them'} out with `--drop-views {views}` (in "
                              "Slicer: Leave out views), or repair the data (a log of zero or negative counts "
                              "gives NaN/inf: check the dark and flat correction)")
    held = scan.validation.bad_views if scan.validation is not None else {}
    if held:
        what = "; ".join(f"held-out view {v} {why}" for v, why in list(held.items())[:5])
        raise ScanFormatError(scan.source_path, "validation projections", f"{what}: it cannot be scored",
                              "remove the broken held-out views (and their angles) from the file")


_UNEXPECTED = (ValueError, TypeError, KeyError, IndexError, AttributeError, OverflowError, RecursionError,
               ZeroDivisionError, MemoryError, RuntimeError, UnicodeError)
"""What a reader may raise on content its checks did not foresee (the fuzz corpus in Testing/fuzz
holds every case found so far, each also fixed where it arose)."""


def _unforeseen(path: Path, exc: BaseException) -> ScanFormatError:
    text = " ".join(str(exc).split())[:200] or "no detail"
    if isinstance(exc, MemoryError):
        problem = "needs more memory than is available to read"
    elif isinstance(exc, RecursionError):
        problem = "is nested too deeply to read"
    else:
        problem = f"holds content that cannot be interpreted ({type(exc).__name__}: {text})"
    return ScanFormatError(path, "file", problem, "check the file against the schema in docs/formats.md, "
                           "or write it again with the tool that made it")


_FORMAT_WORDS = {
    "naf": "a NAF pickle (TIGRE geometry in NAF's field order, projections row-flipped)",
    "tigre": "a TIGRE pickle (TIGRE Python field order, projections as tigre.Ax returns them)",
    "r2gaussian": "an R2-Gaussian folder (meta_data.json + per-view .npy projections)",
    "rtk": "an RTK case (ThreeDCircularProjectionGeometry XML + projection stack)",
}


def describe(scan: ScanData) -> dict:
    """What was detected, in words (``description``) and as numbers (``summary``), for `info`."""
    s = scan.summary()
    g = scan.geometry
    fmt = _FORMAT_WORDS.get(scan.source_format, f"our {scan.source_format} scan description")
    lines = [f"Detected {fmt}: {scan.source_path}",
             f"{scan.n_views} views of {g.det_shape[0]} rows x {g.det_shape[1]} columns, pixel pitch "
             f"{g.pixel_pitch[0]:g} x {g.pixel_pitch[1]:g} mm (row x col)",
             ("parallel beam" if g.parallel else
              f"cone beam, source-detector {s['source_detector_mm'][0]:.1f}..{s['source_detector_mm'][1]:.1f} mm, "
              f"source-centre {np.linalg.norm(g.sources, axis=1).min():.1f} mm")
             + f", frame '{g.frame}'"]
    if g.angles is not None:
        lines.append(f"angles {s['angles_deg'][0]:.2f}..{s['angles_deg'][1]:.2f} deg")
    lines.append(f"line integrals range {s['projection_range'][0]:.3g}..{s['projection_range'][1]:.3g}")
    if scan.grid is not None:
        lines.append(f"prescribed grid {list(scan.grid.shape_xyz)} voxels (x, y, z) of "
                     f"{[round(v, 4) for v in scan.grid.spacing_xyz]} mm")
    if scan.reference is not None:
        lines.append(f"reference volume {list(scan.reference.grid.shape_xyz)} voxels (x, y, z)")
    if scan.validation is not None:
        lines.append(f"{scan.validation.n_views} held-out validation views")
    lines.extend(scan.notes)
    return dict(description="\n".join(lines), summary=json.loads(json.dumps(s, default=float)))
