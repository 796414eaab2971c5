"""What a run's output grid costs it in the referee's score: the same trained field, three ways.

The referee (../shared/bench/score.py) resamples a volume onto the ground truth's grid by trilinear
interpolation. A nerf run's `volume.nrrd` holds the field evaluated at the output grid's voxel
centres (the default grid: the detector pitch at the isocentre), so the referee interpolates samples
of a field that is itself trilinear on the (coarser, unaligned) training grid: a second
interpolation, which blurs. This script scores, for one run,

* `volume.nrrd`, as the referee scores it;
* the training-grid volume (the model the projections were fitted through, voxel for voxel), which
  the referee's trilinear resampling evaluates exactly as the trainer's integrals did;
* the field at the ground truth's own voxel centres (nothing resampled at all);

so the difference between the first and the others is what the output grid's resampling costs, not
the reconstruction. It reads the run's checkpoint through `field_export.load_run_field`, as `export`
does.

    python benchmarks/output_grid_loss.py RUN_DIR REFERENCE.nrrd [--margin 2] [--out FILE.json]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_default_grid import referee_score  # noqa: E402
from CTNeRFReconLib.data import Volume  # noqa: E402
from CTNeRFReconLib.field_export import load_run_field  # noqa: E402
from CTNeRFReconLib.volume_io import read_volume, write_volume  # noqa: E402


def output_grid_loss(run_dir: Path, reference: Path, score_py: Path | None, margin: int) -> dict:
    field = load_run_field(run_dir, allow_fallback=False)
    trainer = field.trainer
    if trainer is None:
        raise SystemExit(f"{run_dir}: {field.note}; this compares a nerf run's trained field, from its checkpoint")
    rows = {"volume.nrrd": referee_score(score_py, reference, run_dir / "volume.nrrd", margin)}
    with tempfile.TemporaryDirectory() as tmp:
        training = Volume(trainer.volume_on(trainer.grid).cpu().numpy(), trainer.grid)
        rows["training grid"] = referee_score(score_py, reference, write_volume(training, Path(tmp) / "t.nrrd"),
                                              margin)
        on_reference = field.on_grid(read_volume(reference).grid)
        rows["field at the reference's voxels"] = referee_score(
            score_py, reference, write_volume(on_reference, Path(tmp) / "r.nrrd"), margin)
    return dict(run=str(run_dir), reference=str(reference), margin=margin, iteration=field.iteration,
                output_grid=dict(shape_xyz=list(field.output_grid.shape_xyz),
                                 spacing_mm=list(field.output_grid.spacing_xyz)),
                training_grid=dict(shape_xyz=list(trainer.grid.shape_xyz), spacing_mm=list(trainer.grid.spacing_xyz)),
                scores=rows)


def main(argv=None):
    here = Path(__file__).resolve().parents[1]
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("reference", type=Path)
    ap.add_argument("--margin", type=int, default=2)
    ap.add_argument("--score-py", type=Path, default=here.parent / "shared" / "bench" / "score.py",
                    help="the referee's scorer (default ../shared/bench/score.py; ours when absent)")
    ap.add_argument("--out", type=Path, default=None, help="JSON file to write (default: print only)")
    a = ap.parse_args(argv)
    result = output_grid_loss(a.run_dir, a.reference, a.score_py, a.margin)
    print(f"{'evaluated':34s} {'PSNR3D':>7s} {'SSIM3D':>7s}")
    for name, s in result["scores"].items():
        print(f"{name:34s} {s['psnr']:7.2f} {s['ssim']:7.3f}")
    print(f"(output grid {result['output_grid']['shape_xyz']} at {result['output_grid']['spacing_mm'][0]:.3g} mm, "
          f"training grid {result['training_grid']['shape_xyz']} at {result['training_grid']['spacing_mm'][0]:.3g} mm, "
          f"scored by {next(iter(result['scores'].values()))['scorer']})")
    if a.out is not None:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(result, indent=1))
        print(f"wrote {a.out}")
    return result


if __name__ == "__main__":
    main()
