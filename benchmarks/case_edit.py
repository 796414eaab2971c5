"""A copy of an RTK case (geometry.xml and projections.mha, as make_rtk_case.py writes them) with its
projections changed: what the scripts that imitate real detectors (make_dead_pixels.py, make_air_offset.py,
make_bad_view.py) share."""
from __future__ import annotations

import argparse
import shutil
from pathlib import Path
import numpy as np
import SimpleITK as sitk


def read_case(case: Path, out: Path) -> tuple[np.ndarray, sitk.Image]:
    """The case's (views, rows, cols) float32 line integrals and their stack (for its origin, spacing and
    direction); refuses an `out` that exists before anything is read."""
    if out.exists():
        raise SystemExit(f"{out} exists; choose a new folder")
    stack = sitk.ReadImage(str(case / "projections.mha"))
    return sitk.GetArrayFromImage(stack).astype(np.float32), stack


def write_case(case: Path, out: Path, proj: np.ndarray, stack: sitk.Image) -> None:
    """`out` (a new folder) with the case's geometry and `proj` as its stack, placed as `stack` was."""
    out.mkdir(parents=True)
    shutil.copy(case / "geometry.xml", out / "geometry.xml")
    image = sitk.GetImageFromArray(proj)
    image.CopyInformation(stack)
    sitk.WriteImage(image, str(out / "projections.mha"))


def case_parser(doc: str) -> argparse.ArgumentParser:
    """The command line every case-editing script starts with: the case folder and the new one."""
    ap = argparse.ArgumentParser(description=doc.split("\n")[0])
    ap.add_argument("case", type=Path, help="an RTK case folder: geometry.xml and projections.mha")
    ap.add_argument("out", type=Path, help="the new case folder (must not exist)")
    return ap
