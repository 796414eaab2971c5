#!/usr/bin/env python3
"""What drawing a batch's rays in runs of neighbouring pixels (`ray_run`) does to one iteration's cost.

The trainer is built as the worker builds it on a case's default grid (no reference: the grid a user
gets), moved to its full training level with the field frozen (the last part of a run, where the ray
integrals are most of a step), and for each run length the same number of batches is drawn the way
`NerfTrainer.step` draws them (each length as given, without the trainer's cap of a twentieth of a
detector row). Timed, interleaved across run lengths so that the host's drift hits all
of them alike: Joseph's forward and backward on the training volume, and the whole step. The host's
memory speed moves single timings by up to 2x on the team's shared 2-core machines, so the table shows
the minimum and the median of the repeats.

    python benchmarks/bench_ray_runs.py CASE_DIR [--runs 1 4 8 16] [--repeats 12] [--out FILE.json]

CASE_DIR holds geometry.xml and projections.mha (any format `load_scan` reads).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def measure(case: Path, runs: list[int], repeats: int, n_batches: int = 3) -> dict:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the command line runs
    import torch

    from CTNeRFReconLib.formats import load_scan
    from CTNeRFReconLib.kernels import kernels_available
    from CTNeRFReconLib.fov import default_grid
    from CTNeRFReconLib.methods import RunContext
    from CTNeRFReconLib.nerf.config import NerfConfig
    from CTNeRFReconLib.nerf.train import NerfTrainer

    scan = load_scan(case / "geometry.xml" if case.is_dir() else case)
    trainer = NerfTrainer(scan, default_grid(scan.geometry), NerfConfig.from_settings({}), RunContext(device="cpu"))
    if trainer.cfg.integrator != "joseph":
        raise SystemExit("this benchmark times Joseph's rule; the default integrator is not it any more")
    trainer._set_level(len(trainer.levels.factors))
    trainer.switch_to_direct()
    trainer.freeze_field()
    grid = trainer.level_grid
    vol = trainer._training_volume().detach().contiguous()
    n_rays = min(trainer.cfg.rays_end, len(trainer.targets))
    batches = {}
    for run in runs:
        trainer.ray_run = run  # the length as given: the trainer's cap (`ray_run_for`) is not applied
        drawn = []
        for b in range(n_batches):
            idx = torch.sort(trainer._draw_rays(n_rays, torch.Generator().manual_seed(b))).values
            drawn.append(tuple(t.contiguous() for t in trainer.ray_table.rays(idx)))
        batches[run] = drawn
    ones = torch.ones(n_rays)
    origin, spacing = (torch.tensor(v, dtype=vol.dtype) for v in (grid.origin_xyz, grid.spacing_xyz))
    times = {run: {"forward": [], "backward": [], "step": []} for run in runs}
    last = trainer.iterations - 1
    for rep in range(repeats):
        for run in runs:
            rays = batches[run][rep % n_batches]
            t0 = time.perf_counter()
            torch.ops.ctnerf.joseph_line_integrals(vol, origin, spacing, *rays)
            t1 = time.perf_counter()
            torch.ops.ctnerf.joseph_line_integrals_backward(ones, vol, origin, spacing, *rays, 0)
            t2 = time.perf_counter()
            trainer.ray_run = run
            trainer.step(last, n_rays)
            t3 = time.perf_counter()
            times[run]["forward"].append(1000 * (t1 - t0))
            times[run]["backward"].append(1000 * (t2 - t1))
            times[run]["step"].append(1000 * (t3 - t2))
    rows = []
    for run in runs:
        row = {"ray_run": run}
        for part, values in times[run].items():
            row[f"{part}_min_ms"] = round(min(values), 1)
            row[f"{part}_median_ms"] = round(statistics.median(values), 1)
        rows.append(row)
    return dict(case=str(case), training_grid=list(grid.shape_xyz), training_voxels=grid.n_voxels,
                rays=len(trainer.targets), rays_per_batch=n_rays, repeats=repeats, rows=rows,
                kernels=kernels_available("cpu"), threads=torch.get_num_threads(),
                machine=platform.processor() or platform.machine(), time=time.strftime("%Y-%m-%d %H:%M"))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("case", type=Path)
    ap.add_argument("--runs", type=int, nargs="+", default=[1, 4, 8, 16])
    ap.add_argument("--repeats", type=int, default=12)
    ap.add_argument("--out", type=Path, default=None, help="JSON file (default: print only)")
    args = ap.parse_args(argv)
    result = measure(args.case, args.runs, args.repeats)
    print(f"training grid {result['training_grid']} ({result['training_voxels']} voxels), "
          f"{result['rays_per_batch']} rays per batch, {result['repeats']} repeats, ms min / median")
    print(f"{'ray_run':>8} {'Joseph forward':>16} {'Joseph backward':>16} {'frozen step':>16}")
    for row in result["rows"]:
        print(f"{row['ray_run']:>8} " + " ".join(
            f"{row[p + '_min_ms']:>7.1f} / {row[p + '_median_ms']:<6.1f}" for p in ("forward", "backward", "step")))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.out.with_suffix(args.out.suffix + ".tmp")
        tmp.write_text(json.dumps(result, indent=1))
        tmp.replace(args.out)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
