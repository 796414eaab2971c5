"""Where a reconstruction's error lies, against the ground truth, scored as the referee scores.

The referee's PSNR3D is one number; deciding what to improve needs to know which voxels carry the
squared error. This script resamples the volume onto the reference grid as
../shared/bench/score.py does (`volume_io.resample_to_grid`: world coordinates, linear, zero
outside), keeps the same interior (`--margin`), and splits the squared error by

* attenuation band of the truth (air, gas and partial volume, fat, soft tissue, contrast, bone),
* edges against flat regions (the truth's gradient magnitude, Gaussian sigma 1 voxel, above or
  below its 90th / 50th percentile),
* frequency (the error's low-pass part, Gaussian sigma 2 voxels, against the rest),

and reports, in the flat soft tissue, the truth's own texture (its difference from its local mean)
beside ours and their correlation: texture the data cannot resolve is error no smoothing removes.
It also scores the volume after Gaussian smoothing, to say whether noise or blur dominates.

    python benchmarks/error_breakdown.py REFERENCE.nrrd RUN_DIR/volume.nrrd --out results.json \
        [--png slices.png]

`--png` draws the middle slices of the truth, ours and ours minus truth, as the run folder's preview
does but in a soft-tissue window (a look at what the numbers summarise: staircasing, blurred bone,
isolated extrema).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

from CTNeRFReconLib import previews
from CTNeRFReconLib.data import Volume
from CTNeRFReconLib.volume_io import read_volume, resample_to_grid

BANDS = [("air", -np.inf, 1e-4), ("gas, partial volume", 1e-4, 0.010), ("fat, low soft", 0.010, 0.017),
         ("soft tissue", 0.017, 0.022), ("contrast", 0.022, 0.030), ("bone", 0.030, np.inf)]
"""Bands of the truth's attenuation (1/mm; water 0.0183 at the referee's energy)."""


def on_reference_grid(reference: Path, volume: Path) -> tuple[Volume, Volume]:
    """The truth and the volume resampled onto its grid, as score.py does."""
    truth = read_volume(reference)
    return truth, resample_to_grid(read_volume(volume), truth.grid)


def breakdown(truth: np.ndarray, ours: np.ndarray, margin: int) -> dict:
    inner = (slice(margin, -margin or None),) * 3
    data_range = truth.max() - min(truth.min(), 0.0)
    r, v = truth[inner], ours[inner]
    err = v - r
    total = float(np.sum(err ** 2))

    def psnr(vol: np.ndarray) -> float:
        return round(float(10 * np.log10(data_range ** 2 / np.mean((vol[inner] - r) ** 2))), 3)

    bands = []
    for name, lo, hi in BANDS:
        m = (r > lo) & (r <= hi)
        if m.any():
            bands.append(dict(band=name, voxel_share=round(float(m.mean()), 3),
                              error_share=round(float(np.sum(err[m] ** 2)) / total, 3),
                              rms=float(np.sqrt(np.mean(err[m] ** 2))), bias=float(np.mean(err[m]))))
    grad = ndi.gaussian_gradient_magnitude(truth, 1.0)[inner]
    edges, flat = grad > np.percentile(grad, 90), grad < np.percentile(grad, 50)
    low = ndi.gaussian_filter(ours - truth, 2.0)[inner]
    soft_flat = flat & (r > 0.017) & (r <= 0.022)
    texture_truth = (truth - ndi.gaussian_filter(truth, 1.0))[inner][soft_flat]
    texture_ours = (ours - ndi.gaussian_filter(ours, 1.0))[inner][soft_flat]
    return dict(
        psnr=psnr(ours), margin=margin, bands=bands,
        edge_error_share=round(float(np.sum(err[edges] ** 2)) / total, 3),
        flat_error_share=round(float(np.sum(err[flat] ** 2)) / total, 3),
        low_pass_error_share=round(float(np.sum(low ** 2)) / total, 3),
        soft_flat=dict(voxel_share=round(float(soft_flat.mean()), 3), rms_error=float(np.sqrt(np.mean(err[soft_flat] ** 2))),
                       truth_texture_rms=float(np.sqrt(np.mean(texture_truth ** 2))),
                       our_texture_rms=float(np.sqrt(np.mean(texture_ours ** 2))),
                       texture_correlation=round(float(np.corrcoef(texture_truth, texture_ours)[0, 1]), 3)),
        smoothed_psnr={str(s): psnr(ndi.gaussian_filter(ours, s)) for s in (0.4, 0.6, 0.8)})


def slices_png(truth: Volume, ours: Volume, path: Path) -> Path:
    """The middle slices of the truth, ours and ours minus truth (previews.slices_png, the run folder's
    preview) in a soft-tissue window and a difference range that show errors of about 30 HU."""
    return previews.slices_png(ours, path, truth, "ours against the truth (1/mm)",
                               window=(0.012, 0.030), difference_limit=0.004)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("reference", type=Path)
    ap.add_argument("volume", type=Path)
    ap.add_argument("--margin", type=int, default=2, help="voxels inside the reference box (score.py --margin)")
    ap.add_argument("--out", type=Path, help="JSON file to write")
    ap.add_argument("--png", type=Path, help="PNG of the middle slices: truth, ours, error")
    a = ap.parse_args()
    truth, ours = on_reference_grid(a.reference, a.volume)
    res = dict(reference=str(a.reference), volume=str(a.volume),
               **breakdown(truth.array.astype(np.float64), ours.array.astype(np.float64), a.margin))
    if a.png:
        print(f"wrote {slices_png(truth, ours, a.png)}")
    print(f"PSNR3D {res['psnr']} (margin {a.margin})\n")
    print(f"{'band of the truth':20s} {'voxels':>7s} {'sq. error':>9s} {'rms 1/mm':>9s} {'bias 1/mm':>10s}")
    for b in res["bands"]:
        print(f"{b['band']:20s} {b['voxel_share']:7.3f} {b['error_share']:9.3f} {b['rms']:9.2e} {b['bias']:+10.2e}")
    sf = res["soft_flat"]
    print(f"\nshare of the squared error: at the top-10 % gradient voxels {res['edge_error_share']}, "
          f"in the flattest half {res['flat_error_share']}, low-pass (sigma 2 voxels) {res['low_pass_error_share']}")
    print(f"flat soft tissue ({sf['voxel_share']:.0%} of voxels): rms error {sf['rms_error']:.2e}, truth's texture "
          f"{sf['truth_texture_rms']:.2e}, ours {sf['our_texture_rms']:.2e}, correlation {sf['texture_correlation']}")
    print("PSNR3D after Gaussian smoothing (sigma in reference voxels): "
          + ", ".join(f"{s}: {p}" for s, p in res["smoothed_psnr"].items()))
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = a.out.with_suffix(".tmp")
        tmp.write_text(json.dumps(res, indent=1))
        tmp.replace(a.out)
        print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
