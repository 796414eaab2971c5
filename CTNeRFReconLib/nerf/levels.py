"""Coarse-to-fine training levels: where in the schedule the training grid is coarser, and what that costs.

Why: one iteration's cost grows with the training grid (the rays' sample count with its voxel size,
materialising the field, the TV term and the support mask with its voxel count). Early in the
generator phase the deep prior only produces smooth structure, which a grid two or four times
coarser holds as well as the full one, so most of those iterations run there (TensoRF also trains
coarse first and upsamples its factors). The VM planes and lines are continuous, so nothing has to be
upsampled at a level change: the same factors are materialised on the next grid (field.py). They are
sampled at the coarse voxel centres as they are: resampling them anti-aliased to the coarse size first
made the training unstable and twice as slow on CPU (a 32^3 phantom, 300 iterations: 22.2 dB against
24.7 dB sampled directly and 24.8 dB on the full grid throughout). The detail grid and the refinement
phase only ever live on the full training grid, so the coarse levels end before the refinement phase
starts.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

@dataclass(frozen=True)
class CostShares:
    """Where a full-grid generator-phase iteration's time goes, for one ray integrator.

    `integration`: the ray integrals (forward and backward); they scale with the ray batch and, through
    the samples (or planes) per ray, as 1 / factor on a coarser level. `generator`: running the generator
    (forward and backward), the same on every level and none in the refinement phase (the factors are
    free there). The rest (materialising, TV, the mask, the optimiser) scales with the voxel count, as
    1 / factor^3. Without the generator's fixed share the coarse level looked cheaper than it is, so a
    time budget measured there under-planned and then re-planned up by half once the full grid started."""

    integration: float
    generator: float

    @property
    def voxels(self) -> float:
        return 1.0 - self.integration - self.generator


COST_SHARES = {
    # `benchmarks/bench_scaling.py`'s profile on the 25-view abdomen's default grid, 2 CPU cores:
    # 139 ms of ray integrals and 32 ms of generator in a 237 ms step (coarse level 113 ms, predicted
    # within 1 %); on the slower machine where Joseph's rule was measured the same step took 441 ms,
    # 294 of them integrating
    "stratified": CostShares(integration=0.61, generator=0.14),
    # the same profile, Joseph's rule with the batch in storage order and the fused TV: 88 ms of ray
    # integrals and 41-52 ms of generator in a 188 ms step (coarse level 104 ms, predicted 99)
    "joseph": CostShares(integration=0.47, generator=0.26),
}


def grid_cost_ratio(base_shape_xyz, base_voxel: float, other_shape_xyz, other_voxel: float,
                    integrator: str = "joseph", plane_resolution: int = 0) -> float:
    """Cost of a full-grid generator-phase iteration on another training grid relative to one on the base
    grid, by COST_SHARES: the generator's share grows with the planes' area (made at `plane_resolution`,
    else the grid's longest side), the integrals' with the voxels a ray crosses (1 / voxel), the rest
    with the voxel count. What a time limit buys at the voxel the support sets (train.py) follows from it."""
    shares = COST_SHARES[integrator]
    side = lambda shape: plane_resolution or max(shape)  # noqa: E731
    return float(shares.generator * (side(other_shape_xyz) / side(base_shape_xyz)) ** 2
                 + shares.integration * base_voxel / other_voxel
                 + shares.voxels * np.prod(other_shape_xyz, dtype=float) / np.prod(base_shape_xyz, dtype=float))


FROZEN_VOXEL_FACTOR = 0.2
"""The voxels' share of a step with the field frozen, relative to one that learns it: no materialising
forwards or backwards and no optimiser step for the factors; the TV term and the detail grid's
optimiser step as before. `benchmarks/bench_scaling.py`'s profile of the 25-view abdomen's default
grid on 2 CPU cores (benchmarks/results/freeze/profile_abdomen_25v.json): materialising 49.2, TV 12.2
and the optimiser 11.7 ms of a refinement step against TV 11.9 and the optimiser 5.4 ms of a frozen
one, 17 of 73 ms; 25 of 118 ms on a slower host the day before. A fifth to a quarter."""


@dataclass(frozen=True)
class LevelSchedule:
    """Voxel-size factors of the coarse levels (coarsest first; the full grid, factor 1, comes after)
    and the fraction of the iterations they take together, split equally among them."""

    factors: tuple[float, ...] = ()
    fraction: float = 0.0
    end_limit: float = 1.0
    """Fraction of the iterations by which the coarse levels must have ended (the refinement phase)."""

    @property
    def active(self) -> bool:
        return bool(self.factors) and self.fraction > 0

    def boundaries(self, planned: int) -> list[int]:
        """Iteration at which each coarse level ends (the last one: where the full grid starts)."""
        if not self.active:
            return []
        total = min(self.fraction, self.end_limit) * max(1, planned)
        n = len(self.factors)
        return [int(round(total * (k + 1) / n)) for k in range(n)]

    def level_at(self, iteration: int, planned: int) -> int:
        """Index of the level at an iteration: 0..len(factors)-1 coarse, len(factors) the full grid."""
        for k, end in enumerate(self.boundaries(planned)):
            if iteration < end:
                return k
        return len(self.factors)

    def factor(self, level: int) -> float:
        return self.factors[level] if level < len(self.factors) else 1.0

    @staticmethod
    def relative_cost(factor, rays=1.0, generator=True, integrator: str = "joseph", frozen=False):
        """Cost of an iteration on a grid `factor` times coarser, relative to a full-grid generator-phase
        iteration at the largest ray batch: `rays` is the batch as a fraction of that, `generator` whether
        the generator runs (the generator phase), `integrator` whose shares (COST_SHARES), `frozen`
        whether the field is frozen (only the detail grid learns: FROZEN_VOXEL_FACTOR of the voxels'
        share). Numbers or numpy arrays (one per iteration)."""
        shares = COST_SHARES[integrator]
        f = np.maximum(1.0, np.asarray(factor, dtype=float))
        gen = np.asarray(generator, dtype=float)
        voxels = shares.voxels * np.where(np.asarray(frozen, dtype=bool), FROZEN_VOXEL_FACTOR, 1.0)
        cost = (shares.generator * gen + shares.integration * np.asarray(rays, dtype=float) / f
                + voxels / f ** 3)
        return float(cost) if cost.ndim == 0 else cost
