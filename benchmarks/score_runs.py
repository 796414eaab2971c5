#!/usr/bin/env python3
"""Score run folders that the command line made, one row each: a table and JSON.

The timing benchmarks here run our command line the way a user does, one run after the other on an
idle machine; this collects what those runs left behind, so the figures in the docs come from the run
folders themselves: the referee's score (../shared/bench/score.py `--margin`), the options the run was
given, its iterations and seconds, the training grid, what the time limit chose
(`method_report.voxel_from_time_limit`), and the peak memory when `/usr/bin/time -v` wrote its log
beside the folder (RUN_DIR.log).

    python benchmarks/score_runs.py REFERENCE.nrrd RUN_DIR [RUN_DIR ...] [--margin 2] [--out FILE.json]
        [--note TEXT]
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_default_grid import referee_score  # noqa: E402

SCORE_PY = Path(__file__).resolve().parents[2] / "shared" / "bench" / "score.py"


def peak_rss_mb(log: Path) -> float | None:
    """The peak resident memory `/usr/bin/time -v` reported in `log`, in MB; None without one."""
    if not log.exists():
        return None
    m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", log.read_text(errors="replace"))
    return None if m is None else round(int(m.group(1)) / 1024, 1)


def row_of(run_dir: Path, reference: Path, margin: int) -> dict:
    run = json.loads((run_dir / "run.json").read_text())
    report = run.get("method_report") or {}
    budget = report.get("time_budget") or {}
    support = report.get("support") or {}
    return {"run": run_dir.name, "argv": run.get("argv"), "settings": run.get("settings"),
            "iterations": budget.get("iterations_done", run.get("iteration")), "elapsed_s": run.get("elapsed_s"),
            "peak_rss_mb": peak_rss_mb(run_dir.with_name(run_dir.name + ".log")),
            "training_grid_shape_xyz": support.get("training_grid_shape_xyz"),
            "voxel_from_support": support.get("voxel_from_support"),
            "voxel_from_time_limit": report.get("voxel_from_time_limit"),
            "score": referee_score(SCORE_PY, reference, run_dir / "volume.nrrd", margin)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("reference", type=Path)
    ap.add_argument("runs", type=Path, nargs="+")
    ap.add_argument("--margin", type=int, default=2)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--note", default="")
    args = ap.parse_args(argv)
    if args.out and args.out.exists():
        raise SystemExit(f"{args.out} exists: name another --out (nothing is overwritten)")
    if not SCORE_PY.exists():  # no fallback to our own metrics: the figures here are the referee's
        raise SystemExit(f"{SCORE_PY} not found: this script scores with the referee's score.py "
                         "(../shared beside the repository)")
    rows = [row_of(run, args.reference, args.margin) for run in args.runs]
    print(f"{'run':<16} {'PSNR3D':>7} {'SSIM3D':>7} {'iter':>6} {'s':>6} {'MB':>7}  grid / voxel chosen")
    for r in rows:
        chosen = (r["voxel_from_time_limit"] or {}).get("chosen_mm")
        peak = "-" if r["peak_rss_mb"] is None else f"{r['peak_rss_mb']:.0f}"
        print(f"{r['run']:<16} {r['score']['psnr']:>7.2f} {r['score']['ssim']:>7.4f} {r['iterations'] or 0:>6} "
              f"{r['elapsed_s'] or 0:>6.0f} {peak:>7}  {r['training_grid_shape_xyz']}"
              + ("" if chosen is None else f" / {chosen} mm"))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        payload = {"reference": str(args.reference), "scorer": f"score.py --margin {args.margin}",
                   "note": args.note, "rows": rows}
        tmp = args.out.with_suffix(args.out.suffix + ".tmp")
        tmp.write_text(json.dumps(payload, indent=1))
        tmp.replace(args.out)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
