"""Closed iso-surface models of a reconstruction, in the scanner frame (mm).

The surface is extracted from the attenuation sampled on a grid (the run's field evaluated at any
voxel size by field_export, so finer than the output grid when asked, or any volume), by VTK:

1. the volume is padded with one voxel below the threshold on every side, so the surface closes
   where the object touches the box (a closed, watertight surface has an enclosed volume);
2. `vtkFlyingEdges3D` (Schroeder, Maynard & Geveci, "Flying edges: a high-performance scalable
   isocontouring algorithm", IEEE LDAV 2015; marching cubes' output, faster) extracts the
   iso-surface with linear interpolation along voxel edges: sub-voxel placement;
3. `vtkDecimatePro` (Schroeder, Zarge & Lorensen, "Decimation of triangle meshes", SIGGRAPH 1992)
   removes redundant triangles with the topology preserved, as Slicer's segment-to-surface
   conversion decimates (vtkBinaryLabelmapToClosedSurfaceConversionRule), and here with an error
   bound of a quarter voxel (VTK's absolute error). Why not quadric decimation: it collapses small
   closed pieces to nothing, and a bone surface at 3 mm is mostly small pieces and thin shells (the
   25-view benchmark's ground truth at +300 HU: 1221 pieces, of which quadric decimation kept 203);
4. `vtkWindowedSincPolyDataFilter` (Taubin, Zhang & Golub, "Optimal surface smoothing as filter
   design", ECCV 1996), a light low-pass (10 iterations, pass band 0.2) for the decimated facets.
   An iso-surface of a grey-level field is already sub-voxel (step 2), so smoothing adds no
   accuracy, and a strong one shrinks thin shells from both sides: 20 iterations at 0.05, the
   setting before 2026-12-06, took 33 % of the area and, with quadric decimation, 72 % of the
   enclosed volume off that ground truth's bone (now 9 % and 10 %; `Testing/test_surface.py`);
5. the triangles keep the winding flying edges gave them, which is consistent and faces out of the
   region above the threshold, so enclosed cavities (marrow inside a cortical shell) subtract from
   the volume as they should. Re-orienting each piece on its own (`vtkPolyDataNormals`'s
   auto-orientation) would turn cavities outward; the only flip made is of the whole surface, when
   its signed volume says a mirroring grid direction turned it inside out. `vtkPolyDataNormals`
   then adds point normals for shading.

Thresholds (`parse_threshold`): a number is attenuation in 1/mm; a number with ``HU`` (``300HU``)
is converted with the water calibration mu = mu_water (1 + HU / 1000), mu_water = 0.02 /mm (as
everywhere in CTNeRFRecon); ``bone`` is +300 HU (0.026 /mm, the bone class of metrics.py's
structure scores) and ``skin`` -500 HU (0.01 /mm: halfway between air and soft tissue, the
air-skin boundary). ``auto`` is Otsu's threshold (N. Otsu, "A threshold selection method from
gray-level histograms", IEEE SMC 9(1), 1979: the level that maximises the between-class variance
of the histogram) of the attenuation values inside the object's support (the voxels the nerf
method carved as possibly non-empty, support.py; all voxels when there is no support), which for a
body in air is its outer surface.

VTK is imported inside the functions (the engine never imports it at module import): a missing VTK
is an ImportError that says what to install.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .data import Volume
from .phantom import MU_WATER

NAMED_HU = {"bone": 300.0, "skin": -500.0}
"""Named thresholds in Hounsfield units."""
SURFACE_SUFFIXES = (".vtp", ".stl", ".obj")


def _vtk():
    try:
        from vtkmodules.util import numpy_support
        import vtkmodules.vtkCommonCore as core
        import vtkmodules.vtkCommonDataModel as dm
        import vtkmodules.vtkFiltersCore as fc
        import vtkmodules.vtkFiltersGeneral as fg
    except ImportError as exc:
        raise ImportError(f"surface models need VTK ({exc}); install it with `pip install vtk` (3D Slicer "
                          "ships it)") from None
    return numpy_support, core, dm, fc, fg


def parse_threshold(text, mu_water: float = MU_WATER) -> float | str:
    """'auto', or the threshold in 1/mm from '0.03', '300HU', 'bone', 'skin' (see the module docstring)."""
    from .formats.validate import ScanFormatError

    fix = "give auto, bone, skin, an attenuation in 1/mm (0.026) or Hounsfield units (300HU)"
    s = str(text).strip().lower()
    if s == "auto":
        return "auto"
    if s in NAMED_HU:
        return mu_water * (1.0 + NAMED_HU[s] / 1000.0)
    try:
        if s.endswith("hu"):
            return mu_water * (1.0 + float(s[:-2]) / 1000.0)
        value = float(s)
    except ValueError:
        raise ScanFormatError("--threshold", "--threshold", f"'{text}' is not a threshold", fix) from None
    if not np.isfinite(value):
        raise ScanFormatError("--threshold", "--threshold", f"'{text}' is not finite", fix)
    if value > 5.0:
        raise ScanFormatError("--threshold", "--threshold", f"{value} /mm is no attenuation (water is {mu_water} /mm): "
                              "a Hounsfield value needs its unit", f"write it as {text}HU, or {fix}")
    return value


def otsu_threshold(volume: Volume, mask: np.ndarray | None = None) -> float:
    """Otsu's threshold of the volume's values inside `mask` (all voxels without one)."""
    from skimage.filters import threshold_otsu

    values = volume.array if mask is None else volume.array[np.asarray(mask, dtype=bool)]
    values = values[np.isfinite(values)]
    if values.size < 2 or not values.max() > values.min():
        raise ValueError("the volume is constant inside its support: no threshold separates anything; "
                         "give --threshold explicitly")
    return float(threshold_otsu(values, nbins=512))


SMOOTH_ITERATIONS = 10
SMOOTH_PASSBAND = 0.2
DECIMATE = 0.5
DECIMATE_ERROR_VOXELS = 0.25
"""The defaults of `extract_surface` (module docstring, steps 3-4); decimation's error bound is
DECIMATE_ERROR_VOXELS times the smallest voxel side."""


def extract_surface(volume: Volume, threshold: float, smooth_iterations: int = SMOOTH_ITERATIONS,
                    passband: float = SMOOTH_PASSBAND, decimate: float = DECIMATE):
    """A closed vtkPolyData iso-surface of `volume` at `threshold`, in the scanner frame (mm), its
    triangles facing out of the region above the threshold.

    smooth_iterations 0: no smoothing; decimate: fraction of the triangles to remove (0: none)."""
    numpy_support, core, dm, fc, fg = _vtk()
    arr = np.asarray(volume.array, dtype=np.float32)
    if not (np.nanmax(arr) > threshold):
        raise ValueError(f"no voxel is above the threshold {threshold:.4g} /mm (the volume's maximum is "
                         f"{float(np.nanmax(arr)):.4g}): give a lower --threshold")
    fill = float(min(np.nanmin(arr), threshold)) - max(abs(threshold), 1e-3)
    padded = np.pad(np.nan_to_num(arr, nan=fill), 1, mode="constant", constant_values=fill)
    grid = volume.grid
    image = dm.vtkImageData()
    nz, ny, nx = padded.shape
    image.SetDimensions(nx, ny, nz)
    aligned = np.allclose(grid.direction, np.eye(3))
    if aligned:
        image.SetSpacing(*grid.spacing_xyz)
        image.SetOrigin(*(np.asarray(grid.origin_xyz) - np.asarray(grid.spacing_xyz)))
    else:
        image.SetOrigin(-1.0, -1.0, -1.0)  # index space; mapped to the world below
    scalars = numpy_support.numpy_to_vtk(padded.reshape(-1), deep=True, array_type=core.VTK_FLOAT)
    scalars.SetName("mu")
    image.GetPointData().SetScalars(scalars)
    contour = fc.vtkFlyingEdges3D()
    contour.SetInputData(image)
    contour.SetValue(0, float(threshold))
    contour.ComputeNormalsOff()
    contour.ComputeGradientsOff()
    contour.ComputeScalarsOff()
    contour.Update()
    poly = contour.GetOutput()
    if poly.GetNumberOfPolys() == 0:
        raise ValueError(f"the iso-surface at {threshold:.4g} /mm is empty; give another --threshold")
    # decimation and smoothing run in index space when the grid is not axis-aligned: the error bound
    # below is then in voxels on every axis
    voxel = float(min(grid.spacing_xyz)) if aligned else 1.0
    if decimate > 0:
        dec = fc.vtkDecimatePro()
        dec.SetInputData(poly)
        dec.SetTargetReduction(float(decimate))
        dec.PreserveTopologyOn()
        dec.SplittingOff()
        dec.BoundaryVertexDeletionOff()
        dec.SetFeatureAngle(60.0)
        dec.SetErrorIsAbsolute(1)
        dec.SetAbsoluteError(DECIMATE_ERROR_VOXELS * voxel)
        dec.Update()
        poly = dec.GetOutput()
    if smooth_iterations > 0:
        smooth = fc.vtkWindowedSincPolyDataFilter()
        smooth.SetInputData(poly)
        smooth.SetNumberOfIterations(int(smooth_iterations))
        smooth.SetPassBand(float(passband))
        smooth.BoundarySmoothingOff()
        smooth.FeatureEdgeSmoothingOff()
        smooth.NonManifoldSmoothingOn()
        smooth.NormalizeCoordinatesOn()
        smooth.Update()
        poly = smooth.GetOutput()
    if not aligned:
        from vtkmodules.vtkCommonTransforms import vtkTransform

        m = grid.index_to_world_matrix()
        tr = vtkTransform()
        tr.SetMatrix([float(v) for v in m.reshape(-1)])
        tf = fg.vtkTransformPolyDataFilter()
        tf.SetTransform(tr)
        tf.SetInputData(poly)
        tf.Update()
        poly = tf.GetOutput()
    if signed_volume(poly) < 0:  # a mirroring direction turned the surface inside out
        flip = fc.vtkReverseSense()
        flip.SetInputData(poly)
        flip.ReverseCellsOn()
        flip.Update()
        poly = flip.GetOutput()
    normals = fc.vtkPolyDataNormals()
    normals.SetInputData(poly)
    normals.ConsistencyOff()  # the winding is already consistent (step 5); re-deriving it can flip pieces
    normals.AutoOrientNormalsOff()
    normals.SplittingOff()
    normals.Update()
    out = dm.vtkPolyData()
    out.DeepCopy(normals.GetOutput())
    return out


def signed_volume(poly) -> float:
    """The volume a triangle surface encloses by the divergence theorem (mm^3), with the sign of its
    winding: positive when the triangles face outward."""
    from vtkmodules.util import numpy_support

    points = numpy_support.vtk_to_numpy(poly.GetPoints().GetData()).astype(np.float64)
    polys = poly.GetPolys()
    offsets = numpy_support.vtk_to_numpy(polys.GetOffsetsArray())
    if offsets.size < 2:
        return 0.0
    if not np.all(np.diff(offsets) == 3):
        raise ValueError("signed_volume needs a triangle surface")
    tri = numpy_support.vtk_to_numpy(polys.GetConnectivityArray()).reshape(-1, 3)
    a, b, c = points[tri[:, 0]], points[tri[:, 1]], points[tri[:, 2]]
    return float(np.einsum("ij,ij->", a, np.cross(b, c)) / 6.0)


def surface_stats(poly) -> dict:
    """Area (mm^2), enclosed volume (mm^3), triangles and points of a closed surface."""
    _vtk()
    from vtkmodules.vtkFiltersCore import vtkMassProperties, vtkTriangleFilter

    tri = vtkTriangleFilter()
    tri.SetInputData(poly)
    tri.Update()
    mp = vtkMassProperties()
    mp.SetInputData(tri.GetOutput())
    mp.Update()
    return dict(area_mm2=float(mp.GetSurfaceArea()), volume_mm3=float(mp.GetVolume()),
                triangles=int(poly.GetNumberOfPolys()), points=int(poly.GetNumberOfPoints()))


_SURFACE_IO = {".vtp": ("vtkIOXML", "vtkXMLPolyData"), ".stl": ("vtkIOGeometry", "vtkSTL"),
               ".obj": ("vtkIOGeometry", "vtkOBJ")}
"""Suffix -> (VTK module, class prefix) of the reader and writer of each surface format."""


def _surface_io_class(path: Path, role: str):
    """VTK's Reader or Writer class for a surface file, by its suffix."""
    import importlib

    entry = _SURFACE_IO.get(path.suffix.lower())
    if entry is None:
        raise ValueError(f"{path}: a surface file ends in {', '.join(SURFACE_SUFFIXES)}")
    module, prefix = entry
    return getattr(importlib.import_module(f"vtkmodules.{module}"), prefix + role)


def write_surface(poly, path) -> Path:
    """Write .vtp (VTK XML), .stl (binary) or .obj atomically; coordinates in the scanner frame (mm)."""
    _vtk()
    from .volume_io import atomic_write

    path = Path(path)
    suffix = path.suffix.lower()
    Writer = _surface_io_class(path, "Writer")

    def write(tmp):
        w = Writer()
        w.SetFileName(str(tmp))
        w.SetInputData(poly)
        if suffix == ".stl":
            w.SetFileTypeToBinary()
        if not w.Write():
            raise OSError(f"VTK could not write {tmp}")

    return atomic_write(path, write)


def read_surface(path):
    """A .vtp, .stl or .obj file as vtkPolyData (coordinates as stored)."""
    _vtk()
    path = Path(path)
    Reader = _surface_io_class(path, "Reader")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: surface file not found; check the path")
    r = Reader()
    r.SetFileName(str(path))
    r.Update()
    return r.GetOutput()


def run_surface(run_dir, out, threshold="auto", spacing=None, centre_xyz=None, size_xyz=None,
                overwrite: bool = False, device: str = "cpu", smooth_iterations: int = SMOOTH_ITERATIONS,
                decimate: float = DECIMATE,
                mu_water: float = MU_WATER, on_message=lambda text: None) -> dict:
    """`surface RUN_DIR`: the run's field on a grid (the output box and spacing unless told), its
    iso-surface at the threshold, written to `out` (.vtp/.stl/.obj). Checked before any work."""
    import time

    from .field_export import box_grid, check_box_request, check_out_path, check_run_dir, load_run_field

    t0 = time.perf_counter()
    run_dir = check_run_dir(run_dir)
    out = check_out_path(out, overwrite, SURFACE_SUFFIXES, "surface")
    level = parse_threshold(threshold, mu_water)
    check_box_request(run_dir, centre_xyz, size_xyz, spacing)
    _vtk()  # a missing VTK is said before the field is loaded
    rf = load_run_field(run_dir, device=device)
    on_message(f"evaluating {rf.note}")
    grid = box_grid(rf, centre_xyz, size_xyz, spacing)
    vol = rf.on_grid(grid)
    how = "given"
    if level == "auto":
        mask = rf.support_mask_on(grid)
        level = otsu_threshold(vol, mask)
        how = "Otsu inside the support" if mask is not None else "Otsu over the whole box"
    t1 = time.perf_counter()
    poly = extract_surface(vol, float(level), smooth_iterations=smooth_iterations, decimate=decimate)
    stats = surface_stats(poly)
    write_surface(poly, out)
    return dict(path=str(Path(out).absolute()), threshold=float(level), threshold_from=how,
                hu=1000.0 * (float(level) - mu_water) / mu_water, source=rf.source, note=rf.note,
                grid=grid.to_dict(), seconds=dict(field=round(t1 - t0, 3), surface=round(time.perf_counter() - t1, 3)),
                **stats)
