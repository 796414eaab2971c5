"""Engine volumes in and out of MRML scalar volume nodes, at the right place in RAS.

Frame mapping. The engine works in the scanner frame of the data (millimetres; RTK's frame for
RTK cases, TIGRE's for NAF/R2-Gaussian data). Its volume files (volume.nrrd, snapshot.nrrd) store
that frame as ITK physical space, and ITK physical space is LPS. Slicer reads such a file as LPS
and shows it in RAS, so a scanner point ``(x, y, z)`` appears at ``RAS = (-x, -y, z)``::

    RAS = diag(-1, -1, 1) . world            IJKToRAS = diag(-1, -1, 1, 1) . IJKToWorld

where ``IJKToWorld`` is :meth:`VolumeGrid.index_to_world_matrix` (direction . spacing, origin =
centre of voxel 0). A node filled here is therefore exactly the node Slicer makes when it loads
the run's volume.nrrd, and a reference CT loaded from a file lines up with both. The mapping is
its own inverse, so :func:`grid_from_node` reads a node's grid back into the scanner frame.

Units. Reconstructions are linear attenuation in 1/mm. A node may instead show Hounsfield units
through a water calibration, ``HU = 1000 (mu - mu_water) / mu_water`` (mu_water = 0.02 /mm at
about 70 keV); the node remembers its units in attributes so comparisons convert back.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from vtkmodules.util import numpy_support
from vtkmodules.vtkCommonCore import VTK_FLOAT
from vtkmodules.vtkCommonDataModel import vtkImageData
from vtkmodules.vtkCommonMath import vtkMatrix4x4

from ..data import Volume
from ..geometry import VolumeGrid
from ..phantom import MU_WATER

RAS_FROM_WORLD = np.diag([-1.0, -1.0, 1.0, 1.0])
"""Scanner frame (ITK physical space, LPS) to Slicer's RAS; its own inverse."""

ATTR_UNITS = "CTNeRFRecon.Units"
ATTR_MU_WATER = "CTNeRFRecon.MuWater"
ATTR_SEQUENCE = "CTNeRFRecon.UpdateCount"
"""How many times the bridge has filled the node (a view of streaming progress, kept with the scene)."""
ATTR_ITERATION = "CTNeRFRecon.Iteration"


class Units(str, enum.Enum):
    """What a volume node's voxel values are."""

    MU = "mu"
    """Linear attenuation, 1/mm (what the engine writes)."""
    HU = "hu"
    """Hounsfield units through the water calibration."""


def mu_to_units(array: np.ndarray, units: Units | str, mu_water: float = MU_WATER) -> np.ndarray:
    units = Units(units)
    if units is Units.MU:
        return np.asarray(array, dtype=np.float32)
    _check_mu_water(mu_water)
    return (1000.0 * (np.asarray(array, dtype=np.float64) - mu_water) / mu_water).astype(np.float32)


def units_to_mu(array: np.ndarray, units: Units | str, mu_water: float = MU_WATER) -> np.ndarray:
    units = Units(units)
    if units is Units.MU:
        return np.asarray(array, dtype=np.float32)
    _check_mu_water(mu_water)
    return (mu_water * (1.0 + np.asarray(array, dtype=np.float64) / 1000.0)).astype(np.float32)


def _check_mu_water(mu_water: float):
    if not mu_water > 0:
        raise ValueError(f"water attenuation must be positive (1/mm), got {mu_water}; 0.02 is water at ~70 keV")


# --------------------------------------------------------------------------------------- geometry

def ijk_to_ras(grid: VolumeGrid) -> np.ndarray:
    """4x4 IJK-to-RAS matrix of a scanner-frame grid (see the module docstring)."""
    return RAS_FROM_WORLD @ grid.index_to_world_matrix()


def world_to_ras(points) -> np.ndarray:
    """Scanner-frame points (..., 3) to RAS."""
    return np.asarray(points, dtype=np.float64) * RAS_FROM_WORLD.diagonal()[:3]


def ras_to_world(points) -> np.ndarray:
    """RAS points (..., 3) to the scanner frame (the same flip)."""
    return world_to_ras(points)


def _to_vtk_matrix(m: np.ndarray) -> vtkMatrix4x4:
    out = vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            out.SetElement(r, c, float(m[r, c]))
    return out


def node_ijk_to_ras(node) -> np.ndarray:
    """A volume node's IJK-to-RAS matrix as a numpy 4x4."""
    m = vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    return np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)])


def grid_from_node(node) -> VolumeGrid:
    """The scanner-frame grid of a volume node (inverse of :func:`ijk_to_ras`)."""
    image = node.GetImageData()
    if image is None:
        raise ValueError(f"volume node '{node.GetName()}' has no image data; load or compute a volume first")
    world = RAS_FROM_WORLD @ node_ijk_to_ras(node)
    axes = world[:3, :3]
    spacing = np.linalg.norm(axes, axis=0)
    return VolumeGrid(tuple(image.GetDimensions()), tuple(spacing), tuple(world[:3, 3]), axes / spacing)


# ------------------------------------------------------------------------------------- node data

def node_units(node) -> tuple[Units, float]:
    """The units a node's values are in (attenuation unless the bridge marked it HU) and mu_water."""
    units = node.GetAttribute(ATTR_UNITS) or Units.MU.value
    mu_water = node.GetAttribute(ATTR_MU_WATER)
    return Units(units), float(mu_water) if mu_water else MU_WATER


def array_from_node(node) -> np.ndarray:
    """A copy of the node's voxels as a (z, y, x) float32 array, in the node's own units."""
    image = node.GetImageData()
    if image is None or image.GetPointData().GetScalars() is None:
        raise ValueError(f"volume node '{node.GetName()}' has no voxels; load or compute a volume first")
    if image.GetNumberOfScalarComponents() != 1:
        raise ValueError(f"volume node '{node.GetName()}' has {image.GetNumberOfScalarComponents()} components "
                         "per voxel; choose a scalar (grey-level) volume")
    nx, ny, nz = image.GetDimensions()
    flat = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())
    return np.array(flat, dtype=np.float32).reshape(nz, ny, nx)


def volume_from_node(node, units: Units | str | None = None, mu_water: float | None = None) -> Volume:
    """The node as an engine Volume in attenuation (1/mm), in the scanner frame.

    ``units`` overrides what the node says its values are (e.g. 'hu' for a CT loaded from a file).
    """
    own_units, own_mu = node_units(node)
    units = own_units if units is None else Units(units)
    mu_water = own_mu if mu_water is None else mu_water
    return Volume(units_to_mu(array_from_node(node), units, mu_water), grid_from_node(node))


def _fill_image(node, array: np.ndarray) -> bool:
    """Copy a (z, y, x) float32 array into the node's image data; True when a new image was made."""
    nz, ny, nx = array.shape
    image = node.GetImageData()
    reuse = (image is not None and tuple(image.GetDimensions()) == (nx, ny, nz)
             and image.GetScalarType() == VTK_FLOAT and image.GetNumberOfScalarComponents() == 1
             and image.GetPointData().GetScalars() is not None)
    if not reuse:
        image = vtkImageData()
        image.SetDimensions(nx, ny, nz)
        image.AllocateScalars(VTK_FLOAT, 1)
    scalars = image.GetPointData().GetScalars()
    numpy_support.vtk_to_numpy(scalars)[:] = array.reshape(-1)
    scalars.Modified()
    image.Modified()
    if not reuse:
        node.SetAndObserveImageData(image)
    return not reuse


def update_volume_node(node, volume: Volume, units: Units | str = Units.MU, mu_water: float = MU_WATER,
                       iteration: int | None = None):
    """Fill an existing scalar volume node in place: voxels, geometry and unit attributes.

    The node keeps its ID, display node and window/level, so views and comparisons stay attached.
    Geometry and voxels change inside one StartModify/EndModify, so observers see one consistent
    update, never new voxels on an old grid.
    """
    units = Units(units)
    array = np.ascontiguousarray(mu_to_units(volume.array, units, mu_water), dtype=np.float32)
    if not np.all(np.isfinite(array)):
        raise ValueError(f"the volume for node '{node.GetName()}' has NaN or infinite voxels; it was not shown")
    was_modifying = node.StartModify()
    try:
        node.SetIJKToRASMatrix(_to_vtk_matrix(ijk_to_ras(volume.grid)))
        _fill_image(node, array)
        node.SetAttribute(ATTR_UNITS, units.value)
        node.SetAttribute(ATTR_MU_WATER, repr(float(mu_water)))
        count = int(node.GetAttribute(ATTR_SEQUENCE) or 0) + 1
        node.SetAttribute(ATTR_SEQUENCE, str(count))
        if iteration is not None:
            node.SetAttribute(ATTR_ITERATION, str(int(iteration)))
        node.Modified()
    finally:
        node.EndModify(was_modifying)
    return node


def update_count(node) -> int:
    """How many times :func:`update_volume_node` filled this node."""
    return int(node.GetAttribute(ATTR_SEQUENCE) or 0)


def create_volume_node(scene, volume: Volume, name: str, units: Units | str = Units.MU,
                       mu_water: float = MU_WATER, window: "WindowPreset | str" = "auto"):
    """A new scalar volume node (with display node and CT window) holding the volume."""
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", scene.GenerateUniqueName(name))
    node.CreateDefaultDisplayNodes()
    update_volume_node(node, volume, units, mu_water)
    set_window(node, window)
    return node


def load_volume_file(path) -> Volume:
    """A volume file (NRRD, MHA, NIfTI) as an engine Volume with its scanner-frame geometry."""
    from ..volume_io import read_volume

    return read_volume(Path(path))


# ---------------------------------------------------------------------------------- window/level

@dataclass(frozen=True)
class WindowPreset:
    """A CT window in Hounsfield units, converted to the node's units when applied."""

    name: str
    window_hu: float
    level_hu: float


WINDOW_PRESETS = {p.name: p for p in (
    WindowPreset("full", 2000.0, 0.0),
    WindowPreset("soft_tissue", 400.0, 40.0),
    WindowPreset("lung", 1500.0, -600.0),
    WindowPreset("bone", 1800.0, 400.0),
)}
"""Named windows; 'auto' (robust percentiles of the data) is the default and fits any phantom."""


def window_for(array: np.ndarray, preset: WindowPreset | str, units: Units | str,
               mu_water: float = MU_WATER) -> tuple[float, float]:
    """(min, max) display range of a preset in the given units."""
    units = Units(units)
    if isinstance(preset, str) and preset == "auto":
        finite = np.asarray(array)[np.isfinite(array)]
        if finite.size == 0:
            return 0.0, 1.0
        lo, hi = np.percentile(finite, [0.5, 99.5])
        if not hi > lo:
            hi = lo + (abs(lo) * 1e-3 or 1e-3)
        return float(lo), float(hi)
    if isinstance(preset, str):
        if preset not in WINDOW_PRESETS:
            raise ValueError(f"window preset '{preset}' unknown; use auto or one of {', '.join(WINDOW_PRESETS)}")
        preset = WINDOW_PRESETS[preset]
    lo_hu, hi_hu = preset.level_hu - preset.window_hu / 2, preset.level_hu + preset.window_hu / 2
    if units is Units.HU:
        return lo_hu, hi_hu
    return tuple(float(v) for v in units_to_mu(np.array([lo_hu, hi_hu]), Units.HU, mu_water))


def set_window(node, preset: WindowPreset | str = "auto"):
    """Fix the node's window/level to a CT preset (auto window/level off, so it survives updates)."""
    display = node.GetDisplayNode()
    if display is None:
        node.CreateDefaultDisplayNodes()
        display = node.GetDisplayNode()
    units, mu_water = node_units(node)
    lo, hi = window_for(array_from_node(node), preset, units, mu_water)
    display.SetAutoWindowLevel(False)
    display.SetWindowLevelMinMax(lo, hi)
    return lo, hi
