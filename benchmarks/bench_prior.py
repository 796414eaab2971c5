#!/usr/bin/env python3
"""Does the deep prior earn its keep? The nerf method with and without its deep image prior.

Runs a matrix of CTs x view counts x variants through the real command line (a subprocess each,
`--reference` on the case's ground-truth grid, CPU, seed 0, the same `--time-limit` for every
variant), scores every volume with the referee's score.py (world coordinates; ours when score.py
is absent), prints a table and writes JSON (with the machine's load average before and after each
run: other jobs share the CPU, so equal wall-clock budgets are not equal work).

    python benchmarks/bench_prior.py --cts abdomen slab finehead --views 10 \
        --variants full no-prior --time-limit 150

Cases are RTK-made (benchmarks/rtk_reference.py: Joseph projector, Poisson noise) and cached in
--cases. CTs:

* `abdomen`: ../shared/data/abdomen_ct.nii.gz (122 x 101 x 112, 3 mm), 240 px at 3.2 mm.
* `slab`: ../shared/data/abdomen_small_ct.nii.gz (its upper 30 slices), 240 px at 3.2 mm (the body
  is 363 mm wide: a 160 px detector would truncate it).
* `finehead`: a procedural head-like volume written on first use to --cases (see make_finehead):
  a 5 mm bone shell around water, two low-density ventricles, 48 small spheres (2-7 mm radius,
  +-5..40 % of water) and 12 thin bone-like rods (1.5 mm radius), on a 64 x 72 x 64 grid at 3 mm;
  160 px at 3.2 mm. Compact and piecewise constant with voxel-scale detail: unlike the abdomen.

Variants: `full` (the defaults), `no-prior` (--no-prior: free VM factors and the detail grid from
the start), `keep-gen` (the generator through the end: refine_fraction=0, hence no detail grid), `gen-init`
(refine_fraction=1: no generator phase, free factors starting from the untrained generator's output,
the earlier ablation's "without the deep-prior phase"),
`wide-gen` (generator_width=64), `late-refine` (refine_fraction=0.2), `gen-detail-lr` (a tenth of the
detail grid's learning rate), or any `NAME=ARGS` given with --define (ARGS: CLI arguments, e.g.
--define 'gen80=--setting refine_fraction=0.2 --setting generator_width=48'). Results accumulate in
--out/results.json keyed by (CT, views, I0, variant), so the matrix can be run in parts.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_default_grid import referee_score  # noqa: E402
from bench_nerf import prebuild_kernels  # noqa: E402
from rtk_reference import case_name, make_case  # noqa: E402

HERE = Path(__file__).resolve().parents[1]
SHARED = HERE.parent / "shared"
CACHE = Path.home() / ".cache" / "ctnerf_bench"

VARIANTS: dict[str, list[str]] = {
    "full": [],
    "no-prior": ["--no-prior"],
    "keep-gen": ["--setting", "refine_fraction=0"],
    "gen-init": ["--setting", "refine_fraction=1"],
    "wide-gen": ["--setting", "generator_width=64"],
    "late-refine": ["--setting", "refine_fraction=0.2"],
    "gen-detail-lr": ["--setting", "detail_lr=0.001"],
}


def make_finehead(path: Path, seed: int = 0) -> Path:
    """Write the procedural `finehead` CT (HU, NIfTI) to `path`; reuse it when there."""
    if path.exists():
        return path
    import SimpleITK as sitk

    from CTNeRFReconLib.geometry import VolumeGrid
    from CTNeRFReconLib.phantom import Ellipsoid, voxelize

    rng = np.random.default_rng(seed)
    shape = (64, 72, 64)
    grid = VolumeGrid(shape, (3.0,) * 3, tuple(-(n - 1) * 1.5 for n in shape))
    ells = [Ellipsoid((0, 0, 0), (80, 95, 85), 2.0),        # bone shell (HU +1000) ...
            Ellipsoid((0, 0, 0), (75, 90, 80), -1.0),       # ... around water (HU 0)
            Ellipsoid((18, 10, 5), (10, 28, 18), -0.15, -18),   # ventricles (HU -150)
            Ellipsoid((-18, 10, 5), (10, 28, 18), -0.15, 18)]
    for _ in range(48):  # small inserts, inside the brain
        while True:
            c = rng.uniform(-1, 1, 3) * np.array([60, 75, 65])
            if np.sum((c / np.array([62, 77, 67])) ** 2) < 1:
                break
        r = rng.uniform(2.0, 7.0)
        v = rng.choice([-1, 1]) * rng.uniform(0.05, 0.4)
        ells.append(Ellipsoid(tuple(c), (r, r, r * rng.uniform(0.6, 1.4)), float(v)))
    for _ in range(12):  # thin rods in x-y, any orientation about z
        c = rng.uniform(-1, 1, 3) * np.array([35, 45, 55])
        ells.append(Ellipsoid(tuple(c), (rng.uniform(12, 25), 1.5, 1.5), 0.5, float(rng.uniform(0, 180))))
    mu = voxelize(ells, grid, supersample=3)  # in units of water
    hu = np.clip(1000.0 * (mu - 1.0), -1000, 3000).astype(np.int16)
    img = sitk.GetImageFromArray(hu)
    img.SetSpacing(grid.spacing_xyz)
    img.SetOrigin(grid.origin_xyz)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(img, str(path))
    return path


CTS = {
    "abdomen": dict(ct=lambda: SHARED / "data" / "abdomen_ct.nii.gz", det=240, pitch=3.2),
    "slab": dict(ct=lambda: SHARED / "data" / "abdomen_small_ct.nii.gz", det=240, pitch=3.2),
    "finehead": dict(ct=lambda: make_finehead(CACHE / "finehead_ct.nii.gz"), det=160, pitch=3.2),
}


def case_of(ct: str, views: int, i0: float, cases: Path) -> Path:
    spec = CTS[ct]
    path = spec["ct"]()
    return make_case(path, cases / case_name(path, views, spec["det"], spec["pitch"], i0), views=views,
                     det=spec["det"], pitch=spec["pitch"], i0=i0)


def run_one(case: Path, tag: str, args: list[str], out: Path, time_limit: float, seed: int,
            score_py: Path, margin: int, keep: bool) -> dict:
    run_dir = out / f"run_{tag}"
    if run_dir.exists():
        shutil.rmtree(run_dir)
    cmd = [sys.executable, "-m", "CTNeRFReconLib", "reconstruct", str(case), "--out", str(run_dir),
           "--reference", str(case / "reference.nrrd"), "--reference-units", "mu", "--method", "nerf",
           "--device", "cpu", "--seed", str(seed), "--quiet", "--snapshot-every", "0",
           "--time-limit", f"{time_limit:g}", *args]
    load0 = os.getloadavg()
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=HERE)
    seconds = time.perf_counter() - t0
    if proc.returncode:
        raise RuntimeError(f"{tag} failed ({proc.returncode}): {proc.stderr[-2000:]}")
    run = json.loads((run_dir / "run.json").read_text())
    report = run.get("method_report") or {}
    budget = report.get("time_budget") or {}
    ours = json.loads((run_dir / "metrics.json").read_text()) if (run_dir / "metrics.json").exists() else {}
    final = referee_score(score_py, case / "reference.nrrd", run_dir / "volume.nrrd", margin)
    row = dict(args=args, seconds=round(seconds, 1), method_seconds=run.get("elapsed_s"),
               iterations=run.get("iteration"), planned_iterations=budget.get("iterations_planned"),
               rate_it_per_s=budget.get("rate_it_per_s"), stopped_at_deadline=budget.get("stopped_at_deadline"),
               psnr=final["psnr"], ssim=final["ssim"], scorer=final["scorer"],
               ours_metrics={k: ours[k] for k in ("psnr", "ssim") if k in ours},
               training_grid=(report.get("support") or {}).get("training_grid_shape_xyz"),
               load_before=[round(x, 2) for x in load0],
               load_after=[round(x, 2) for x in os.getloadavg()])
    if not keep:
        shutil.rmtree(run_dir, ignore_errors=True)
    return row


def print_table(rows: list[dict]) -> None:
    print(f"{'CT':9s} {'views':>5s} {'I0':>7s} {'variant':14s} {'PSNR3D':>7s} {'SSIM3D':>7s} {'seconds':>8s} "
          f"{'iters':>6s} {'load':>5s}")
    for r in sorted(rows, key=lambda r: (r["ct"], r["views"], r["i0"], r["order"])):
        print(f"{r['ct']:9s} {r['views']:5d} {r['i0']:7.0e} {r['variant']:14s} {r['psnr']:7.2f} {r['ssim']:7.3f} "
              f"{r['seconds']:8.1f} {r['iterations'] or 0:6d} {r['load_before'][0]:5.1f}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cts", nargs="+", default=["abdomen", "slab", "finehead"], choices=sorted(CTS))
    ap.add_argument("--views", nargs="+", type=int, default=[10])
    ap.add_argument("--variants", nargs="+", default=["full", "no-prior"])
    ap.add_argument("--define", action="append", default=[], metavar="NAME=ARGS",
                    help="a variant: its name and the CLI arguments it adds")
    ap.add_argument("--i0", type=float, default=1e5, help="photons per detector pixel of the cases")
    ap.add_argument("--time-limit", type=float, default=150.0, help="--time-limit of every run, seconds")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cases", type=Path, default=CACHE)
    ap.add_argument("--score-py", type=Path, default=SHARED / "bench" / "score.py")
    ap.add_argument("--margin", type=int, default=0, help="score.py --margin (0: the whole reference grid)")
    ap.add_argument("--keep-runs", action="store_true", help="keep the run folders (volumes) under --out")
    ap.add_argument("--out", type=Path, default=HERE / "benchmarks" / "results" / "prior")
    a = ap.parse_args(argv)
    variants = dict(VARIANTS)
    for d in a.define:
        name, _, args = d.partition("=")
        variants[name] = shlex.split(args)
    unknown = [v for v in a.variants if v not in variants]
    if unknown:
        raise SystemExit(f"unknown variant(s) {unknown}; known: {sorted(variants)} (or --define NAME=ARGS)")
    a.out.mkdir(parents=True, exist_ok=True)
    prebuild_kernels()
    path = a.out / "results.json"
    doc = json.loads(path.read_text()) if path.exists() else dict(results=[])
    doc.update(cpu_count=os.cpu_count(), time_limit_s=a.time_limit, seed=a.seed,
               cts={k: dict(det=v["det"], pitch=v["pitch"]) for k, v in CTS.items()})
    rows = doc["results"]
    for ct in a.cts:
        for views in a.views:
            case = case_of(ct, views, a.i0, a.cases)
            for k, name in enumerate(a.variants):
                tag = f"{ct}_{views}v_{name}" + ("" if a.i0 == 1e5 else f"_i0{a.i0:g}")
                row = dict(ct=ct, views=views, i0=a.i0, variant=name, order=list(variants).index(name), case=str(case),
                           time_limit_s=a.time_limit,
                           **run_one(case, tag, variants[name], a.out, a.time_limit, a.seed, a.score_py, a.margin,
                                     a.keep_runs))
                print(json.dumps(row), flush=True)
                rows[:] = [r for r in rows if (r["ct"], r["views"], r["i0"], r["variant"])
                           != (ct, views, a.i0, name)] + [row]
                doc["load_average_now"] = os.getloadavg()
                path.write_text(json.dumps(doc, indent=1))
    print()
    print_table(rows)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
