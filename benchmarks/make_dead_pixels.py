#!/usr/bin/env python3
"""A case with a flat panel's defects: dead columns, rows and scattered pixels, the same in every view.

Real panels have them (a defect map ships with each detector); after the log they are NaN or infinity,
or whatever a reader turned them into. This writes a copy of an RTK case (geometry.xml and
projections.mha, as make_rtk_case.py writes them) with the defect pixels set to `--fill`: `nan` (what
the log of a dead pixel gives, which the library marks and leaves out), `zero` (what a reader that
maps NaN to 0 gives: rays that seem to cross only air) or a number (a pixel stuck at a value: high, or
low in the object's shadow). Reconstruct it as a user would and score it against the intact case's
reference:

    python benchmarks/make_dead_pixels.py ~/.cache/ctnerf_bench/cases/abd25 /tmp/dead25 --fill nan
    python -m CTNeRFReconLib reconstruct /tmp/dead25 --out /tmp/dead25_run --time-limit 120
    python benchmarks/score_runs.py ~/.cache/ctnerf_bench/cases/abd25/reference.nrrd /tmp/dead25_run \\
        --out dead25.json --note "..."
"""
from __future__ import annotations

import json

import numpy as np

from case_edit import case_parser, read_case, write_case


def defect_map(rows: int, cols: int, columns: list[float], pixel_share: float, seed: int,
               lines: list[float] = ()) -> np.ndarray:
    """(rows, cols) True at the dead columns and rows (`lines`), given as fractions of the width and the
    height, and at random pixels."""
    dead = np.random.default_rng(seed).random((rows, cols)) < pixel_share
    for where in columns:
        dead[:, int(round(where * (cols - 1)))] = True
    for where in lines:
        dead[int(round(where * (rows - 1)))] = True
    return dead


def main(argv=None) -> int:
    ap = case_parser(__doc__)
    ap.add_argument("--columns", type=float, nargs="*", default=[0.45, 0.5, 0.62],
                    help="dead columns, as fractions of the detector's width (default: three through the body)")
    ap.add_argument("--rows", type=float, nargs="*", default=[],
                    help="dead rows, as fractions of the detector's height (0.5: the orbit plane's on a centred panel)")
    ap.add_argument("--pixels", type=float, default=0.002, help="share of scattered dead pixels (default 0.2 %%)")
    ap.add_argument("--fill", default="nan", help="nan, zero, or the line integral the pixels are stuck at")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    proj, stack = read_case(args.case, args.out)
    dead = defect_map(proj.shape[1], proj.shape[2], args.columns, args.pixels, args.seed, args.rows)
    named = {"nan": np.nan, "zero": 0.0}
    proj[:, dead] = named[args.fill] if args.fill in named else float(args.fill)
    write_case(args.case, args.out, proj, stack)
    said = {"case": str(args.case), "fill": args.fill, "columns": args.columns, "rows": args.rows,
            "pixel_share": args.pixels,
            "dead_per_view": int(dead.sum()), "share_of_view": round(float(dead.mean()), 5)}
    (args.out.parent / f"{args.out.name}.defects.json").write_text(json.dumps(said, indent=1))
    print(json.dumps(said))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
