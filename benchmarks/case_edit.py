"""A copy of an RTK case (geometry.xml and projections.mha, as make_rtk_case.py writes them) with its
projections changed: what the scripts that imitate real detectors (make_dead_pixels.py, make_air_offset.py)
share."""
from __future__ import annotations

import argparse
import shutil
from pathlib import Path
from typing import Callable

import numpy as np
import SimpleITK as sitk


def write_edited_case(case: Path, out: Path, edit: Callable[[np.ndarray], np.ndarray]) -> None:
    """Write `out` (a new folder) with the case's geometry and `edit` applied to its (views, rows, cols)
    float32 line integrals; the stack keeps its origin, spacing and direction."""
    if out.exists():
        raise SystemExit(f"{out} exists; choose a new folder")
    stack = sitk.ReadImage(str(case / "projections.mha"))
    proj = edit(sitk.GetArrayFromImage(stack).astype(np.float32))
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
