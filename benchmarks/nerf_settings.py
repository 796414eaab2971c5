#!/usr/bin/env python3
"""Try nerf settings on a benchmark case: the trainer in-process, PSNR3D/SSIM3D along the way.

For choosing defaults: any `NerfConfig` field can be overridden (`--set key=value`, values are
Python literals), the volume is scored against the case's ground truth every `--score-every`
iterations, and one JSON line per run is appended to `--out`. The case is chosen and made as in
bench_nerf.py (the same --ct/--det/--pitch/--i0 options; RTK's Joseph projector; cached in --cases).

    python benchmarks/nerf_settings.py --views 25 --set refine_fraction=1.0 tv_weight=0.03
"""
from __future__ import annotations

import argparse
import ast
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from CTNeRFReconLib import metrics  # noqa: E402
from CTNeRFReconLib.formats import load_scan  # noqa: E402
from CTNeRFReconLib.methods import RunContext  # noqa: E402
from CTNeRFReconLib.nerf.config import NerfConfig  # noqa: E402
from CTNeRFReconLib.nerf.method import fdk_warm_start  # noqa: E402
from CTNeRFReconLib.nerf.train import NerfTrainer, training_grid  # noqa: E402
from CTNeRFReconLib.reference import load_reference  # noqa: E402
from rtk_reference import add_case_options, case_for  # noqa: E402


def parse_settings(pairs: list[str]) -> dict:
    settings = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        if not value:
            raise SystemExit(f"--set {pair}: write key=value")
        settings[key] = ast.literal_eval(value)
    NerfConfig.from_settings(settings)  # unknown keys are refused here, before any work
    return settings


def main(argv=None):
    here = Path(__file__).resolve().parents[1]
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_case_options(ap)
    ap.add_argument("--views", type=int, default=25)
    ap.add_argument("--save", type=Path, help="write the final volume here (.nrrd) for a closer look")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE")
    ap.add_argument("--score-every", type=int, default=250)
    ap.add_argument("--out", type=Path, default=here / "bench_results" / "nerf_settings.jsonl")
    a = ap.parse_args(argv)
    settings = parse_settings(a.set)
    case = case_for(a, a.views)
    scan = load_scan(case)
    ref, _ = load_reference(case / "reference.nrrd", "mu", 0.02)
    cfg = NerfConfig.from_settings(settings)
    curve, trainer = [], None

    def on_progress(**f):
        it = f.get("iteration")
        if trainer is not None and it and "loss" in f and it % a.score_every == 0:
            s = metrics.score_volumes(ref, trainer.output_volume())
            curve.append(dict(iteration=it, seconds=f.get("elapsed_s"), psnr=round(s["psnr"], 3),
                              ssim=round(s["ssim"], 4)))
            print(json.dumps(curve[-1]), flush=True)

    t0 = time.perf_counter()
    fdk = fdk_warm_start(scan, training_grid(ref.grid, cfg), "cpu") if cfg.fdk_init_iterations > 0 else None
    trainer = NerfTrainer(scan, ref.grid, cfg, RunContext(device="cpu", settings=settings,
                                                          on_progress=on_progress), fdk_volume=fdk)
    volume = trainer.run()
    final = metrics.score_volumes(ref, volume)
    if a.save:
        from CTNeRFReconLib.volume_io import write_volume
        write_volume(volume, a.save)
    row = dict(case=case.name, views=a.views, settings=settings, tv_weight=round(trainer.tv_weight, 6),
               noise_sigma=round(trainer.noise_variance ** 0.5, 5), psnr=round(final["psnr"], 3), ssim=round(final["ssim"], 4),
               seconds=round(time.perf_counter() - t0, 1), curve=curve)
    print(json.dumps({k: v for k, v in row.items() if k != "curve"}))
    a.out.parent.mkdir(parents=True, exist_ok=True)
    with open(a.out, "a") as fh:
        fh.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
