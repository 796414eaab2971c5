#!/usr/bin/env python3
"""A patient-like truncated case: a CT turned so the body's long axis is the orbit's rotation axis, lying
on a patient table wider than the field of view, then projected by the referee's make_rtk_case.py.

The benchmark CTs are projected with their own z axis across the orbit (RTK's axis is y), and nothing in
them sticks out of a 160 px detector's field of view but the body's corners. A patient on a C-arm or a
small flat panel lies along the axis, on a table whose ends leave the field of view in every view that
looks along it. This script makes such a CT from any HU volume (the benchmark's abdomen at 2.4 mm, say):
- the volume is turned so its z axis (head to feet) runs along y;
- the posterior side (the image's low-y rows, where the spine lies in the abdomen CTs) gets
  `--table-gap` voxels of air, then a plate `--table-width` mm wide along the whole length: two 1-voxel
  shells at `--shell-hu` (carbon fibre) around a `--core-voxels` foam core at `--core-hu`, about what
  a CT couch top is (a few mm of carbon fibre over 10-20 mm of foam), and `--below-voxels` of air
  under it (the volume is centred on the isocentre, so this sets how far off the axis the body lies);
- the sides are padded with `--side-voxels` of air, or more where the plate needs it.

Then it runs the referee's make_rtk_case.py on it (Joseph projector, Poisson noise; its defaults for
the orbit: 1000 / 1500 mm) into `--cases`. `bench_lateral_cut.py --cols 0 --rows N` cuts the rows too
(a body longer than the detector) and scores against the truth cut to the default grid:

    python benchmarks/make_table_ct.py --ct ~/.cache/ctnerf_bench/cts/abdomen_scaled08_ct.nii.gz \\
        --views 40 --det 160
    python benchmarks/bench_lateral_cut.py --case ~/.cache/ctnerf_bench/abdomen_table_40v_det160_p3.2 \\
        --cols 0 --rows 100 --variants default table-sides --iterations 1200 --out bench_results/table
"""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk

HERE = Path(__file__).resolve().parent


def table_ct(ct: sitk.Image, table_width_mm: float, gap_voxels: int, core_voxels: int, below_voxels: int,
             side_voxels: int, shell_hu: float, core_hu: float) -> sitk.Image:
    """The CT (HU) turned so its z axis runs along y, on a table plate behind its low-y side."""
    hu = sitk.GetArrayFromImage(ct).astype(np.float32)  # (z, y, x)
    spacing = ct.GetSpacing()
    if not np.allclose(spacing, spacing[0]):
        raise SystemExit(f"the CT must be isotropic (its spacing is {spacing}); resample it first")
    h = float(spacing[0])
    width = int(round(table_width_mm / h))
    behind = gap_voxels + core_voxels + 2 + below_voxels
    side = max(side_voxels, (width - hu.shape[2] + 1) // 2 + 1)
    padded = np.full((hu.shape[0], hu.shape[1] + behind, hu.shape[2] + 2 * side), -1000.0, np.float32)
    padded[:, behind:, side:side + hu.shape[2]] = hu
    first = (padded.shape[2] - width) // 2
    plate = slice(first, first + width)
    top = behind - gap_voxels - 1  # the upper shell, `gap_voxels` of air behind the body's box
    padded[:, top, plate] = shell_hu
    padded[:, top - core_voxels:top, plate] = core_hu
    padded[:, top - core_voxels - 1, plate] = shell_hu
    # (z, y, x) -> (y, z, x): the image's z axis becomes the world y, the orbit's rotation axis
    out = sitk.GetImageFromArray(np.ascontiguousarray(padded.transpose(1, 0, 2)))
    out.SetSpacing((h, h, h))
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ct", type=Path, required=True, help="an isotropic HU volume (NIfTI, NRRD, ...)")
    ap.add_argument("--name", default="abdomen_table", help="the made CT's and case's name")
    ap.add_argument("--table-width", type=float, default=470.0, help="the plate's width, mm")
    ap.add_argument("--table-gap", type=int, default=1, help="voxels of air between the CT's box and the plate")
    ap.add_argument("--core-voxels", type=int, default=6, help="the foam core's thickness, voxels")
    ap.add_argument("--below-voxels", type=int, default=16, help="voxels of air under the plate")
    ap.add_argument("--side-voxels", type=int, default=45, help="voxels of air each side (at least what the "
                    "plate needs); the made volume's width sets the referee's ground-truth grid")
    ap.add_argument("--shell-hu", type=float, default=300.0)
    ap.add_argument("--core-hu", type=float, default=-850.0)
    ap.add_argument("--views", type=int, default=40)
    ap.add_argument("--det", type=int, default=160)
    ap.add_argument("--pitch", type=float, default=3.2)
    ap.add_argument("--cases", type=Path, default=Path.home() / ".cache" / "ctnerf_bench")
    ap.add_argument("--make-rtk-case", type=Path, default=HERE.parents[1] / "shared" / "bench" / "make_rtk_case.py",
                    help="the referee's case maker")
    args = ap.parse_args(argv)
    for path, what in ((args.ct, "--ct"), (args.make_rtk_case, "--make-rtk-case")):
        if not path.expanduser().exists():
            raise SystemExit(f"{path}: not found; pass {what}")
    ct_out = args.cases.expanduser() / "cts" / f"{args.name}_ct.nii.gz"
    case = args.cases.expanduser() / f"{args.name}_{args.views}v_det{args.det}_p{args.pitch:g}"
    if (case / "case.json").exists():
        print(f"{case}: made before, kept")
        return
    ct_out.parent.mkdir(parents=True, exist_ok=True)
    made = table_ct(sitk.ReadImage(str(args.ct.expanduser())), args.table_width, args.table_gap,
                    args.core_voxels, args.below_voxels, args.side_voxels, args.shell_hu, args.core_hu)
    sitk.WriteImage(made, str(ct_out))
    print(f"wrote {ct_out}: {made.GetSize()} voxels of {made.GetSpacing()[0]:g} mm")
    subprocess.run([sys.executable, str(args.make_rtk_case.expanduser()), str(ct_out), str(case),
                    "--views", str(args.views), "--det", str(args.det), "--pitch", str(args.pitch)],
                   check=True, stdout=subprocess.DEVNULL)
    print(f"wrote {case}")


if __name__ == "__main__":
    main()
