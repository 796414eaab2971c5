"""Our own scan description: a projection stack plus a small JSON/YAML geometry file.

Schema (unknown fields are refused, so a typo never silently falls back to a default)::

    projections: proj.mha            # required. .npy (views, rows, cols) or an image SimpleITK reads
                                     # (MHA/NRRD/NIfTI/TIFF, stored [u, v, view] as RTK does)
    kind: line_integral              # or 'intensity': raw counts, converted to -log(I / I0)
    i0: 10000                        # intensity only: open-beam counts ...
    flat: flat.mha                   # ... or a flat (open beam) image / stack, path or number
    dark: dark.mha                   # optional dark image / stack, path or number
    geometry:                        # required, one of:
      type: circular                 #   a circular orbit from a few numbers
      sid: 1000                      #   source -> rotation axis, mm
      sdd: 1500                      #   source -> detector, mm
      angles_deg: [0, 7.2, ...]      #   one per view
      pixel_pitch: [0.8, 0.8]        #   [row (v), col (u)] in mm (or one number); default: the image spacing
      detector_shape: [256, 256]     #   optional, checked against the data [rows, cols]
      detector_offset: [0, 0]        #   [v, u] shift of the detector centre in its plane, mm
      axis: y                        #   'y': RTK frame (default), 'z': TIGRE frame as NAF/R2 store it
      parallel: false
    # or
      type: vectors                  #   one entry per view, mm, any frame
      sources: [[x, y, z], ...]      #   (parallel: any point behind the detector centre)
      det_centers: [[x, y, z], ...]  #   centre of the pixel array
      det_u: [[...], ...]            #   unit vector along increasing column
      det_v: [[...], ...]            #   unit vector along increasing row
      pixel_pitch: [0.8, 0.8]
      angles_deg: [...]              #   optional
      parallel: false
      frame: scanner                 #   optional name
    grid: {shape_xyz: [..], spacing_xyz: [..], origin_xyz: [..]}   # optional reconstruction grid
    reference: ref.nrrd              # optional ground-truth volume
    format: ctnerf-scan              # optional tag; version: 1; description: free text

Relative paths are taken from the folder of the JSON/YAML file.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ..data import ScanData
from ..geometry import ConeBeamGeometry, VolumeGrid, circular_geometry
from .rtk import IMAGE_SUFFIXES, read_stack
from .validate import (ScanFormatError, as_float_array, check_circular_distances, check_exists, check_geometry,
                       check_projections, intensities_to_line_integrals, load_npy, require)

TOP_FIELDS = {"projections", "kind", "i0", "flat", "dark", "geometry", "grid", "reference", "format",
              "version", "description"}
CIRCULAR_FIELDS = {"type", "sid", "sdd", "angles_deg", "pixel_pitch", "detector_shape", "detector_offset",
                   "axis", "parallel"}
VECTOR_FIELDS = {"type", "sources", "det_centers", "det_u", "det_v", "pixel_pitch", "detector_shape",
                 "angles_deg", "parallel", "frame"}
GRID_FIELDS = {"shape_xyz", "spacing_xyz", "origin_xyz", "direction"}
MAX_DESCRIPTION_BYTES = 64 << 20
"""A description larger than this is refused unread (per-view vectors take ~200 bytes a view)."""


MAX_YAML_VALUES = 10_000_000


class _RecursiveYamlAlias(Exception):
    """A YAML value that contains an alias to itself (`- &a [*a]`); `line` is where the value starts."""

    def __init__(self, line: int):
        super().__init__(line)
        self.line = line


def _yaml_children(node) -> list:
    """The nodes directly inside a composed node: items of a sequence, keys and values of a mapping."""
    if not isinstance(node.value, list):  # a scalar holds a str
        return []
    out = []
    for item in node.value:
        out.extend(item if isinstance(item, tuple) else (item,))
    return out


def _yaml_expanded_size(root) -> int:
    """Values a composed YAML document stands for once its aliases are expanded (shared nodes counted
    each time they are referenced), without expanding them; raises _RecursiveYamlAlias on a cycle.

    Why this way: a scan description needs at most a few plain aliases (yaml.safe_dump writes them
    for shared lists), never a value that contains itself. So the composed graph is walked once,
    depth first, keeping the nodes on the current path: meeting one of them again is a recursive
    alias, refused; a finished node's size is memoised, so shared nodes cost nothing more. Each node
    and each edge is visited once (linear time); an alias bomb stops the walk at MAX_YAML_VALUES.
    """
    if root is None:
        return 0
    done: dict[int, int] = {}   # id(node) -> expanded size, for finished nodes
    on_path: set[int] = set()   # ids of the nodes being walked (the current path from the root)
    stack = [(root, iter(_yaml_children(root)))]
    sizes = [1]                 # running size of each node on the stack
    on_path.add(id(root))
    while stack:
        node, children = stack[-1]
        child = next(children, None)
        if child is None:
            stack.pop()
            on_path.discard(id(node))
            size = sizes.pop()
            done[id(node)] = size
            if sizes:
                sizes[-1] += size
                if sizes[-1] > MAX_YAML_VALUES:
                    return sizes[-1]
            continue
        if id(child) in done:
            sizes[-1] += done[id(child)]
            if sizes[-1] > MAX_YAML_VALUES:
                return sizes[-1]
        elif id(child) in on_path:
            raise _RecursiveYamlAlias(child.start_mark.line + 1 if child.start_mark else 0)
        else:
            on_path.add(id(child))
            stack.append((child, iter(_yaml_children(child))))
            sizes.append(1)
    return done[id(root)]


def read_description(path: Path) -> dict:
    """Parse a JSON or YAML file into a dict, refusing unreadable content."""
    check_exists(path, "description")
    is_yaml = path.suffix.lower() in (".yaml", ".yml")
    if is_yaml:
        # imported here, not at the top: Slicer's own Python has no PyYAML, and it reads every other format
        try:
            import yaml
        except ImportError:
            raise ScanFormatError(path, "file", "is YAML, and PyYAML is not installed in this Python",
                                  "install it (pip install pyyaml), or write the description as JSON") from None
        parse_errors = (yaml.YAMLError,)
    else:
        parse_errors = ()
    size = path.stat().st_size
    if size > MAX_DESCRIPTION_BYTES:
        raise ScanFormatError(path, "file", f"is {size / 2**20:.0f} MiB; a scan description is a few numbers per view "
                              f"(limit {MAX_DESCRIPTION_BYTES >> 20} MiB)", "give the JSON/YAML description of the scan")
    try:
        text = path.read_text()
        if is_yaml:
            # aliases (*name) let a few bytes stand for a huge nested value: count the values they expand to
            # first. Only the safe loader is used: tags such as !!python/object are refused by it.
            try:
                expanded = _yaml_expanded_size(yaml.compose(text, Loader=yaml.SafeLoader))
            except _RecursiveYamlAlias as rec:
                raise ScanFormatError(path, "file", f"the YAML value anchored (&name) at line {rec.line} contains an "
                                      "alias (*name) to itself, a value without end; refused",
                                      "write the values out; an alias may only repeat a value defined "
                                      "before it, not one it is inside") from None
            if expanded > MAX_YAML_VALUES:
                raise ScanFormatError(path, "file", f"its YAML aliases (*name) expand to more than {MAX_YAML_VALUES} "
                                      "values; refused (an alias bomb)", "write the values out without nested aliases")
            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except (ValueError, UnicodeDecodeError, RecursionError, *parse_errors) as exc:
        if isinstance(exc, ScanFormatError):
            raise
        raise ScanFormatError(path, "file", f"cannot be parsed ({type(exc).__name__}: {' '.join(str(exc).split())[:200]})",
                              "the file is truncated or not valid JSON/YAML; fix its syntax") from None
    if not isinstance(data, dict):
        raise ScanFormatError(path, "file", "top level is not a mapping", "write a JSON object / YAML mapping")
    return data


def _unknown(d: dict, allowed: set, file, where: str):
    extra = sorted(set(d) - allowed)
    if extra:
        raise ScanFormatError(file, f"{where}{extra[0]}", f"unknown field(s) {extra}",
                              f"remove or correct them; allowed: {sorted(allowed)}")


def _load_array(value, base: Path, file, field: str):
    """A number, or an array from a .npy / image file (images come back as (views, rows, cols))."""
    if isinstance(value, (int, float)):
        return float(value), None
    if not isinstance(value, str):
        raise ScanFormatError(file, field, f"must be a file name or a number, got {type(value).__name__}",
                              "give a path relative to this file")
    path = check_exists(base / value, field)
    if path.suffix.lower() == ".npy":
        return load_npy(path, field, "the file is truncated or holds objects; save a plain numeric array"), None
    if any(path.name.lower().endswith(s) for s in IMAGE_SUFFIXES):
        img = read_stack(path, field)
        return sitk.GetArrayFromImage(img), img
    raise ScanFormatError(path, field, f"unsupported file type '{path.suffix}'",
                          "give .npy or an image file (.mha, .nrrd, .nii.gz, .tif)")


def _geometry(geo: dict, shape, image, file) -> ConeBeamGeometry:
    kind = require(geo, "type", file, where="geometry.", fix="add geometry.type: circular or vectors")
    n_views, n_rows, n_cols = shape
    if kind not in ("circular", "vectors"):
        raise ScanFormatError(file, "geometry.type", f"unknown type {kind!r}", "use 'circular' or 'vectors'")
    _unknown(geo, CIRCULAR_FIELDS if kind == "circular" else VECTOR_FIELDS, file, "geometry.")
    if "pixel_pitch" in geo:
        pitch = as_float_array(geo["pixel_pitch"], file, "geometry.pixel_pitch", positive=True).reshape(-1)
        if pitch.size == 1:
            pitch = np.repeat(pitch, 2)
        if pitch.size != 2:
            raise ScanFormatError(file, "geometry.pixel_pitch", f"has {pitch.size} values", "give [row, col] or one number")
    elif image is not None:
        pitch = np.array([image.GetSpacing()[1], image.GetSpacing()[0]])
    else:
        raise ScanFormatError(file, "geometry.pixel_pitch", "required field is missing",
                              "give the detector pixel size [row, col] in mm")
    if "detector_shape" in geo:
        ds = as_float_array(geo["detector_shape"], file, "geometry.detector_shape", shape=(2,), positive=True)
        if (int(ds[0]), int(ds[1])) != (n_rows, n_cols):
            raise ScanFormatError(file, "geometry.detector_shape", f"says {ds.astype(int).tolist()} but the "
                                  f"projections are {[n_rows, n_cols]} (rows, cols)", "correct it or drop it")
    parallel = bool(geo.get("parallel", False))
    angles = None
    if "angles_deg" in geo or kind == "circular":
        angles = as_float_array(require(geo, "angles_deg", file, where="geometry."), file,
                                "geometry.angles_deg").reshape(-1)
        if angles.size != n_views:
            raise ScanFormatError(file, "geometry.angles_deg", f"has {angles.size} angles for {n_views} projections",
                                  "give one angle per projection")
        angles = np.radians(angles)
    if kind == "circular":
        sid = float(as_float_array(require(geo, "sid", file, where="geometry."), file, "geometry.sid"))
        sdd = float(as_float_array(require(geo, "sdd", file, where="geometry."), file, "geometry.sdd"))
        if not parallel:
            check_circular_distances(sid, sdd, file, "geometry.sid", "geometry.sdd")
        off = as_float_array(geo.get("detector_offset", [0.0, 0.0]), file, "geometry.detector_offset", shape=(2,))
        axis = geo.get("axis", "y")
        if axis not in ("y", "z"):
            raise ScanFormatError(file, "geometry.axis", f"unknown axis {axis!r}", "use 'y' (RTK) or 'z' (TIGRE)")
        return circular_geometry(sid, sdd, angles, (n_rows, n_cols), tuple(pitch), det_offset=tuple(off),
                                 axis=axis, parallel=parallel)
    vecs = {}
    for name in ("sources", "det_centers", "det_u", "det_v"):
        vecs[name] = as_float_array(require(geo, name, file, where="geometry."), file, f"geometry.{name}")
        if vecs[name].shape != (n_views, 3):
            raise ScanFormatError(file, f"geometry.{name}", f"has shape {list(vecs[name].shape)}, expected "
                                  f"[{n_views}, 3] (one 3-vector per projection)", "give one vector per view")
    return ConeBeamGeometry(vecs["sources"], vecs["det_centers"], vecs["det_u"], vecs["det_v"], (n_rows, n_cols),
                            tuple(pitch), angles=angles, parallel=parallel, frame=str(geo.get("frame", "scanner")))


def load_stack(path) -> ScanData:
    """Load our JSON/YAML scan description and the files it names."""
    path = Path(path)
    desc = read_description(path)
    _unknown(desc, TOP_FIELDS, path, "")
    base = path.parent
    kind = desc.get("kind", "line_integral")
    if kind not in ("line_integral", "intensity"):
        raise ScanFormatError(path, "kind", f"unknown kind {kind!r}", "use 'line_integral' or 'intensity'")
    raw, image = _load_array(require(desc, "projections", path), base, path, "projections")
    notes = [f"stack + {path.suffix.lstrip('.').upper()} geometry ({path.name})"]
    if kind == "intensity":
        extra = {}
        for key in ("flat", "dark"):
            if key in desc:
                extra[key] = _load_array(desc[key], base, path, key)[0]
        proj = intensities_to_line_integrals(raw, path, "projections", i0=desc.get("i0"), **extra)
        notes.append("raw intensities converted to line integrals -log(I/I0) "
                     + ("with flat/dark fields" if "flat" in extra else f"with I0 = {desc.get('i0')}"))
    else:
        for key in ("i0", "flat", "dark"):
            if key in desc:
                raise ScanFormatError(path, key, "is only meaningful for intensity data",
                                      "set kind: intensity, or remove it")
        proj = np.asarray(raw)
    proj = check_projections(proj, base / desc["projections"], "projections")
    geom = _geometry(require(desc, "geometry", path), proj.shape, image, path)
    grid = None
    if desc.get("grid") is not None:
        g = desc["grid"]
        if not isinstance(g, dict):
            raise ScanFormatError(path, "grid", "is not a mapping", "give shape_xyz, spacing_xyz, origin_xyz")
        _unknown(g, GRID_FIELDS, path, "grid.")
        for key in ("shape_xyz", "spacing_xyz", "origin_xyz"):
            as_float_array(require(g, key, path, where="grid."), path, f"grid.{key}", shape=(3,),
                           positive=key != "origin_xyz")
        grid = VolumeGrid.from_dict(g)
    check_geometry(geom, path, grid)
    reference = None
    if desc.get("reference"):
        from ..volume_io import read_input_volume
        reference = read_input_volume(check_exists(base / desc["reference"], "reference"), "reference",
                                      f"repair the ground-truth volume, or remove 'reference' from {path.name}")
    return ScanData(proj, geom, "stack+" + path.suffix.lstrip(".").lower(), str(path), grid=grid,
                    reference=reference, notes=notes, projections_file=str(base / desc["projections"]))


def write_stack(scan: ScanData, json_path, projections_name: str = "projections.npy") -> Path:
    """Write scan as our JSON (per-view vectors, exact) with a .npy stack beside it."""
    json_path = Path(json_path)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    np.save(json_path.parent / projections_name, np.asarray(scan.projections, dtype=np.float32))
    g = scan.geometry
    geo = dict(type="vectors", sources=g.sources.tolist(), det_centers=g.det_centers.tolist(),
               det_u=g.det_u.tolist(), det_v=g.det_v.tolist(), pixel_pitch=list(g.pixel_pitch),
               detector_shape=list(g.det_shape), parallel=g.parallel, frame=g.frame)
    if g.angles is not None:
        geo["angles_deg"] = np.degrees(g.angles).tolist()
    desc = dict(format="ctnerf-scan", version=1, projections=projections_name, geometry=geo)
    if scan.grid is not None:
        desc["grid"] = scan.grid.to_dict()
    json_path.write_text(json.dumps(desc, indent=1))
    return json_path
