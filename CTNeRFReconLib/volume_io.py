"""Reading and writing volumes with their world geometry (SimpleITK), atomically.

The scanner frame is written as ITK's physical space, so a volume lands where the projections'
geometry says (and Slicer, which reads ITK files as LPS, shows it mirrored into RAS consistently).
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .data import Volume
from .geometry import VolumeGrid


def volume_to_sitk(volume: Volume) -> sitk.Image:
    img = sitk.GetImageFromArray(np.ascontiguousarray(volume.array, dtype=np.float32))
    img.SetSpacing(volume.grid.spacing_xyz)
    img.SetOrigin(volume.grid.origin_xyz)
    img.SetDirection(tuple(float(x) for x in volume.grid.direction.reshape(-1)))
    return img


def sitk_to_volume(img: sitk.Image, dtype=np.float32) -> Volume:
    grid = VolumeGrid(img.GetSize(), img.GetSpacing(), img.GetOrigin(),
                      np.asarray(img.GetDirection()).reshape(3, 3))
    return Volume(sitk.GetArrayFromImage(img).astype(dtype), grid)


def unreadable_reason(path: Path, exc: RuntimeError, what: str = "volume") -> str:
    """Why SimpleITK could not read `path` (it raised `exc`), in words for an error message: a header
    that reads while the pixels do not is a truncated file (or a detached data file that is missing)."""
    reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else "unknown error"
    try:
        info = sitk.ImageFileReader()
        info.SetFileName(str(path))
        info.ReadImageInformation()
    except RuntimeError:
        return f"cannot be read as {'an' if what[0] in 'aeiou' else 'a'} {what} ({reason})"
    return (f"its header reads ({'x'.join(map(str, info.GetSize()))} voxels) but its pixel data "
            "cannot: the file is truncated or its data file is missing")


def _read_image(path: Path) -> tuple[sitk.Image | None, str]:
    """(image, "") or (None, what is wrong with the file)."""
    try:
        img = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        return None, unreadable_reason(path, exc)
    if img.GetDimension() != 3 or img.GetNumberOfComponentsPerPixel() != 1:
        return None, (f"expected a 3D scalar volume, got {img.GetDimension()}D with "
                      f"{img.GetNumberOfComponentsPerPixel()} components per voxel")
    return img, ""


def read_volume(path, dtype=np.float32) -> Volume:
    """Any SimpleITK-readable volume (NRRD, MHA, NIfTI, ...), with its world geometry."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: volume file not found; check the path")
    img, problem = _read_image(path)
    if img is None:
        raise ValueError(f"{path}: {problem}; give a 3D NRRD, MHA or NIfTI volume")
    return sitk_to_volume(sitk.Cast(img, sitk.sitkFloat32) if dtype == np.float32 else img, dtype)


def read_input_volume(path, field: str, fix: str) -> Volume:
    """read_volume for input data (a reference CT, a ground truth shipped with a scan): a missing or
    unreadable file, or a NaN/infinite voxel, is a ScanFormatError naming the file, the field and the fix."""
    from .formats.validate import ScanFormatError

    path = Path(path)
    if not path.is_file():
        raise ScanFormatError(path, field, "not found" if not path.exists() else "is not a file", fix)
    img, problem = _read_image(path)
    if img is None:
        raise ScanFormatError(path, field, problem, fix)
    volume = sitk_to_volume(sitk.Cast(img, sitk.sitkFloat32))
    bad = int(np.count_nonzero(~np.isfinite(volume.array)))
    if bad:
        raise ScanFormatError(path, field, f"has {bad} NaN or infinite voxels", fix)
    return volume


def _file_mode() -> int:
    """The permissions a plainly created file gets (0o666 less the umask)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


_FILE_MODE = _file_mode()


def atomic_write(path, write_fn) -> Path:
    """Write through `write_fn(tmp_path)` to a temporary name in the same folder, then rename.

    A reader polling `path` sees either the previous complete file or the new complete file.
    The temporary name keeps the extension so that writers that pick a format by suffix work.
    The file ends with the usual permissions (mkstemp's private 0600 would hide it from other users).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix="".join(path.suffixes) or ".tmp",
                               dir=path.parent)
    os.close(fd)
    try:
        write_fn(tmp)
        os.chmod(tmp, _FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def write_volume(volume: Volume, path, compress: bool = True) -> Path:
    """Atomically write a volume (float32) with origin, spacing and direction."""
    img = volume_to_sitk(volume)
    return atomic_write(path, lambda tmp: sitk.WriteImage(img, str(tmp), compress))


def resample_to_grid(volume: Volume, grid: VolumeGrid, default: float = 0.0,
                     interpolator=sitk.sitkLinear) -> Volume:
    """Resample a volume onto another grid by world coordinates (as ../shared/bench/score.py)."""
    ref = sitk.Image([int(s) for s in grid.shape_xyz], sitk.sitkFloat32)
    ref.SetSpacing(grid.spacing_xyz)
    ref.SetOrigin(grid.origin_xyz)
    ref.SetDirection(tuple(float(x) for x in grid.direction.reshape(-1)))
    out = sitk.Resample(volume_to_sitk(volume), ref, sitk.Transform(), interpolator, float(default))
    return Volume(sitk.GetArrayFromImage(out).astype(np.float32), grid)
