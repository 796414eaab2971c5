"""The `ctnerf` / `python -m CTNeRFReconLib` command line: reconstruct, simulate, info, demo, and a run's
field: export, surface, check (cli_field.py).

`reconstruct` is also the worker the Slicer module starts; its stdout protocol is described in
events.py and worker.py. Exit codes are events.ExitCode (0 also for a cancelled run).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .events import EventWriter, ExitCode, FailureKind, stdout_wants_events
from .phantom import MU_WATER
from .projection_check import RESIDUALS_EVERY_S


class UsageError(ValueError):
    """A command line argparse could not accept."""


class _Parser(argparse.ArgumentParser):
    """Raises UsageError instead of exiting, so `reconstruct` can report it as a `failed` event."""

    def error(self, message):
        raise UsageError(f"{self.prog}: {message}")


def _add_reconstruct(sub):
    p = sub.add_parser("reconstruct", help="reconstruct a scan into a run folder (also the Slicer worker)",
                       description="Reconstruct an attenuation volume (1/mm) from the projections in DATA.")
    p.add_argument("data", type=Path, metavar="DATA", help="scan file or folder (RTK case, NAF pickle, "
                   "R2-Gaussian folder, geometry file + --projections)")
    p.add_argument("--out", type=Path, required=True, metavar="RUN_DIR", help="run folder (created if missing)")
    p.add_argument("--projections", type=Path, metavar="FILE", help="projection stack, when DATA is a geometry file")
    p.add_argument("--drop-views", type=int, nargs="+", default=(), metavar="N",
                   help="leave these views (indices into the data) out of everything: a corrupt frame, or one the "
                   "projection check names; the views left are numbered anew")
    p.add_argument("--reference", type=Path, metavar="CT_FILE",
                   help="reference CT: its grid becomes the output grid and the result is scored against it")
    p.add_argument("--reference-units", choices=("auto", "mu", "hu"), default="auto",
                   help="units of the reference: mu (1/mm), hu (converted with --mu-water), auto (HU when it "
                        "has values below -100 or above 5; default)")
    p.add_argument("--mu-water", type=float, default=MU_WATER, metavar="MU",
                   help=f"water attenuation in 1/mm for HU references (default {MU_WATER})")
    p.add_argument("--method", default=None, help="reconstruction method: nerf (default when available) or fdk")
    p.add_argument("--preset", choices=("preview", "standard", "high"), default="standard",
                   help="quality/time trade-off of the method (default standard)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="compute device (auto: cuda when torch sees a GPU)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue the run in RUN_DIR from its checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace the results of a finished run in RUN_DIR")
    p.add_argument("--grid-spacing", type=float, metavar="MM", help="output voxel size, keeping the grid's box")
    p.add_argument("--grid-size", type=int, nargs=3, metavar=("X", "Y", "Z"),
                   help="output voxel counts, keeping the grid's box (its centre with --grid-spacing)")
    p.add_argument("--iterations", type=int, metavar="N", help="iterations of an iterative method")
    p.add_argument("--snapshot-every", type=int, metavar="N", help="iterations between snapshots (0: none)")
    p.add_argument("--progress-every", type=int, metavar="N", help="iterations between progress events")
    p.add_argument("--residuals-every", type=float, default=RESIDUALS_EVERY_S, metavar="SECONDS",
                   help="at least this many seconds between the per-view residuals of the snapshots while the run "
                        "trains (the `residuals` event; at most 2 %% of the run's time; default 10; 0: none)")
    p.add_argument("--no-kernels", action="store_true", help="use the PyTorch renderer, not the fused kernels")
    p.add_argument("--tv-weight", type=float, metavar="W", help="nerf's TV prior weight (default: from the "
                   "projections' noise and rays per voxel; larger is smoother)")
    p.add_argument("--time-limit", type=float, metavar="SECONDS",
                   help="nerf: the best result within this wall-clock time; the iteration count is planned from "
                        "the measured rate (with --iterations: at most that many)")
    p.add_argument("--no-support", action="store_true",
                   help="nerf: train on the whole grid box instead of the object's support carved from the "
                        "projections (voxels some view shows in air)")
    p.add_argument("--no-coarse-to-fine", action="store_true",
                   help="nerf: train on the full training grid from the start instead of a coarser grid first")
    p.add_argument("--no-prior", action="store_true",
                   help="nerf: no deep image prior; the VM factors are free parameters from the start (TensoRF)")
    p.add_argument("--setting", action="append", default=[], metavar="NAME=VALUE",
                   help="nerf: set one field of its configuration (CTNeRFReconLib/nerf/config.py), e.g. "
                        "refine_fraction=0.3 or coarse_levels=[4,2]; repeatable; for experiments")
    p.add_argument("--fdk-filter", metavar="WINDOW", help="FDK's ramp filter window: ram-lak, shepp-logan, cosine, "
                   "hamming or hann (default hann)")
    p.add_argument("--fdk-cutoff", type=float, metavar="F", help="FDK's filter cut-off, fraction of Nyquist in (0, 1] "
                   "(default 1)")
    p.add_argument("--quiet", action="store_true", help="no progress bar or messages (events still go out)")


def _add_simulate(sub):
    p = sub.add_parser("simulate", help="simulate a cone-beam scan of a CT volume (an RTK case)",
                       description="Project a CT (HU) on a circular orbit with Poisson noise; writes an RTK case.")
    p.add_argument("ct", type=Path, metavar="CT_FILE")
    p.add_argument("--views", type=int, required=True)
    p.add_argument("--out", type=Path, required=True, metavar="DATA")
    p.add_argument("--det", type=int, default=240, help="detector pixels per side (default 240)")
    p.add_argument("--pitch", type=float, default=3.2, help="detector pitch in mm (default 3.2)")
    p.add_argument("--i0", type=float, default=1e5, help="photons per pixel, 0 for no noise (default 1e5)")
    p.add_argument("--sid", type=float, default=1000.0, help="source-isocentre distance in mm")
    p.add_argument("--sdd", type=float, default=1500.0, help="source-detector distance in mm")
    p.add_argument("--mu-water", type=float, default=MU_WATER, help="water attenuation in 1/mm")
    p.add_argument("--voxel", type=float, default=3.0, help="voxel size in mm of the ground truth (default 3)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace DATA when it holds files (refused otherwise)")
    p.add_argument("--quiet", action="store_true", help="no progress bar or messages")


def _add_info(sub):
    p = sub.add_parser("info", help="show what was detected in a scan (format, geometry, default grid)")
    p.add_argument("data", type=Path, metavar="DATA")
    p.add_argument("--projections", type=Path, metavar="FILE")
    p.add_argument("--drop-views", type=int, nargs="+", default=(), metavar="N",
                   help="describe the scan without these views, as `reconstruct --drop-views` sees it")
    p.add_argument("--json", action="store_true", help="print JSON (one line) instead of text")
    p.add_argument("--no-support", action="store_true",
                   help="skip carving the object's support (seconds on large scans; needs torch): only what the "
                        "files say")


def _add_demo(sub):
    p = sub.add_parser("demo", help="simulate a phantom scan, reconstruct it and score it",
                       description="Simulate a Shepp-Logan phantom scan into DIR/data, reconstruct it into "
                                   "DIR/run (replacing an earlier demo there) and print PSNR/SSIM.")
    p.add_argument("--out", type=Path, default=Path("demo_run"), metavar="DIR", help="default ./demo_run")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--method", default=None, help="nerf (default when available) or fdk")
    p.add_argument("--preset", choices=("preview", "standard", "high"), default="preview")
    p.add_argument("--iterations", type=int, metavar="N", help="a fixed iteration count instead of the time limit")
    p.add_argument("--time-limit", type=float, metavar="SECONDS",
                   help="nerf's wall-clock budget (default 45 unless --iterations is given; 0: none)")
    p.add_argument("--small", action="store_true", help="a tiny case that runs in seconds (smoke test)")
    p.add_argument("--quiet", action="store_true")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="ctnerf", description="Sparse-view cone-beam CT reconstruction (CTNeRFRecon).")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)
    _add_reconstruct(sub)
    _add_simulate(sub)
    _add_info(sub)
    _add_demo(sub)
    from .cli_field import add_parsers as _add_field_commands

    _add_field_commands(sub)  # export, surface, check: a run's field (cli_field.py)
    return parser


def _passive_openmp_threads():
    """OpenMP threads that sleep between parallel regions instead of spinning (a user's value is kept).

    Why: FDK and every nerf iteration are hundreds of short parallel loops. Spinning threads (the
    default) steal the CPU from each other as soon as anything else runs on the machine (Slicer beside
    the worker, a second job), and a loop then waits for a descheduled thread: on 2 busy cores the
    25-view abdomen FDK took 2.4 s spinning and 0.25 s passive, and a nerf iteration on its default
    grid 0.77-1.35 s spinning against 0.19-0.44 s passive (README, "reconstruct"). On an idle machine
    FDK measured no difference. OpenMP reads it when torch loads it, so it is set before that."""
    if "torch" not in sys.modules:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def reconstruct_options(args):
    """The ReconstructOptions of a parsed `reconstruct` command line (the panel's Resume rebuilds one from
    run.json through here too: Testing/test_resume_options.py checks every field survives the trip)."""
    from .worker import ReconstructOptions

    return ReconstructOptions(
        data=args.data, out=args.out, projections=args.projections, drop_views=tuple(args.drop_views),
        reference=args.reference,
        reference_units=args.reference_units, mu_water=args.mu_water, method=args.method, preset=args.preset,
        device=args.device, seed=args.seed, resume=args.resume, overwrite=args.overwrite,
        grid_spacing=args.grid_spacing, grid_size=None if args.grid_size is None else tuple(args.grid_size),
        iterations=args.iterations, snapshot_every=args.snapshot_every, progress_every=args.progress_every,
        residuals_every=args.residuals_every,
        kernels=not args.no_kernels, tv_weight=args.tv_weight, fdk_filter=args.fdk_filter, fdk_cutoff=args.fdk_cutoff,
        quiet=args.quiet, time_limit=args.time_limit, support=not args.no_support,
        coarse_to_fine=not args.no_coarse_to_fine, use_prior=not args.no_prior,
        setting_overrides=tuple(args.setting))


def _reconstruct(args) -> int:
    _passive_openmp_threads()
    from .worker import run_reconstruction

    return run_reconstruction(reconstruct_options(args))


class _ViewProgress:
    """Projected views as a tqdm bar on a terminal, else a line at every tenth of them: 360 views of 768^2
    take minutes, and a silent command looks hung."""

    def __init__(self, quiet: bool):
        self.quiet = quiet
        self.bar = None
        self.said = 0

    def __call__(self, done: int, total: int):
        if self.quiet:
            return
        if sys.stderr.isatty():
            if self.bar is None:
                from tqdm import tqdm

                self.bar = tqdm(total=total, file=sys.stderr, unit="view", dynamic_ncols=True, desc="projecting")
            self.bar.update(done - self.bar.n)
        elif done == total or done * 10 // total > self.said:
            self.said = done * 10 // total
            print(f"projected {done} of {total} views", file=sys.stderr, flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def _simulate(args) -> int:
    from .simulate import simulate_case

    progress = _ViewProgress(args.quiet)
    try:
        simulate_case(args.ct, args.out, views=args.views, det=args.det, pitch=args.pitch, sid=args.sid,
                      sdd=args.sdd, i0=args.i0, mu_water=args.mu_water, seed=args.seed, voxel=args.voxel,
                      overwrite=args.overwrite, progress=progress)
    finally:
        progress.close()
    out = Path(args.out).absolute()
    if not args.quiet:
        print(f"wrote an RTK case of {args.views} views ({args.det} x {args.det} detector) to {out}; "
              f"try: python -m CTNeRFReconLib reconstruct {out} --reference {out / 'reference.nrrd'} --out RUN_DIR")
    return ExitCode.OK


def _air_noise_into(out: dict, scan):
    """The air's photon noise and the detector's fixed pattern (nerf/prior_weight.noise_law), with a note
    where the pattern draws rings; nothing where no view shows enough air."""
    import math

    import numpy as np

    from .nerf.prior_weight import fixed_pattern_note, noise_law

    law = noise_law(scan.projections, np.ones(scan.projections.shape, dtype=bool),
                    measured=None if scan.defects is None else ~scan.defects)
    if law.air_variance is None:
        return
    out["air_noise"] = {"photon_sigma": math.sqrt(law.air_variance),
                        "fixed_pattern_rms": None if law.fixed_pattern_variance is None
                        else math.sqrt(law.fixed_pattern_variance)}
    note = fixed_pattern_note(law)
    if note is not None:
        out["notes"] = list(out.get("notes", [])) + [note]


def info_dict(scan, support: bool = True) -> dict:
    """What `info --json` prints: the scan's summary plus the default output grid, and the object's
    support carved on the output grid unless `support` is False."""
    from .fov import default_grid, pitch_at_isocentre

    out = scan.summary()
    out["voxel_at_isocentre_mm"] = pitch_at_isocentre(scan.geometry)
    grid = None
    try:
        grid = default_grid(scan.geometry)
        out["default_grid"] = grid.to_dict()
    except ValueError as exc:
        out["default_grid"] = None
        out["notes"] = list(out.get("notes", [])) + [str(exc)]
    grid = scan.grid or (scan.reference.grid if scan.reference is not None else None) or grid
    _air_noise_into(out, scan)
    if grid is not None and support:
        from .support import object_support

        # what nerf would carve: voxels of that grid some view shows in air (support.py)
        carved = object_support(scan.projections, scan.geometry, grid)
        out["support"] = carved.summary()
        if carved.found:  # and how far nerf would train past the ends the detector cuts (axial_extension.py)
            from .axial_extension import plan_for_scan

            extension = plan_for_scan(scan.projections, scan.geometry, carved.threshold, *carved.bounds(),
                                      grid.spacing_xyz, carved.faces_reached)
            if extension is not None:
                out["support"]["extended"] = extension.summary()
        if carved.threshold is not None:  # and how far past the sides, for an object wider than the field of view
            from .lateral_extension import plan_for_scan
            from .nerf.config import NerfConfig

            defaults = NerfConfig()
            widened = plan_for_scan(scan.projections, scan.geometry, carved.threshold, grid,
                                    defaults.cut_sides_fraction, measure_thin=defaults.measure_thin_sides,
                                    faces_reached=carved.faces_reached if carved.found else ())
            if widened is not None:
                out["support"]["widened"] = widened.summary()
    shipped = scan.grid or (scan.reference.grid if scan.reference is not None else None)
    if shipped is not None:
        from .formats.validate import grid_problem

        problem = grid_problem(scan.geometry, shipped)
        if problem is not None:  # `reconstruct` refuses this grid; say so here already
            out["notes"] = list(out.get("notes", [])) + [f"the data's grid is unusable: {problem}"]
    return out


def _info(args) -> int:
    from .events import to_json_value
    from .formats import describe, load_scan

    # views with nothing to fit are named, not refused: this is where a user looks at the data; the
    # rest is worked out without them, as reconstruct sees the scan once they are left out
    scan = load_scan(args.data, projections=args.projections, keep_bad_views=True)
    bad = sorted(set(scan.bad_views) - set(args.drop_views))
    leave_out = sorted(set(args.drop_views) | set(bad))
    reason = "--drop-views" if not bad else "nothing to reconstruct from in " + ", ".join(map(str, bad)) + (
        "; --drop-views" if args.drop_views else "")
    analysed = scan.without_views(leave_out, reason) if leave_out else scan
    details = info_dict(analysed, support=not args.no_support)
    if bad:
        details["bad_views"] = {str(v): scan.bad_views[v] for v in bad}
    if args.json:
        print(json.dumps(to_json_value(details)))  # one line: what a caller reads (slicer_bridge.commands)
        return ExitCode.OK
    print(describe(analysed)["description"])
    for note in details.get("notes", [])[len(analysed.summary().get("notes", [])):]:
        print(note)
    if bad:
        print(f"views with nothing to reconstruct from, left out here; reconstruct refuses them until they are "
              f"left out with --drop-views {' '.join(map(str, leave_out))}:")
        for v in bad:
            print(f"  view {v} {scan.bad_views[v]}")
    noise = details.get("air_noise")
    if noise:  # what the TV weight and the ray weights start from (nerf/prior_weight.py)
        sigma, pattern = noise["photon_sigma"], noise["fixed_pattern_rms"]
        # 1 / variance counts a pixel's photons only where pixels do not share light (a scintillator's blur
        # makes it more): a scale for the noise, not a dose
        photons = f" (1 / its variance: {1.0 / sigma ** 2:.3g}, the photons a pixel counts without blur)" \
            if sigma > 0 else ""
        fixed = "" if pattern is None else f"; a pattern fixed on the detector of {pattern:.4f} rms"
        print(f"air: photon noise {sigma:.4f} in line integral{photons}{fixed}")
    grid = details["default_grid"]
    displaced = details.get("displaced_detector")
    if displaced:
        print(f"displaced detector on a full orbit (a half-fan scan): {displaced['offset_mm']:g} mm off its principal "
              f"point, both sides of it measured over {displaced['overlap_mm']:g} mm (at the detector); the default "
              "grid is the whole circle its far edge reaches, each line measured once")
    if scan.grid is None and grid is not None:
        seen = "the field of view the full orbit measures" if displaced else "field of view seen by every view"
        print(f"default grid ({seen}): {grid['shape_xyz']} voxels (x, y, z) of "
              f"{grid['spacing_xyz'][0]:.4g} mm, origin {[round(v, 3) for v in grid['origin_xyz']]} mm")
    support = details.get("support")
    if support is not None:
        if support["found"]:
            print(f"object support (voxels no view shows in air): box {support['box_shape_xyz']} of "
                  f"{support['grid_shape_xyz']} voxels, {support['box_lo_mm']} to {support['box_hi_mm']} mm "
                  f"({100 * support['box_fraction']:.0f} % of the grid; support {100 * support['fraction']:.0f} %); "
                  f"air level {support['air_level']:.4g}, carving below {support['threshold']:.4g}")
            if support.get("faces_reached"):
                print(f"  it reaches the grid's {', '.join(support['faces_reached'])} face(s): the object probably "
                      "goes on beyond the grid (see reconstruct's warning for a larger box)")
            if support.get("extended"):
                ext = support["extended"]
                print(f"  the detector's {', '.join(ext['edges'])} edge(s) see object: nerf trains "
                      f"{' and '.join(f'{mm:g}' for mm in ext['mm'])} mm past the box's ends along {ext['axis']}")
        else:
            print(f"object support: none carved ({support['reason']})")
        if support.get("widened"):
            from .lateral_extension import describe_faces

            wide = support["widened"]
            print(f"  the detector's {', '.join(wide['edges'])} edge(s) see object (wider than the field of view): "
                  f"nerf trains {describe_faces(wide)}")
    return ExitCode.OK


def _demo(args) -> int:
    _passive_openmp_threads()
    from .demo import run_demo

    return run_demo(args.out, device=args.device, method=args.method, preset=args.preset, small=args.small,
                    iterations=args.iterations, quiet=args.quiet, time_limit=args.time_limit)


COMMANDS = {"reconstruct": _reconstruct, "simulate": _simulate, "info": _info, "demo": _demo}
from .cli_field import COMMANDS as _FIELD_COMMANDS  # noqa: E402

COMMANDS.update(_FIELD_COMMANDS)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except UsageError as exc:
        # the worker's client reads events: a bad command line is a refusal like any bad input
        if argv and argv[0] == "reconstruct" and stdout_wants_events():
            EventWriter(sys.stdout).emit("failed", message=str(exc), kind=FailureKind.BAD_INPUT.value)
        parser.print_usage(sys.stderr)
        print(f"error: {exc}", file=sys.stderr)
        return ExitCode.BAD_INPUT
    if args.command == "reconstruct":
        return int(_reconstruct(args))  # reports its own failures as events
    try:
        return int(COMMANDS[args.command](args))
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return ExitCode.BAD_INPUT
    except ImportError as exc:
        print(f"error: a dependency is missing: {exc}", file=sys.stderr)
        return ExitCode.MISSING_DEPENDENCY


if __name__ == "__main__":
    sys.exit(main())
