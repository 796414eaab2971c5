#!/usr/bin/env python3
"""A case with one corrupted view: its image is another view's (a frame stored under the wrong angle, or a
geometry entry off by a whole step), the rest intact. What the projection check flags, and what the data
term's Huber zone (`--setting robust_data=4`) is for:

    python benchmarks/make_bad_view.py ~/.cache/ctnerf_bench/cases/abd25 /tmp/bad25 --view 12 --from-view 13
    python -m CTNeRFReconLib reconstruct /tmp/bad25 --out /tmp/bad25_run --time-limit 120
    python benchmarks/score_runs.py ~/.cache/ctnerf_bench/cases/abd25/reference.nrrd /tmp/bad25_run \\
        --out bad25.json --note "..."
"""
from __future__ import annotations

from case_edit import case_parser, read_case, write_case


def main(argv=None) -> int:
    ap = case_parser(__doc__)
    ap.add_argument("--view", type=int, default=12, help="the view to corrupt")
    ap.add_argument("--from-view", type=int, default=13, help="whose image it gets")
    args = ap.parse_args(argv)
    proj, stack = read_case(args.case, args.out)
    proj[args.view] = proj[args.from_view]
    write_case(args.case, args.out, proj, stack)
    print(f"{args.out}: view {args.view} holds view {args.from_view}'s image")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
