#!/usr/bin/env python3
"""A case whose pixels are calibrated a little wrong, the same in every view: what draws rings.

A flat panel's gain is measured once (the flat field) and drifts afterwards: with temperature, with the
dose history, and per readout group of columns. After the log, a pixel whose gain is off by a factor g
reads `-log(g)` more than the truth in every view, so the error does not average out over views as noise
does and a reconstruction draws a ring (a cylinder in a cone beam) around the axis. This writes a copy of
an RTK case (geometry.xml and projections.mha, as make_rtk_case.py writes them) with:

- every pixel's gain off by a normal factor of standard deviation `--sigma` (seeded; 0.003 = 0.3 %),
- the columns at `--columns` (fractions of the width) off by `--column-error` more, with alternating sign
  (a bad readout channel),

so the reconstruction can be run and scored as a user would against the intact case's reference:

    python benchmarks/make_gain_errors.py ~/.cache/ctnerf_bench/cases/abd25 /tmp/gain25 --sigma 0.003
    python -m CTNeRFReconLib reconstruct /tmp/gain25 --out /tmp/gain25_run --time-limit 120
    python benchmarks/score_runs.py ~/.cache/ctnerf_bench/cases/abd25/reference.nrrd /tmp/gain25_run \\
        --out gain25.json --note "..."
"""
from __future__ import annotations

import json

import numpy as np

from case_edit import case_parser, read_case, write_case


def gain_map(rows: int, cols: int, sigma: float, columns: list[float], column_error: float, seed: int) -> np.ndarray:
    """(rows, cols) gain factors about 1: a normal error per pixel, and a larger one on whole columns."""
    gain = 1.0 + sigma * np.random.default_rng(seed).standard_normal((rows, cols))
    for k, where in enumerate(columns):
        gain[:, int(round(where * (cols - 1)))] *= 1.0 + column_error * (-1) ** k
    return gain


def main(argv=None) -> int:
    ap = case_parser(__doc__)
    ap.add_argument("--sigma", type=float, default=0.003, help="per-pixel gain error, relative (default 0.3 %%)")
    ap.add_argument("--columns", type=float, nargs="*", default=[],
                    help="columns with a larger error, as fractions of the detector's width")
    ap.add_argument("--column-error", type=float, default=0.02, help="their extra gain error (default 2 %%)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    proj, stack = read_case(args.case, args.out)
    gain = gain_map(proj.shape[1], proj.shape[2], args.sigma, args.columns, args.column_error, args.seed)
    offset = (-np.log(gain)).astype(np.float32)
    write_case(args.case, args.out, proj + offset[None], stack)
    said = {"case": str(args.case), "sigma": args.sigma, "columns": args.columns,
            "column_error": args.column_error, "seed": args.seed,
            "offset_rms": round(float(np.sqrt((offset ** 2).mean())), 6)}
    (args.out.parent / f"{args.out.name}.gain.json").write_text(json.dumps(said, indent=1))
    print(json.dumps(said))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
