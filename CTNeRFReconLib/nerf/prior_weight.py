"""Weight of the total-variation prior, from the scan's own noise level and sampling.

Why not a fixed weight: the trade-off between fitting the line integrals and the TV prior is a
maximum-a-posteriori balance. Written per ray and per voxel (the loss uses means),

    MSE / (2 s^2) + lambda * (N_voxels / N_rays) * TV_mean,

so the prior should weigh more when the data are less certain (s^2) and when there are fewer rays
per voxel (sparser views, coarser detectors), and less otherwise. The uncertainty s^2 is the
photon noise sigma^2 plus the part of the line integrals no voxel model fits, taken as a fixed
fraction epsilon of their size (s^2 = sigma^2 + epsilon^2 P, with P the mean squared line integral).
In the trainer's units (MSE / P + weight * TV_mean / mu_scale) this is

    weight = kappa * (sigma^2 / P + epsilon^2) * N_voxels / N_rays.

A single weight tuned on one scan does not carry over: the weight chosen earlier on the 25-view
abdomen (0.02) over-smoothed the 30-slice abdomen slab (40 views, ~25x less photon noise) by 6 dB,
and was 2.5x too strong for the 25-view abdomen itself once the detail grid existed. epsilon keeps
a prior on noise-free data, where sparse views still leave streaks to remove.

The noise variance is estimated from the projections alone. Line integrals from photon counts
have variance ~exp(p) / I0 (Poisson counts, log-transformed), so the variance in air (p ~ 0) fixes
1 / I0 and the mean over the rays follows: sigma^2 = sigma_air^2 * mean(exp(p)). The variance in
air is measured with Immerkaer's estimator (J. Immerkaer, "Fast noise variance estimation", CVIU
64(2), 1996: the image convolved with a difference of Laplacians cancels smooth structure; the mean
absolute response times sqrt(pi/2)/6 is the noise standard deviation) on pixels whose whole
neighbourhood is air, where there is no structure to mistake for noise. On the benchmark's cases
this gives the true mean variance to 3 %; the same estimator over the object instead counts its
edges as noise (5x too much on a 48-pixel Shepp-Logan scan). When too few air pixels exist (a
truncated field of view) the estimator runs over every pixel whose rays cross the volume instead.

The air's noise is read between views as well as within one. A real panel's gain is never flat to the
last per cent after flat-fielding (drift with temperature and dose, readout groups), and after the log
that is an offset fixed on the detector, the same in every view: within one view it reads as noise,
across views it does not change. Immerkaer's estimator on the difference of two views, over the pixels in
air in both, cancels it: half that variance is the photons' (1 / I0), and what the within-view estimate
finds above it is the fixed pattern (`NoiseLaw.fixed_pattern_variance`). The photons' variance itself is
the spread of those differences (`between_view_pixel_variance`), which reads noise that a scintillator's
blur has made smooth; Immerkaer's estimator reads only its finest scale (a quarter of it under a mild
blur, a thirty-seventh under a strong one). The two follow different laws:
the photons' variance grows with the line integral (exp(p)), the pattern's does not (a gain g adds
-log(g) whatever the ray crossed), so each ray's variance is air_variance exp(p) + fixed_pattern_variance,
and sigma^2 is its mean. Before, the within-view variance was scaled by exp(p) as a whole: a 1 % gain
pattern on the 25-view abdomen (benchmarks/make_gain_errors.py) read as 7x the photons' variance in air,
the thick rays counted ten times noisier than they are and the TV weight rose 7x: 35.33 dB against 36.46
now, 36.34-36.46 intact (docs/nerf.md, "A gain pattern fixed on the detector").
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from ..data import evenly_spaced

_IMMERKAER = np.array([[1, -2, 1], [-2, 4, -2], [1, -2, 1]], dtype=np.float32)


def immerkaer_variance(images: np.ndarray, masks: np.ndarray) -> tuple[float, int]:
    """(noise variance, pixels used) of 2D images, over pixels whose 3x3 block lies in the mask."""
    total, count = 0.0, 0
    block = np.ones((3, 3), dtype=bool)
    for image, mask in zip(images, masks):
        inner = ndimage.binary_erosion(mask, structure=block, border_value=0)
        n = int(inner.sum())
        if n == 0:
            continue
        response = ndimage.convolve(np.asarray(image, dtype=np.float32), _IMMERKAER, mode="nearest")
        total += float(np.abs(response[inner]).sum(dtype=np.float64))
        count += n
    if count == 0:
        return 0.0, 0
    sigma = math.sqrt(math.pi / 2) / 6 * total / count
    return sigma * sigma, count


def between_view_variance(views: np.ndarray, air: np.ndarray) -> tuple[float, int]:
    """(noise variance of one view, pixels used): Immerkaer's estimate on the differences of neighbouring
    views over the pixels in air in both, halved. What is fixed on the detector (a gain error after
    flat-fielding) cancels in the difference; noise does not. A per-view air level or a smooth drift
    cancels in Immerkaer's kernel as in one view."""
    pairs = range(len(views) - 1)
    variance, count = immerkaer_variance((views[i + 1] - views[i] for i in pairs),
                                         (air[i + 1] & air[i] for i in pairs))
    return variance / 2.0, count


DRIFT_WINDOW = 15
"""Pixels across the window whose mean is taken out of a difference of two views before its spread is read
(`between_view_pixel_variance`): what changes smoothly between views (scatter around the object, the
tube's heel) is not noise; noise correlated over a few pixels (a scintillator's blur) keeps all but a
two-hundredth of its variance."""


def between_view_pixel_variance(views: np.ndarray, air: np.ndarray) -> tuple[float, int]:
    """(variance of one pixel's reading, pixels used), read on the differences of neighbouring views over the
    pixels in air in both (3 x 3 blocks), halved: the spread itself (1.4826 x the median absolute deviation,
    robust to a few odd pixels), after each difference's smooth part (`DRIFT_WINDOW`) is taken out. Why not
    Immerkaer's estimator here: it reads only the noise's finest scale, and a real panel's noise is not white
    (the scintillator spreads each photon's light over neighbouring pixels). With a 3-tap blur of
    [0.15, 0.7, 0.15] per axis it reads a quarter of a pixel's variance, with [0.25, 0.5, 0.25] a
    thirty-seventh; the spread reads all of it, which is what each ray's weight in the data term is about."""
    block = np.ones((3, 3), dtype=bool)
    total, count = 0.0, 0
    for i in range(len(views) - 1):
        both = ndimage.binary_erosion(air[i] & air[i + 1], structure=block, border_value=0)
        n = int(both.sum())
        if n < 2:
            continue
        diff = np.asarray(views[i + 1], dtype=np.float32) - np.asarray(views[i], dtype=np.float32)
        weight = both.astype(np.float32)
        local = ndimage.uniform_filter(np.where(both, diff, 0.0), DRIFT_WINDOW, mode="constant")
        share = ndimage.uniform_filter(weight, DRIFT_WINDOW, mode="constant")
        rest = (diff - local / np.maximum(share, 1e-6))[both]
        mad = float(np.median(np.abs(rest - np.median(rest))))
        total += (1.4826 * mad) ** 2 * n
        count += n
    return (total / count / 2.0 if count else 0.0), count


def air_medians(view: np.ndarray) -> np.ndarray:
    """The median line integral of each pixel's 5x5 neighbourhood: a pixel is in air where it is below the
    air threshold (`noise_law`)."""
    return ndimage.median_filter(np.asarray(view, dtype=np.float32), size=5)


@dataclass(frozen=True)
class NoiseLaw:
    """What the projections say about their own noise."""

    mean_variance: float
    """Mean noise variance of the line integrals over the rays that cross the volume (the TV weight's
    sigma^2): the photons' and the fixed pattern's; 0.0 when nothing is usable."""
    air_variance: float | None
    """Their variance in air (1 / I0 for Poisson counts), or None when too few pixels lie in air (a
    truncated field of view, an offset flat field): then no per-ray law is known. Read between views where
    two views share enough air: the spread over the open air (`between_view_pixel_variance`, `_open_air`),
    else Immerkaer's estimate (`between_view_variance`); else within each view."""
    fixed_pattern_variance: float | None = None
    """The variance in air of what is fixed on the detector (the within-view estimate less the between-view
    one: a gain error after flat-fielding, which draws rings), or None when it was not measured."""


NOISE_LAW_PIXELS = 64 * 256 * 256
"""The air's noise is read from at most this many pixels (`max_views` views of 256^2) and at least
`NOISE_LAW_MIN_VIEWS` views: 64 views of 768^2 took 23 s of a run's set-up (18 s of them the 5 x 5 medians),
and 8 of them read the air's variance within 1.5 % of it (truth 1e-5: 1.029e-5 from 64, 1.043e-5 from 8): the
whole law in 4.3 s. The rays' mean of exp(p) still comes from all `max_views`. Every benchmark case (at most
100 views of 256^2) reads the views it read before."""
NOISE_LAW_MIN_VIEWS = 8


def noise_law(projections: np.ndarray, hit: np.ndarray, max_views: int = 64,
              min_air_pixels: int = 1000, measured: np.ndarray | None = None) -> NoiseLaw:
    """The noise of the line integrals (views, rows, cols), from up to `max_views` evenly spaced views
    (the noise law is the same in every view; this bounds time and memory on large scans), fewer on a large
    panel (`NOISE_LAW_PIXELS`), over the pixels whose ray crosses the volume (`hit`, same shape). `measured`
    (same shape): pixels that hold a measurement; dead pixels hold a neighbour's copy, which would read as
    less noise than there is."""
    pick = evenly_spaced(len(projections), max_views)
    masks = np.asarray(hit[pick], dtype=bool)
    if not masks.any():
        return NoiseLaw(0.0, None)
    # the rays' mean of exp(p) (what the air's variance is scaled by) from all of them; the air's noise from a
    # pixel budget's worth of them
    crossing = np.concatenate([np.asarray(projections[v], dtype=np.float64)[m] for v, m in zip(pick, masks)])
    per_view = int(np.prod(projections.shape[1:]))
    read = evenly_spaced(len(pick), max(NOISE_LAW_MIN_VIEWS, NOISE_LAW_PIXELS // per_view))
    pick, masks = pick[read], masks[read]
    views = np.asarray(projections[pick], dtype=np.float32)
    threshold = 0.01 * float(np.percentile(crossing, 99))
    air = np.zeros(views.shape, dtype=bool)
    open_air = np.zeros(views.shape, dtype=bool)
    for v, view in enumerate(views):  # one view's medians at a time (a large panel's stack of them is large)
        smooth = air_medians(view)
        air[v] = smooth < threshold
        if measured is not None:
            air[v] &= np.asarray(measured[pick[v]], dtype=bool)
        open_air[v] = _open_air(smooth, air[v], threshold)
    within, n_air = immerkaer_variance(views, air)
    if n_air < min_air_pixels:
        return NoiseLaw(immerkaer_variance(views, masks)[0], None)
    between, n_pairs = between_view_variance(views, air)
    if n_pairs < min_air_pixels:  # one view, or views that share too little air
        return NoiseLaw(within * float(np.exp(crossing).mean()), within)
    # the pattern from Immerkaer's two estimates (a pixel-to-pixel pattern is what both read alike); the
    # photons' variance from the spread, which also reads noise a blur has made smooth
    pattern = max(0.0, within - between)
    photons, n_open = between_view_pixel_variance(views, open_air)
    if n_open < min_air_pixels:
        photons = between
    return NoiseLaw(photons * float(np.exp(crossing).mean()) + pattern, photons, pattern)


OPEN_AIR_SHARE = 0.1
"""The spread between views is read only where the 5 x 5 median is within this share of the air threshold of
its view's air level (or `OPEN_AIR_SIGMAS` of the medians' own spread in air, where that is wider): the
air's open stretches. Near the object a ray crosses a little of it in one view and none in the next, and those
differences are not noise: over all the air (threshold 1 % of the 99th percentile) the 25-view abdomen read
1.20e-5 for its 1e-5 (I0 1e5); over the open air, 1.007e-5."""
OPEN_AIR_SIGMAS = 4.0
"""...and at least this many of the medians' own noise in air (1.4826 x their median absolute deviation) wide:
a band narrower than that keeps the pixels whose noise happened to be small, and reads too little (a thin
phantom's threshold, 1 % of a small 99th percentile, can lie below the noise; a blur makes a pixel's noise
and its neighbourhood's median move together)."""


def _open_air(smooth: np.ndarray, air: np.ndarray, threshold: float) -> np.ndarray:
    """The pixels of one view's `air` whose 5 x 5 median (`smooth`) is near the view's air level (the median of
    those medians: air need not read zero after flat-fielding): within `OPEN_AIR_SHARE` of `threshold`, or
    `OPEN_AIR_SIGMAS` of the medians' noise where that is wider."""
    medians = smooth[air]
    if medians.size == 0:
        return air
    level = float(np.median(medians))
    noise = 1.4826 * float(np.median(np.abs(medians - level)))
    band = max(OPEN_AIR_SHARE * threshold, OPEN_AIR_SIGMAS * noise)
    return air & (np.abs(smooth - level) < band)


FIXED_PATTERN_SAY_RATIO = 1.0
"""The pattern is worth saying where it is larger than the photon noise in air: from there it is what a
ring in the volume is made of."""


def fixed_pattern_note(law: NoiseLaw) -> str | None:
    """What `info` and a nerf run say about the air's fixed pattern where it is larger than the photon noise
    (`FIXED_PATTERN_SAY_RATIO`), else None."""
    if law.fixed_pattern_variance is None or not law.air_variance:
        return None
    pattern, photons = math.sqrt(law.fixed_pattern_variance), math.sqrt(law.air_variance)
    if pattern <= FIXED_PATTERN_SAY_RATIO * photons:
        return None
    return (f"the air reads a pattern fixed on the detector of {pattern:.4f} rms (line integral; about "
            f"{100 * pattern:.1f} % gain after flat-fielding), {pattern / photons:.1f} x its photon noise "
            f"({photons:.4f}): rings are likely; a new flat field (gain calibration) removes them. nerf's noise "
            "model counts it apart from the photons' (docs/nerf.md)")


def poisson_ray_weights(targets, air_variance: float, model_error: float, target_power: float,
                        mean_one: bool = False, fixed_variance: float = 0.0):
    """Per-ray weights (a tensor like `targets`) of a penalised weighted least-squares data term (PWLS,
    docs/nerf.md): the inverse of each line integral's variance, air_variance * exp(p) (Poisson counts,
    log-transformed) plus the detector's fixed pattern (`fixed_variance`, the same for every ray) plus the
    model error epsilon^2 P. Scaled by the mean variance (the s^2 of the TV weight), so the data term is
    the MAP one the TV weight was derived against; `mean_one`: to a mean of 1 instead."""
    # in place: on 212 M rays (360 views of 768^2) each temporary is 850 MB, and the expression's own made
    # this the run's peak (9.0 GB against 6.8 GB while it trains)
    variance = targets.clamp(0.0, 30.0).exp_().mul_(air_variance).add_(fixed_variance)
    variance.add_(model_error ** 2 * target_power)
    mean_variance = variance.mean()
    weights = variance.reciprocal_()
    return weights.div_(weights.mean()) if mean_one else weights.mul_(mean_variance)


def tv_weight_from_data(strength: float, model_error: float, noise_variance: float, n_voxels: int,
                        n_rays: int, target_power: float) -> float:
    """weight = strength * (noise_variance / target_power + model_error^2) * n_voxels / n_rays."""
    if n_rays <= 0 or target_power <= 0:
        return strength * model_error ** 2
    return strength * (noise_variance / target_power + model_error ** 2) * n_voxels / n_rays
