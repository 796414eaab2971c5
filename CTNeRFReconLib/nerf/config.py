"""Typed configuration of the deep-prior TensoRF-VM method, with quality presets.

Sizes are derived from the data (grid, views, detector) in `NerfConfig.for_scan`; the presets
only trade time for quality.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace


@dataclass
class NerfConfig:
    """Everything that shapes one nerf reconstruction."""

    preset: str = "standard"
    """'preview', 'standard' or 'high': sets the defaults below."""
    iterations: int = 2000
    """Optimisation steps on projection rays (after the FDK warm start)."""
    channels: int = 16
    """C: components per VM mode (three planes and three lines)."""
    plane_resolution: int = 0
    """R of the planes and lines; 0 = the training grid's largest dimension."""
    generator_width: int = 32
    """Feature channels of the deep-image-prior generator's convolutions."""
    noise_channels: int = 16
    """Channels of the fixed noise the generator is fed."""
    generator_init_scale: float = 1.0
    """Standard deviation the generated lines start at (their learnable output gain is set to it
    over the untrained generator's spread); the planes start at `generator_plane_init_fraction` of
    it."""
    generator_plane_init_fraction: float = 0.5
    """The planes' starting spread as a fraction of the lines' (0.5; it was 1 until 2026-12-03). With
    both at unit spread the first field is noise as strong as the object, and on the 10-view slab
    (30 slices) the generator puts the slab's mass into one or two slices within 40 steps (a
    rank-one layer explains the views along the slab's thin axis; only the few edge-on views object):
    18.85 dB after 1560 iterations against 33 without the prior. Shrinking both to 0.1 fixes that
    (33.18) but the field then grows slowly, the products scaling with the start's square (the 45 s
    demo fell from 28.70 to 23.51 dB). Shrinking the planes alone scales the products with the
    planes' start, not its square: the slab scores 32.62 at 0.5 (32.00 at 0.3, 33.14 at 0.1), the
    demo's 320 iterations 28.66 / 0.879 against 28.33 / 0.870 at 1, the tests' 32^3 phantom after
    250 iterations 0.1 dB less (26.44 against 26.54, three seeds); docs/nerf.md, "The planes start
    at half the lines' spread". A thin slab seen by few views may want 0.1."""
    use_generator: bool = True
    """Deep image prior (ZeroRF). False optimises the planes and lines directly (TensoRF)."""
    refine_fraction: float = 0.75
    """Last fraction of the iterations that refines the generated planes/lines directly: the prior
    shapes the solution first, free factors then fit the detail a small generator cannot. 0.75 (it was
    0.5): on the 25-view abdomen's default grid +0.23 dB at `--time-limit 60`, +0.50 at 180 s, +0.56
    after 800 iterations, +0.04 after 2000; the same at 10 views on three CTs; +1.8 dB on the demo. It
    loses 0.7-1.1 dB on the tests' tiny noisy phantom (32^3, I0 2e4) after 250-300 iterations, where the
    generator phase is the regulariser (docs/nerf.md)."""
    detail_grid: bool = True
    """The refinement phase also learns a dense detail grid added to the field (nerf/detail.py):
    the voxel-scale structure a rank-C VM field cannot hold."""
    freeze_field_fraction: float = 0.45
    """Last fraction of the iterations in which the VM field is frozen (never before the refinement
    phase starts): its volume on the training grid is computed once and kept, and only the detail grid
    learns on top of it (nerf/train.py, `freeze_field`). By then the field holds the global structure;
    what is left to fit is voxel-scale detail, which the dense grid holds. A frozen step skips
    materialising the field forwards and backwards and the factors' optimiser step. Without the detail
    grid nothing would be left to learn, so it never freezes then. 0 = the field learns to the end
    (the default before). 0.45: on the 25-view abdomen's default grid at `--time-limit 180` 36.58 / 0.927
    after 1094 iterations against 36.46 / 0.926 after 885 with the field learning to the end (0.3: 36.60,
    0.6: 36.53, the same hour; 36.30 against 35.91 the day before, on a slower host); at equal
    iterations the field that learns to the end is 0.09 dB better and takes 24 % longer, so the gain is
    the iterations the cheaper steps buy (docs/nerf.md, "The field freezes for the last part of the run")."""
    detail_lr: float = 0.02
    """Peak Adam learning rate of the detail grid, as a fraction of the attenuation scale. 0.02 (it was
    0.01): on the 25-view abdomen's default grid +0.72 dB at `--time-limit 60` (33.87 to 34.59), -0.05 at
    180 s (35.75 to 35.70, fewer iterations that run), and the same on the 10-view finehead (25.71
    against 25.72) and the 40-view slab at 60 s (26.95 against 26.93): the detail grid fits sooner where
    a short budget cuts the run, and the cosine decay settles it in a long one
    (benchmarks/results/joseph/sweep_*.json)."""
    lr: float = 2e-3
    """Peak Adam learning rate of the generator (direct factors use 10x)."""
    warmup_fraction: float = 0.05
    """Linear warm-up over this fraction of the iterations."""
    final_lr_fraction: float = 0.05
    """Cosine decay ends at this fraction of the peak learning rate."""
    rays_start: int = 16384
    """Ray batch at the start of the curriculum."""
    rays_end: int = 32768
    """Ray batch at the end of the curriculum (reached at curriculum_fraction)."""
    curriculum_fraction: float = 0.5
    ray_run: int = 8
    """A batch's rays are drawn as runs of up to this many neighbouring detector pixels (the next
    columns of one row; at most a twentieth of a row, nerf/train.py `ray_run_for`), each run from a
    uniformly random start, wrapping at the end of the ray list, so every ray is as likely to be drawn
    as with independent draws (1, the default until 2026-12-07). Neighbouring rays cross neighbouring
    voxels, so a run's taps share cache lines: on the 40-view, 160 px case's 2.35 M-voxel training grid
    the gradient's scatter took about a third less time, and with Joseph's inner planes taken without
    tests a 60 s run made about 45 % more iterations (docs/nerf.md, "Rays in runs"). After 1200
    iterations: 40.22 against 40.18 dB there (runs of 4: 40.16), 36.62 against 36.70 on the 25-view
    abdomen."""
    step_voxels: float = 0.8
    """Mean sample spacing along rays, in training voxels, of the stratified integrator (jittered
    samples: unbiased at any spacing, noisier when larger). 1.2 gave the same scores on the 25-view abdomen after 800
    iterations (34.81 / 0.904) with a third fewer samples, but lost 0.94 dB on the 10-view `finehead`
    (2-7 mm spheres, 1.5 mm rods) in 150 s despite 20 % more iterations: 0.8 stays."""
    integrator: str = "joseph"
    """How a ray's integral through the training grid is taken: 'joseph' (one bilinear lookup per
    crossing of a plane of voxel centres normal to the ray's major axis, as RTK's Joseph projector does;
    kernels/include/ctnerf_render.h) or 'stratified' (jittered samples about `step_voxels` apart, 8
    trilinear taps each; the default until Joseph's rule was measured against it: 1.5-2.1x the
    iterations in the same time and +0.5 to +1.0 dB at 60-180 s on the abdomen (25 and 10 views) and
    the 10-view finehead, docs/nerf.md). `step_voxels` and `length_groups` apply to 'stratified' only."""
    length_groups: int = 8
    """Rays of a batch are split into this many groups by chord length, each sampled at about
    step_voxels (1: every ray gets the sample count of the 98th-percentile chord). On a cone-beam
    scan the mean chord is about half the longest, so this halves the renderer's work."""
    tv_weight: float | None = None
    """Weight of the total-variation prior on the attenuation grid (relative to the data term).
    None = from the data: the projections' noise variance and rays per voxel (nerf/prior_weight.py)."""
    ray_weighting: str = "poisson"
    """The data term: 'poisson' (penalised weighted least squares: each ray weighted by the inverse
    variance of its line integral, exp(p) / I0 from the noise measured in air plus the model error,
    scaled by the mean variance so the data-derived TV weight keeps its meaning; prior_weight.py),
    'poisson-mean1' (the same weights scaled to a mean of 1) or 'uniform' (least squares, the default
    before). 'poisson': on the 25-view abdomen's default grid +0.62 dB at `--time-limit 60` (34.06 to
    34.68), +0.08 at 180 s, +0.11 on the 40-view slab at 60 s, the same on the 10-view finehead
    (docs/nerf.md). Without air in the views (no noise law to measure) it is least squares."""
    robust_data: float = 0.0
    """Huber's threshold of the data term, in the batch's robust spread of the weighted residuals (1.4826 x
    their median absolute value): a ray whose residual lies further out counts linearly, not squared, so a
    few rays that cannot be fitted (a detector line stuck at zero, a corrupted view) cannot drag the whole
    field. Relative to the batch, so that early on, when every residual is large, the term is least
    squares. 0 (the default): plain (weighted) least squares. At 4, on the 25-view abdomen with three
    columns stuck at zero taken as measured, 21.41 dB instead of 16.01, but 0.1 dB under least squares on
    clean scans (36.53 against 36.64; the 40-view case 40.08 against 40.21): for lines stuck at values
    `data.stuck_at_air` does not find, or a corrupted view (docs/nerf.md, "Real detectors")."""
    tv_strength: float = 12.9
    """kappa of the data-derived TV weight (used when tv_weight is None): nerf/prior_weight.py."""
    tv_edge: float = 0.03
    """Edge scale of the TV penalty, as a fraction of the attenuation scale (the decoder's, the 99.5th
    percentile of the FDK volume): a difference d between neighbours pays |d| well below it, as in
    plain TV, and edge * log(1 + |d| / edge) above it, so organ and bone edges keep their contrast
    while noise and streaks (small differences) are flattened as before (the log penalty of
    reweighted-L1 minimisation, Candes, Wakin and Boyd, J. Fourier Anal. Appl. 14, 2008), in both
    phases. 0 = plain anisotropic TV, the default until measured: on the 25-view abdomen's default
    grid at 1200 iterations 36.68 / 0.927 against 35.80 / 0.916 (0.01: 36.16, 0.02: 36.65, 0.05:
    36.59, 0.15: 36.32), +0.65 dB at `--time-limit 180`, +0.9 dB on the same scan made from a 1.5 mm
    CT, +0.3 to +5.8 dB at 10 views; kept on truncated projections too (`tv_edge_when_truncated`);
    plain TV is better on the demo's analytic Shepp-Logan phantom (docs/nerf.md)."""
    tv_edge_when_truncated: bool = True
    """Keep the edge-scaled TV on projections the object goes on beyond (see `_truncation` in the
    trainer); its data-derived weight then counts the training voxels past the sides too
    (`_voxels_for_weight`). False gives plain TV there, which holds down the bright rim a cut leaves
    where no training voxel holds the material outside. On by default since the grid trains past cut
    ends and sides and reads a table from the data: at 1200 iterations it gained 0.15 to 0.67 dB on
    seven truncated cases (a scan with no air at all, a reference box that cuts the body flat) and 0.01
    to 0.13 dB on three patients on a table; the one loss (1.2 dB on that box at the 3 mm the data were
    projected from) is the inverse crime, under which plain TV also wins on scans that are not
    truncated (docs/nerf.md, "The edge scale on truncated scans: the default")."""
    model_error: float = 0.0125
    """epsilon of the data-derived TV weight: the relative error of the line integrals that no voxel
    model fits (projector discretisation, detector pixel size, physics), on top of the photon noise.
    kappa and epsilon were fitted to two cases (abdomen 25 views, 30-slice slab 40 views) and checked
    on others: docs/nerf.md."""
    fdk_init_iterations: int = 0
    """Steps fitting the generator to a smoothed FDK volume before the projection loss (0 = off:
    on the abdomen benchmark the normalised generator reaches FDK's quality within ~50 steps)."""
    holdout_views: int = 0
    """Views held out of training for projection PSNR (data's own validation views are always used)."""
    snapshot_every: int = 100
    """Iterations between streamed snapshots (0 = only the final volume)."""
    eval_every: int = 25
    """Iterations between progress events."""
    checkpoint_every: int = 200
    amp: bool = True
    """bfloat16 autocast for the generator on CUDA."""
    use_kernels: bool = True
    """Use the fused renderer kernels when built for the device."""
    max_batch_bytes: int = 0
    """Upper bound on the renderer's working memory per batch (0 = no bound); the OOM back-off halves the batch."""
    stored_rays_bytes: int = 2 << 30
    """The training rays are kept while they take at most this (32 bytes a ray), else each batch's rays are
    computed from the geometry (nerf/ray_table.py): 360 views of 768^2 would hold 6.8 GB of rays."""
    voxel_size: float = 0.0
    """Training voxel size in mm; 0 = the output grid's (or detector pitch at the isocentre)."""
    max_training_voxels: int = 6_000_000
    """Cap on the training grid (voxel size grows to respect it)."""
    support_sets_voxel: bool = False
    """Apply `max_training_voxels` to the carved support's box rather than the output grid's whole box:
    where the air around the object made the cap coarsen the voxel, train at the finest voxel (down to
    the output's) at which the support's box fits under the cap. The high preset's. On the 25-view
    abdomen's default grid (13 M voxels, 2.76 mm to fit 6 M; the support's box at 2.13 mm holds 5 M) it
    gained 0.2-0.37 dB PSNR3D at equal iterations (SSIM3D level) at 1.6-2 times the time per iteration;
    at `--time-limit 60` the standard preset lost 1.3 dB with it (docs/nerf.md, "The support sets the
    voxel"). With a time limit `voxel_from_time_limit` chooses instead; with that off, a timed run that
    buys too few iterations at this voxel says so."""
    voxel_from_time_limit: bool = True
    """With a time limit, the run chooses `support_sets_voxel` itself, whatever the preset says: it
    starts at the voxel the cap on the field of view allows, and once it has measured its rate (15
    iterations in) starts again at the voxel the support sets if that rate buys enough iterations there:
    1000 at 25 views, scaled by 25 / views and never under 500, the views counted down where the air's
    noise says fewer photons than about 9e4 per ray, the cases' 1e5 less a tenth for the estimate
    (`NerfTrainer.FINER_VOXEL_CHOSEN_FROM`, `_finer_voxel_iterations`: more views pay for the finer voxel
    sooner), about 2 s of set-up lost. Past
    about 1200 iterations the coarser voxel stops gaining, while the finer one gains from about 800 at 25 views:
    on the 25-view abdomen at `--time-limit 300` 37.04 dB at 2.13 mm against 36.76 at 2.76 mm
    (docs/nerf.md, "The voxel follows the time limit"). A resumed run keeps its checkpoint's voxel."""
    support: bool = True
    """Carve the object's support from the projections (CTNeRFReconLib/support.py: a voxel that some
    view shows in air is empty): the training grid shrinks to the support's bounding box and the field
    is zero outside the support. Nothing is carved when the data show no clear air."""
    support_margin_voxels: int = 2
    """Dilation of the carved support, in training voxels (grazing rays, blur)."""
    extend_cut_ends: bool = True
    """Where the object goes on past the detector's top or bottom rows (longer than the detector along
    the rotation axis, as every body scan), the training grid goes on past those ends of the output box
    by the distance an edge row's ray climbs over the object's radius (CTNeRFReconLib/axial_extension.py),
    so the material there has voxels of its own instead of a rim at the box's faces, and the edge-scaled
    TV is kept (plain TV stays for the detector's column edges). Needs a carved support. On the 40-view
    abdomen cut to 90 of 200 rows at `--time-limit 180`: 40.00 / 0.958 against 34.08 / 0.932, the
    error at the ends a tenth of what it was; on the 25-view abdomen cut to 120 of 240 rows at 800
    iterations 36.36 against 33.48, at 18 % more time per iteration (docs/nerf.md, "Cut along the
    axis")."""
    extend_cut_sides: bool = True
    """Where the object is wider than the field of view (the detector's column edges see object), the
    training grid goes on past the output box's in-plane faces, each as far as the edge rays facing it
    say the object goes (CTNeRFReconLib/lateral_extension.py), so the material outside the field of view has
    voxels of its own instead of a rim and a wrong level inside; carving then removes what some view
    shows in air. The output grid is unchanged. Nothing is widened where the edge rays say the object
    goes less than a training voxel past the field of view. On the 40-view abdomen at 2.4 mm cut to 120
    of its 200 columns at `--time-limit 180`: 38.87 against 29.37 dB inside the box; cut to 90 columns,
    35.26 against 14.57 (docs/nerf.md, "Wider than the field of view")."""
    cut_sides_fraction: float = 0.0
    """How far past the sides with `extend_cut_sides`: 0 from the data (lateral_extension.plan_lateral),
    otherwise this fraction of the box's larger in-plane half-side (for experiments)."""
    measure_thin_sides: bool = True
    """With `extend_cut_sides`, train past the in-plane sides the object's support reaches while the edge
    rays show no body going on past them, as far as the mass the views that cut the object miss says
    something thin goes on (lateral_extension.thin_reach_past_faces): a table top or a holder's plate
    leaving the field of view, whose edge rays cross it through its thickness. A body whose sides only
    just leave the field of view reads a millimetre or two there, under a training voxel, and is left as
    it is. On a patient lying on a 470 mm table in a 341 mm field of view (benchmarks/make_table_ct.py)
    it reads 69 mm past the table's two sides (66.5 true): 30.81 against 29.72 dB at 1200 iterations,
    30.70 against 29.75 at `--time-limit 180` (docs/nerf.md, "Reading a table from the data")."""
    widen_reached_sides: bool = False
    """With `extend_cut_sides`, train at least `lateral_extension.THIN_FRACTION` of the box's half-side past
    every in-plane side the object's support reaches while the edge rays show nothing going on past it,
    whatever `measure_thin_sides` reads: for a table the measurement misses (it needs a view that cuts
    the table less than the others, and a body wider than the field of view in every view hides that).
    The panel's Advanced > Table beyond the view."""
    coarse_levels: tuple[float, ...] = (2.0,)
    """Coarse-to-fine (nerf/levels.py): voxel-size factors of the coarse training levels before the
    full training grid, coarsest first (() = the full grid throughout). Generator phase only."""
    coarse_fraction: float = 0.25
    """Fraction of the iterations spent on the coarse levels (split equally among them); they end by the
    refinement phase's start at the latest, so with refine_fraction 0.75 the whole generator phase is
    coarse (it was 0.35 of a generator phase of 0.5)."""
    time_limit_s: float | None = None
    """Wall-clock budget of the training in seconds (None: none): the first iterations' rate sets the
    iteration count so the run ends in time, re-planned as it goes (train.py, TimeBudget)."""
    iterations_cap: int = 0
    """With a time limit: the most iterations it may plan (0: 4 x `iterations`)."""

    @classmethod
    def from_settings(cls, settings: dict) -> "NerfConfig":
        """Preset defaults, then explicit settings (unknown keys are refused)."""
        preset = settings.get("preset") or "standard"
        if preset not in PRESETS:
            raise ValueError(f"unknown preset '{preset}'; choose one of {', '.join(PRESETS)}")
        cfg = replace(cls(), preset=preset, **PRESETS[preset])
        known = {f.name for f in fields(cls)}
        extra = {k: v for k, v in settings.items() if k != "preset" and v is not None}
        unknown = sorted(set(extra) - known)
        if unknown:
            raise ValueError(f"unknown nerf setting(s): {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        for name, value in extra.items():
            extra[name] = _checked(name, value, getattr(cfg, name))
        if extra.get("integrator", cfg.integrator) not in INTEGRATORS:
            raise ValueError(f"nerf setting integrator: {extra['integrator']!r} is not one of "
                             f"{', '.join(INTEGRATORS)}")
        if extra.get("ray_weighting", cfg.ray_weighting) not in RAY_WEIGHTINGS:
            raise ValueError(f"nerf setting ray_weighting: {extra['ray_weighting']!r} is not one of "
                             f"{', '.join(RAY_WEIGHTINGS)}")
        for name, hint in (("generator_init_scale", "the default is 1"),
                           ("generator_plane_init_fraction",
                            "the default is 0.5; 0.1 for a thin slab seen by few views")):
            scale = extra.get(name, getattr(cfg, name))
            if not (math.isfinite(scale) and scale > 0):  # zero gains would leave the generator's weights no gradient
                raise ValueError(f"nerf setting {name}: {scale!r} is not a positive number ({hint})")
        freeze = extra.get("freeze_field_fraction", cfg.freeze_field_fraction)
        if not (0.0 <= freeze <= 1.0):
            raise ValueError(f"nerf setting freeze_field_fraction: {freeze!r} is not between 0 and 1 "
                             "(the last fraction of the iterations with the field frozen; 0: never)")
        run = extra.get("ray_run", cfg.ray_run)
        if run < 1:
            raise ValueError(f"nerf setting ray_run: {run!r} is below 1 (1 draws every ray on its own)")
        edge = extra.get("tv_edge", cfg.tv_edge)
        if not (math.isfinite(edge) and edge >= 0):  # the kernel would refuse it at the first step
            raise ValueError(f"nerf setting tv_edge: {edge!r} is below 0 or not finite (0 gives plain TV)")
        return replace(cfg, **extra)


def _checked(name: str, value, default):
    """`value` for the setting `name`, of the kind its default is (bool, whole number, number, list of
    numbers, text), else ValueError naming the setting: a typo in --setting fails before any work."""
    def number(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool)

    if isinstance(default, bool):
        ok = isinstance(value, bool)
        kind = "true or false"
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
        kind = "a whole number"
    elif isinstance(default, float) or default is None:
        ok = number(value) or (default is None and value is None)
        kind = "a number"
    elif isinstance(default, tuple):
        ok = isinstance(value, (list, tuple)) and all(number(v) for v in value)
        value = tuple(value) if ok else value
        kind = "a list of numbers, e.g. [4, 2]"
    else:
        ok = isinstance(value, str)
        kind = "text"
    if not ok:
        raise ValueError(f"nerf setting {name}: {value!r} is not {kind} (its default is {default!r})")
    return value


INTEGRATORS = ("stratified", "joseph")
RAY_WEIGHTINGS = ("uniform", "poisson", "poisson-mean1")

PRESETS: dict[str, dict] = {
    "preview": dict(iterations=400, channels=12, rays_end=16384, snapshot_every=50),
    "standard": dict(),
    # the larger field and batch the high preset had (24 channels, generator width 48, 65536 rays, 4000
    # iterations) scored no higher than the standard's on either benchmark case (docs/nerf.md, "The support
    # sets the voxel"): what buys accuracy is the training voxel
    "high": dict(support_sets_voxel=True),
}
