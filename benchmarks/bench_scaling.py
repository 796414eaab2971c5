#!/usr/bin/env python3
"""How the default run's cost grows with the grid and the views: a per-iteration cost breakdown
before and after (support and coarse-to-fine), and optionally whole runs (time to quality, memory).

The grid a user without a reference gets is the default grid (the box every view sees, at the
detector pitch at the isocentre), so the cases differ by detector size at a fixed field of view:
`--dets 64 128 192 256` give default grids of about 64^3 to 256^3 (pitch 768 / det mm), each from the
abdomen CT (projected by RTK's Joseph projector, benchmarks/rtk_reference.py; its 3 mm ground truth
is resampled to the finer grid by the scorer). `--views` scales the view count at `--view-det`.

Profile (always; every configuration in its own process, so its peak memory is its own): the
trainer is built as the worker builds it, then each part of one iteration is timed over a few
repeats, forward and backward: the generator, materialising the field on the training grid, the ray
integrals of one batch at the largest ray count, the TV term, and the optimiser step, plus the
whole step; `before` is the whole box on the full grid (no support, no coarse level), `after` the
default (support; the coarse level's iteration and the full level's). Runs (`--time-limit S`): the
command line as a user runs it (no reference) on every configuration, scored by the referee's
score.py --margin 2, with PSNR3D against time from its snapshots, plotted per configuration.

    python benchmarks/bench_scaling.py --dets 64 128 192 256 --views 10 25 50 100 \
        --out benchmarks/results/scaling
    python benchmarks/bench_scaling.py --dets 256 --views 50 --view-det 256 --time-limit 840 --runs-only

Prints tables and writes OUT/results.json (and OUT/psnr_vs_time.png with runs).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from rtk_reference import add_case_options, case_name, make_case  # noqa: E402

FOV_MM = 768.0
"""Detector width in mm at every size (the referee's 240 x 3.2 mm): the field of view stays fixed."""
PARTS = ("generator", "materialise", "integrate", "tv", "optimiser", "step")


def case_at(args, det: int, views: int) -> Path:
    pitch = round(FOV_MM / det, 4)
    return make_case(args.ct, args.cases / case_name(args.ct, views, det, pitch, args.i0, args.voxel), views=views,
                     det=det, pitch=pitch, i0=args.i0, voxel=args.voxel)


def _timed(fn, repeats: int) -> float:
    """Milliseconds per call after one warm-up call."""
    fn()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    return round((time.perf_counter() - t0) / repeats * 1000, 1)


def profile_one(case: Path, variant: str, repeats: int, extra: dict | None = None) -> dict:
    """Build the trainer on the default grid and time each part of an iteration (this process only);
    `extra`: nerf settings on top of the variant's (e.g. {"integrator": "stratified"})."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the command line runs (cli._passive_openmp_threads)
    import torch

    from CTNeRFReconLib.formats import load_scan
    from CTNeRFReconLib.fov import default_grid
    from CTNeRFReconLib.methods import RunContext
    from CTNeRFReconLib.nerf.config import NerfConfig
    from CTNeRFReconLib.nerf.train import NerfTrainer, _tv

    scan = load_scan(case / "geometry.xml")
    grid = default_grid(scan.geometry)
    settings = dict(preset="standard") if variant == "after" else dict(preset="standard", support=False,
                                                                      coarse_levels=())
    cfg = NerfConfig.from_settings(settings | (extra or {}))
    t0 = time.perf_counter()
    trainer = NerfTrainer(scan, grid, cfg, RunContext(device="cpu"))
    setup_s = round(time.perf_counter() - t0, 2)
    n_rays = min(cfg.rays_end, len(trainer.targets))
    gen = torch.Generator().manual_seed(0)
    idx = torch.sort(torch.randint(0, len(trainer.targets), (n_rays,), generator=gen)).values  # as step() does
    o, d, tn, tf = trainer.ray_table.rays(idx)
    full = len(trainer.levels.factors)
    stages = ([("coarse", 0)] if trainer.levels.active else []) + [("full", full), ("refine", full)]
    frozen_share = max(0, 1000 - trainer._freeze_start_of(1000)) / 1000  # the trainer's own rule
    if frozen_share > 0:
        stages.append(("frozen", full))  # the end of the refinement phase: the field frozen (train.py)
    rows = []
    for stage, level in stages:
        trainer._set_level(level)
        if stage in ("refine", "frozen"):
            trainer.switch_to_direct()
        if stage == "frozen":
            trainer.freeze_field()

        def generator():
            if trainer._frozen_field is not None:
                return  # the factors take no gradient any more
            planes, lines = trainer.factors()
            (planes.sum() + lines.sum()).backward()

        planes, lines = (t.detach() for t in trainer.factors())

        def materialise():
            if trainer._frozen_field is not None:
                return  # computed once when the field froze
            p, l = planes.clone().requires_grad_(), lines.clone().requires_grad_()
            trainer.field.materialize(p, l, trainer.level_grid).sum().backward()

        vol = trainer._training_volume().detach().requires_grad_()

        def integrate():
            trainer.integrate(vol, o, d, tn, tf, jitter_seed=1).sum().backward()

        def tv():
            _tv(vol, trainer.tv_edge(), fused_kernel=trainer._kernel is not None).backward()

        def optimiser():
            for group in trainer.optimizer.param_groups:
                for p in group["params"]:
                    p.grad = torch.zeros_like(p) if p.requires_grad else None
            trainer.optimizer.step()

        it = {"coarse": 10, "full": trainer.refine_start - 1, "refine": trainer.refine_start,
              "frozen": trainer.iterations - 1}[stage]
        row = dict(stage=stage, level_grid=list(trainer.level_grid.shape_xyz), samples_per_ray=trainer.n_samples,
                   generator=_timed(generator, repeats), materialise=_timed(materialise, repeats),
                   integrate=_timed(integrate, repeats), tv=_timed(tv, repeats),
                   optimiser=_timed(optimiser, repeats), step=_timed(lambda: trainer.step(it, n_rays), repeats))
        rows.append(row)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return dict(variant=variant, output_grid=list(grid.shape_xyz), output_voxels=grid.n_voxels,
                training_grid=list(trainer.grid.shape_xyz), training_voxels=trainer.grid.n_voxels,
                rays=len(trainer.targets), rays_per_batch=n_rays, setup_s=setup_s, levels=rows,
                coarse_fraction=trainer.levels.boundaries(1000)[-1] / 1000 if trainer.levels.active else 0.0,
                refine_fraction=cfg.refine_fraction, frozen_fraction=frozen_share, integrator=cfg.integrator,
                peak_memory_mb=round(peak_mb, 1), threads=torch.get_num_threads())


def mean_step_ms(row: dict) -> float:
    """A whole run's mean step: each stage's share of the iterations at its cost (the ray curriculum aside)."""
    frozen = row.get("frozen_fraction", 0.0)
    share = {"coarse": row["coarse_fraction"], "refine": row["refine_fraction"] - frozen, "frozen": frozen}
    share["full"] = 1.0 - share["coarse"] - row["refine_fraction"]
    return round(sum(share[lv["stage"]] * lv["step"] for lv in row["levels"]), 1)


def profile_in_child(case: Path, variant: str, repeats: int, extra: dict | None = None) -> dict:
    out = subprocess.run([sys.executable, __file__, "_profile", str(case), variant, str(repeats),
                          json.dumps(extra or {})], cwd=ROOT,
                         capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"profile of {case.name} ({variant}) failed: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def print_profiles(rows: list[dict]):
    print("\nper-iteration cost (ms, forward + backward), default grid; before = whole box, full grid; "
          "after = support, coarse level then full level; refine = the direct phase with the detail grid, "
          "frozen = its last part with the field frozen (only the detail grid learns)")
    head = f"{'case':28s} {'variant':7s} {'stage':6s} {'output':>13s} {'training':>13s} {'level grid':>13s} {'smp':>4s} " + \
           " ".join(f"{p:>10s}" for p in PARTS) + f" {'mean step':>9s} {'peak MB':>8s}"
    print(head)
    for r in rows:
        for lv in r["levels"]:
            print(f"{r['case']:28s} {r['variant']:7s} {lv['stage']:6s} {'x'.join(map(str, r['output_grid'])):>13s} "
                  f"{'x'.join(map(str, r['training_grid'])):>13s} {'x'.join(map(str, lv['level_grid'])):>13s} "
                  f"{lv['samples_per_ray']:4d} " + " ".join(f"{lv[p]:10.1f}" for p in PARTS)
                  + f" {mean_step_ms(r):9.1f} {r['peak_memory_mb']:8.0f}")


def plot_runs(runs: list[dict], path: Path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in runs:
        pts = [(p["seconds"], p["psnr"]) for p in r["curve"]] + [(r["seconds"], r["psnr"])]
        ax.plot(*zip(*pts), marker="o", label=f"{r['case']} ({'x'.join(map(str, r['output_grid']))})")
    ax.set_xlabel("seconds (whole command, 2 CPU cores)")
    ax.set_ylabel("PSNR3D dB (score.py --margin 2)")
    ax.set_title("default run, no reference: PSNR3D against time")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_profile":
        print(json.dumps(profile_one(Path(argv[1]), argv[2], int(argv[3]), json.loads(argv[4]))))
        return 0
    here = Path(__file__).resolve().parents[1]
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_case_options(ap)
    ap.add_argument("--dets", type=int, nargs="+", default=[64, 128, 192, 256],
                    help="detector sizes (default grid about det^3) at --grid-views views")
    ap.add_argument("--grid-views", type=int, default=50)
    ap.add_argument("--views", type=int, nargs="*", default=[10, 25, 50, 100], help="view counts at --view-det")
    ap.add_argument("--view-det", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--time-limit", type=float, default=None, help="also run the CLI with this limit on each case")
    ap.add_argument("--runs-only", action="store_true", help="skip the profile")
    ap.add_argument("--setting", action="append", default=[], metavar="KEY=JSON",
                    help="a nerf setting for the profile's trainers (JSON, else text), e.g. integrator=stratified")
    ap.add_argument("--score-py", type=Path, default=here.parent / "shared" / "bench" / "score.py")
    ap.add_argument("--out", type=Path, default=here / "bench_results" / "scaling")
    args = ap.parse_args(argv)
    from CTNeRFReconLib.worker import parse_setting_overrides

    extra = parse_setting_overrides(args.setting)  # the command line's own --setting rule
    args.out.mkdir(parents=True, exist_ok=True)
    from bench_nerf import prebuild_kernels

    prebuild_kernels()
    configs = [(det, args.grid_views) for det in args.dets] + [(args.view_det, v) for v in args.views]
    configs = list(dict.fromkeys(configs))
    result = dict(cpu_count=os.cpu_count(), load_average_start=os.getloadavg(), fov_mm=FOV_MM, settings=extra,
                  profiles=[], runs=[])
    for det, views in configs:
        case = case_at(args, det, views)
        if not args.runs_only:
            for variant in ("before", "after"):
                row = dict(case=case.name, det=det, views=views,
                           **profile_in_child(case, variant, args.repeats, extra))
                result["profiles"].append(row)
                print(json.dumps({k: row[k] for k in ("case", "variant", "training_grid", "setup_s")}
                                 | {"mean_step_ms": mean_step_ms(row)}), flush=True)
        if args.time_limit:
            from bench_default_grid import run_variant

            run = run_variant(case, f"support-t{args.time_limit:g}", args.out / case.name, [], args.score_py, 2,
                              curve_every=1)
            result["runs"].append(dict(case=case.name, det=det, views=views, **run))
            print(json.dumps({k: run[k] for k in ("psnr", "ssim", "seconds", "iterations", "peak_memory_mb")}),
                  flush=True)
    result["load_average_end"] = os.getloadavg()
    if result["profiles"]:
        print_profiles(result["profiles"])
    if result["runs"]:
        print("\nruns (the command line, no reference, default grid)")
        print(f"{'case':28s} {'output grid':>13s} {'PSNR3D':>7s} {'SSIM3D':>7s} {'seconds':>8s} {'iters':>6s} "
              f"{'peak MB':>8s}")
        for r in result["runs"]:
            print(f"{r['case']:28s} {'x'.join(map(str, r['output_grid'])):>13s} {r['psnr']:7.2f} {r['ssim']:7.3f} "
                  f"{r['seconds']:8.1f} {r['iterations']:6d} {r['peak_memory_mb']:8.0f}")
        plot_runs(result["runs"], args.out / "psnr_vs_time.png")
    (args.out / "results.json").write_text(json.dumps(result, indent=1))
    print(f"\nwrote {args.out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
