#!/usr/bin/env python3
"""A case whose air is not zero: a constant offset and a drift from view to view, as real scans have.

After flat-fielding, a scanner's air reads a little off zero (scatter, the flat field's own error, the
detector's lag), and the level moves from view to view with the tube's output. This writes a copy of an
RTK case (geometry.xml and projections.mha, as make_rtk_case.py writes them) with `--offset` added to
every line integral and a normal drift of standard deviation `--drift` added per view (seeded), so the
reconstruction can be run and scored as a user would against the intact case's reference:

    python benchmarks/make_air_offset.py ~/.cache/ctnerf_bench/cases/abd25 /tmp/off25 --offset 0.02
    python -m CTNeRFReconLib reconstruct /tmp/off25 --out /tmp/off25_run --time-limit 120
    python benchmarks/score_runs.py ~/.cache/ctnerf_bench/cases/abd25/reference.nrrd /tmp/off25_run \\
        --out off25.json --note "..."
"""
from __future__ import annotations

import json

import numpy as np

from case_edit import case_parser, read_case, write_case


def main(argv=None) -> int:
    ap = case_parser(__doc__)
    ap.add_argument("--offset", type=float, default=0.0, help="added to every line integral")
    ap.add_argument("--drift", type=float, default=0.0, help="standard deviation of a per-view offset")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    proj, stack = read_case(args.case, args.out)
    per_view = args.offset + args.drift * np.random.default_rng(args.seed).standard_normal(len(proj))
    write_case(args.case, args.out, proj + per_view[:, None, None].astype(np.float32), stack)
    said = {"case": str(args.case), "offset": args.offset, "drift": args.drift, "seed": args.seed,
            "per_view": [round(float(x), 5) for x in per_view]}
    (args.out.parent / f"{args.out.name}.air.json").write_text(json.dumps(said, indent=1))
    print(json.dumps({k: v for k, v in said.items() if k != "per_view"}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
