// Per-ray and per-sample math of the fused renderer, written once for host and device.
//
// Compiled twice: by the C++ compiler for the CPU build (kernels/cpu) and by nvcc for the CUDA
// build (kernels/cuda). Everything here is header-only, free of torch types, and templated on
// the scalar type (float or double) and on how gradients are scattered (plain add into a
// per-thread buffer, OpenMP atomic on the CPU, atomicAdd on the GPU).
//
// Conventions (mirrored by the PyTorch reference in CTNeRFReconLib/fused.py):
//   * sample k of ray i: dt = (t_far - t_near) / S (0 when t_far <= t_near),
//     t = t_near + (k + off) * dt, off = 0.5 (jitter_seed < 0) or hash_uniform(seed, i, k);
//   * volumes are (z, y, x); continuous index c = (p - origin) / spacing; trilinear weights with
//     zero for neighbours outside [0, n - 1] (grid_sample, zeros padding, align_corners=True);
//   * VM field: q = 2 (p - box_min) / (box_max - box_min) - 1, position (q + 1) / 2 (R - 1);
//     mode 0 plane[c, iy, ix] x line over z, mode 1 plane[c, iz, ix] x line over y,
//     mode 2 plane[c, iz, iy] x line over x; mu = softplus(basis . features + bias).
#pragma once

#include <math.h>

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define CTNERF_HD __host__ __device__ __forceinline__
#else
#define CTNERF_HD inline
#endif

// A loop summing into `acc` that the host compiler may vectorise (reassociating the sum, which
// IEEE order forbids it otherwise); nothing under nvcc, whose device code has no such loops.
#if defined(_OPENMP) && !defined(__CUDACC__)
#define CTNERF_SIMD_SUM(acc) _Pragma("omp simd reduction(+ : acc)")
#else
#define CTNERF_SIMD_SUM(acc)
#endif

namespace ctnerf {

// Math overloads that resolve to the single- or double-precision routine on host and device alike.
CTNERF_HD float floor_(float x) { return floorf(x); }
CTNERF_HD double floor_(double x) { return ::floor(x); }
CTNERF_HD float ceil_(float x) { return ceilf(x); }
CTNERF_HD double ceil_(double x) { return ::ceil(x); }
CTNERF_HD float exp_(float x) { return expf(x); }
CTNERF_HD double exp_(double x) { return ::exp(x); }
CTNERF_HD float log1p_(float x) { return log1pf(x); }
CTNERF_HD double log1p_(double x) { return ::log1p(x); }
CTNERF_HD float abs_(float x) { return fabsf(x); }
CTNERF_HD double abs_(double x) { return ::fabs(x); }

// log(1 + x) for x >= 0 in a form the host compiler vectorises. Why not log1pf: under the build's
// portable flags (-O3, no -march, no -ffast-math) glibc's log1pf is a scalar call, and the edge-scaled
// TV's forward took 61 ms on the abdomen's 2.3 M-voxel training grid against 2.3 ms for plain TV.
// u = 1 + x = m 2^e with m in [sqrt(1/2), sqrt(2)) from the float's bits; log m = 2 atanh(s),
// s = (m - 1) / (m + 1), |s| < 0.172, by its series to s^9 (relative error below 1e-8). What rounding
// 1 + x lost, x - (u - 1) (exact), adds its first-order share (x - (u - 1)) / u, so tiny x give x. No
// branch and no division by a selected value, either of which keeps GCC from vectorising the loop.
// The device and double precision use the library's log1p.
CTNERF_HD float log1p_vec(float x) {
#if defined(__CUDA_ARCH__)
  return log1pf(x);
#else
  const float u = 1.0f + x;
  uint32_t bits;
  std::memcpy(&bits, &u, sizeof bits);
  bits += 0x3f800000u - 0x3f3504f3u;  // move the exponent's boundary from 1 to sqrt(1/2)
  const float e = static_cast<float>(static_cast<int32_t>(bits >> 23) - 127);
  bits = (bits & 0x007fffffu) + 0x3f3504f3u;
  float m;
  std::memcpy(&m, &bits, sizeof m);
  const float s = (m - 1.0f) / (m + 1.0f), s2 = s * s;
  const float log_m =
      2.0f * s * (1.0f + s2 * (1.0f / 3 + s2 * (1.0f / 5 + s2 * (1.0f / 7 + s2 * (1.0f / 9)))));
  return e * 0.693147180559945309f + log_m + (x - (u - 1.0f)) / u;
#endif
}
CTNERF_HD double log1p_vec(double x) { return ::log1p(x); }

// Scatter for private targets (a per-thread buffer, or one thread's own slot).
struct PlainAdd {
  template <typename T>
  CTNERF_HD void operator()(T* target, T value) const {
    *target += value;
  }
};

// ---------------------------------------------------------------------------------------------
// Counter-based jitter. Both multipliers are below 2^31 so the PyTorch mirror can run the same
// arithmetic in int64 without overflow: (x < 2^32) * (m < 2^31) < 2^63.
// ---------------------------------------------------------------------------------------------
constexpr uint32_t kMixMul1 = 0x7feb352dU;
constexpr uint32_t kMixMul2 = 0x6b43a9b5U;

CTNERF_HD uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= kMixMul1;
  x ^= x >> 15;
  x *= kMixMul2;
  x ^= x >> 16;
  return x;
}

// The jitter hash in two stages: a per-ray key (seed and ray number), then one mix per sample.
// hash_uniform(seed, i, k) = uniform_from(mix32(ray_key(seed, i) + k)).
CTNERF_HD uint32_t ray_key(int64_t seed, int64_t ray) {
  const uint64_t s = static_cast<uint64_t>(seed);
  const uint32_t h = mix32(static_cast<uint32_t>(s & 0xffffffffULL) + mix32(static_cast<uint32_t>(s >> 32)));
  return mix32(h ^ static_cast<uint32_t>(static_cast<uint64_t>(ray) & 0xffffffffULL));
}

// Uniform in [0, 1) on a 2^-24 lattice (exact in float and double).
template <typename T>
CTNERF_HD T sample_uniform(uint32_t key, int64_t k) {
  const uint32_t h = mix32(key + static_cast<uint32_t>(static_cast<uint64_t>(k) & 0xffffffffULL));
  return static_cast<T>(h >> 8) * static_cast<T>(1.0 / 16777216.0);
}

template <typename T>
CTNERF_HD T hash_uniform(int64_t seed, int64_t ray, int64_t k) {
  return sample_uniform<T>(ray_key(seed, ray), k);
}

// ---------------------------------------------------------------------------------------------
// Rays and sampling
// ---------------------------------------------------------------------------------------------
template <typename T>
struct Ray {
  T o[3];
  T d[3];
  T t_near;
  T t_far;
};

template <typename T>
CTNERF_HD Ray<T> load_ray(const T* origins, const T* dirs, const T* t_near, const T* t_far, int64_t i) {
  Ray<T> r;
  for (int a = 0; a < 3; ++a) {
    r.o[a] = origins[3 * i + a];
    r.d[a] = dirs[3 * i + a];
  }
  r.t_near = t_near[i];
  r.t_far = t_far[i];
  return r;
}

// Sample positions of one ray: t_k = t_near + (k + off_k) dt.
template <typename T>
struct Sampler {
  T t_near;
  T dt;  // 0 for rays that miss the box (t_far <= t_near)
  bool jitter;
  uint32_t key;

  CTNERF_HD Sampler(const Ray<T>& r, int64_t n_samples, int64_t seed, int64_t ray)
      : t_near(r.t_near),
        dt(r.t_far > r.t_near ? (r.t_far - r.t_near) / static_cast<T>(n_samples) : T(0)),
        jitter(seed >= 0),
        key(seed >= 0 ? ray_key(seed, ray) : 0U) {}

  CTNERF_HD T at(int64_t k) const {
    const T off = jitter ? sample_uniform<T>(key, k) : T(0.5);
    return t_near + (static_cast<T>(k) + off) * dt;
  }
};

// ---------------------------------------------------------------------------------------------
// Linear interpolation weights with zero padding (one axis)
// ---------------------------------------------------------------------------------------------
// Both neighbour indices are always inside [0, n-1] (clamped) so loads need no branch; a
// neighbour that lies outside gets weight zero instead. `hit` is false when neither neighbour
// is inside (then both weights are zero); positions far outside or NaN never reach the cast.
template <typename T>
struct Lerp {
  int64_t i0;
  int64_t i1;
  T w0;
  T w1;
  bool hit;
};

template <typename T>
CTNERF_HD Lerp<T> lerp_weights(T pos, int64_t n) {
  Lerp<T> l;
  l.i0 = 0;
  l.i1 = 0;
  l.w0 = T(0);
  l.w1 = T(0);
  l.hit = pos > T(-1) && pos < static_cast<T>(n);
  if (!l.hit) return l;
  // floor without a libm call: pos + 1 > 0, so truncation is the floor (to within one rounding
  // of pos + 1, which moves a weight by at most one ulp: interpolation is continuous)
  const int64_t i = static_cast<int64_t>(pos + T(1)) - 1;  // in [-1, n-1]
  const T a = pos - static_cast<T>(i);
  const bool lo_in = i >= 0, hi_in = i + 1 < n;
  l.i0 = lo_in ? i : 0;
  l.i1 = hi_in ? i + 1 : n - 1;
  l.w0 = lo_in ? T(1) - a : T(0);
  l.w1 = hi_in ? a : T(0);
  return l;
}

// ---------------------------------------------------------------------------------------------
// (a) Trilinear lookups in a (z, y, x) voxel grid
// ---------------------------------------------------------------------------------------------
template <typename T>
struct GridView {
  const T* volume;  // (nz, ny, nx), contiguous
  int64_t n[3];     // (nx, ny, nz)
  T origin[3];      // world position of voxel (0, 0, 0)'s centre, x y z
  T spacing[3];     // voxel size, x y z
};

// Built where the data lives: on the host for the CPU build, inside the kernel for CUDA, so the
// (3,) origin and spacing never need a device-to-host copy.
template <typename T>
CTNERF_HD GridView<T> make_grid_view(const T* volume, int64_t nz, int64_t ny, int64_t nx, const T* origin_xyz,
                                     const T* spacing_xyz) {
  GridView<T> g;
  g.volume = volume;
  g.n[0] = nx;
  g.n[1] = ny;
  g.n[2] = nz;
  for (int a = 0; a < 3; ++a) {
    g.origin[a] = origin_xyz[a];
    g.spacing[a] = spacing_xyz[a];
  }
  return g;
}

// The 8 taps of one sample: flat voxel indices (always valid) and weights (0 for taps outside).
template <typename T>
struct Trilinear {
  int64_t index[8];  // corner bit 0 = +x, bit 1 = +y, bit 2 = +z
  T weight[8];
  bool hit;  // false: the sample is outside the voxel hull, all weights are zero
};

// A ray in continuous voxel-index space: c(t) = start + t * step.
template <typename T>
struct GridRay {
  T start[3];
  T step[3];
};

template <typename T>
CTNERF_HD GridRay<T> grid_ray(const GridView<T>& g, const Ray<T>& r) {
  GridRay<T> gr;
  for (int a = 0; a < 3; ++a) {
    gr.start[a] = (r.o[a] - g.origin[a]) / g.spacing[a];
    gr.step[a] = r.d[a] / g.spacing[a];
  }
  return gr;
}

template <typename T>
CTNERF_HD Trilinear<T> trilinear_at(const GridView<T>& g, const GridRay<T>& gr, T t) {
  Trilinear<T> tri;
  const Lerp<T> x = lerp_weights<T>(gr.start[0] + t * gr.step[0], g.n[0]);
  const Lerp<T> y = lerp_weights<T>(gr.start[1] + t * gr.step[1], g.n[1]);
  const Lerp<T> z = lerp_weights<T>(gr.start[2] + t * gr.step[2], g.n[2]);
  tri.hit = x.hit && y.hit && z.hit;
  const int64_t row[4] = {(z.i0 * g.n[1] + y.i0) * g.n[0], (z.i0 * g.n[1] + y.i1) * g.n[0],
                          (z.i1 * g.n[1] + y.i0) * g.n[0], (z.i1 * g.n[1] + y.i1) * g.n[0]};
  const T wyz[4] = {y.w0 * z.w0, y.w1 * z.w0, y.w0 * z.w1, y.w1 * z.w1};
  for (int j = 0; j < 4; ++j) {
    tri.index[2 * j] = row[j] + x.i0;
    tri.index[2 * j + 1] = row[j] + x.i1;
    tri.weight[2 * j] = wyz[j] * x.w0;
    tri.weight[2 * j + 1] = wyz[j] * x.w1;
  }
  return tri;
}

template <typename T>
CTNERF_HD T grid_ray_forward(const GridView<T>& g, const Ray<T>& r, int64_t n_samples, int64_t seed, int64_t ray) {
  const Sampler<T> s(r, n_samples, seed, ray);
  if (!(s.dt > T(0))) return T(0);
  const GridRay<T> gr = grid_ray(g, r);
  T acc = T(0);
  for (int64_t k = 0; k < n_samples; ++k) {
    const Trilinear<T> tri = trilinear_at(g, gr, s.at(k));
    if (!tri.hit) continue;
    T mu = T(0);
    for (int c = 0; c < 8; ++c) mu += tri.weight[c] * g.volume[tri.index[c]];
    acc += mu;
  }
  return acc * s.dt;
}

// d(out_ray)/d(volume) scattered with `add(pointer, value)`.
template <typename T, typename Add>
CTNERF_HD void grid_ray_backward(const GridView<T>& g, const Ray<T>& r, int64_t n_samples, int64_t seed,
                                 int64_t ray, T grad_out, T* grad_volume, Add add) {
  const Sampler<T> s(r, n_samples, seed, ray);
  const T scale = grad_out * s.dt;
  if (!(s.dt > T(0)) || scale == T(0)) return;
  const GridRay<T> gr = grid_ray(g, r);
  // consecutive samples often fall in the same cell (steps are shorter than voxels): sum their
  // weights and scatter once per cell visit, not once per sample
  int64_t cell[8];
  T acc[8];
  bool open = false;
  for (int64_t k = 0; k < n_samples; ++k) {
    const Trilinear<T> tri = trilinear_at(g, gr, s.at(k));
    if (!tri.hit) continue;
    // a cell's 8 indices follow from its lowest and highest corner (clamping included)
    if (open && tri.index[0] == cell[0] && tri.index[7] == cell[7]) {
      for (int c = 0; c < 8; ++c) acc[c] += tri.weight[c];
      continue;
    }
    if (open)
      for (int c = 0; c < 8; ++c) add(grad_volume + cell[c], scale * acc[c]);
    for (int c = 0; c < 8; ++c) {
      cell[c] = tri.index[c];
      acc[c] = tri.weight[c];
    }
    open = true;
  }
  if (open)
    for (int c = 0; c < 8; ++c) add(grad_volume + cell[c], scale * acc[c]);
}

// ---------------------------------------------------------------------------------------------
// (a') Joseph's rule in a (z, y, x) voxel grid: one bilinear lookup where the ray crosses each
// plane of voxel centres normal to its major axis (the axis along which it advances fastest in
// index space). Plane k stands for the slab [k - 1/2, k + 1/2] along that axis, clipped to the
// ray's [t_near, t_far]: its weight is that piece's length in t, so the sum is a midpoint rule for
// the integral of the trilinear volume between t_near and t_far (spans inside the voxel centres'
// hull, as training's rays are; beyond it, along the major axis, the outer slabs reach half a voxel
// out where the zero-padded trilinear field ramps to zero over a whole voxel: the same total for a
// ray that crosses the whole border, nothing for one that only grazes it). A crossing needs 4 taps, not 8,
// and there is one per plane (1 to sqrt(3) voxels apart), not one per 0.8 voxel: about a third of
// the stratified rule's loads. Deterministic: no jitter (the lookups already tile every plane).
// ---------------------------------------------------------------------------------------------
template <typename T>
struct JosephPlan {
  int axis;           // major axis, 0 x, 1 y, 2 z
  int b;              // the two in-plane axes, b < c
  int c;
  int64_t first;      // planes first..last (none when last < first)
  int64_t last;
  int64_t fast_first; // planes fast_first..fast_last lie wholly inside: the full slab, all four taps
  int64_t fast_last;  // in the grid (joseph_fast_planes); fast_first = last + 1 when there are none
  T lo;               // the ray's extent along the axis in index units, lo <= hi
  T hi;
  T t_per_index;      // |dt / dc| along the major axis
  T u0;               // in-plane positions (index units) where the ray crosses plane k:
  T du;               //   u = u0 + k du along axis b, v = v0 + k dv along axis c
  T v0;
  T dv;
  int64_t stride[3];  // flat-index strides of x, y, z
};

// Planes k of [first, last] whose slab [k - 1/2, k + 1/2] lies inside [lo, hi] and whose crossing has
// both in-plane positions in [0, n - 1) with a margin: there the slab's length is t_per_index and the
// four taps need no test. The range is found by solving the linear bounds for k and shrunk by a plane
// at each end, so float rounding of u0 + k du cannot carry a crossing out (the loops also clamp).
template <typename T>
CTNERF_HD void joseph_fast_planes(const GridView<T>& g, JosephPlan<T>& p) {
  p.fast_first = p.last + 1;
  p.fast_last = p.last;
  if (p.last < p.first || g.n[p.b] < 2 || g.n[p.c] < 2) return;
  T k_lo = ceil_(p.lo + T(0.5)), k_hi = floor_(p.hi - T(0.5));
  const T margin = T(1e-3);
  const T pos0[2] = {p.u0, p.v0}, dpos[2] = {p.du, p.dv};
  const int64_t n_in[2] = {g.n[p.b], g.n[p.c]};
  for (int m = 0; m < 2; ++m) {
    const T a = margin - pos0[m], z = static_cast<T>(n_in[m] - 1) - margin - pos0[m], d = dpos[m];
    if (d > T(0) || d < T(0)) {  // a <= k d <= z: k from (a or z) / d up to (z or a) / d
      const T from = ceil_((d > T(0) ? a : z) / d), to = floor_((d > T(0) ? z : a) / d);
      k_lo = k_lo > from ? k_lo : from;
      k_hi = k_hi < to ? k_hi : to;
    } else if (!(d == T(0)) || !(a <= T(0) && z >= T(0))) {  // NaN, or parallel and outside
      return;
    }
  }
  // shrink by one plane and keep inside [first, last] before any conversion to an integer
  k_lo = k_lo + T(1);
  k_hi = k_hi - T(1);
  const T first = static_cast<T>(p.first), last = static_cast<T>(p.last);
  if (!(k_lo <= k_hi) || k_hi < first || k_lo > last) return;  // also false for NaN
  p.fast_first = static_cast<int64_t>(k_lo > first ? k_lo : first);
  p.fast_last = static_cast<int64_t>(k_hi < last ? k_hi : last);
  if (p.fast_last < p.fast_first) {
    p.fast_first = p.last + 1;
    p.fast_last = p.last;
  }
}

template <typename T>
CTNERF_HD JosephPlan<T> joseph_plan(const GridView<T>& g, const GridRay<T>& gr, const Ray<T>& r) {
  JosephPlan<T> p;
  p.axis = 0;
  p.b = 1;
  p.c = 2;
  p.first = 0;
  p.last = -1;
  p.fast_first = 0;
  p.fast_last = -1;
  p.lo = p.hi = p.t_per_index = p.u0 = p.du = p.v0 = p.dv = T(0);
  p.stride[0] = 1;
  p.stride[1] = g.n[0];
  p.stride[2] = g.n[0] * g.n[1];
  if (!(r.t_far > r.t_near)) return p;
  int a = 0;
  for (int b = 1; b < 3; ++b)
    if (abs_(gr.step[b]) > abs_(gr.step[a])) a = b;
  const T s = gr.step[a];
  if (!(abs_(s) > T(0))) return p;
  p.axis = a;
  p.b = a == 0 ? 1 : 0;
  p.c = a == 2 ? 1 : 2;
  const T c_near = gr.start[a] + r.t_near * s, c_far = gr.start[a] + r.t_far * s;
  p.lo = c_near < c_far ? c_near : c_far;
  p.hi = c_near < c_far ? c_far : c_near;
  const T n = static_cast<T>(g.n[a]);
  if (!(p.hi > T(-0.5)) || !(p.lo < n - T(0.5))) return p;  // also false for NaN
  // planes whose slab [k - 1/2, k + 1/2] overlaps [lo, hi]: k from floor(lo + 1/2) to floor(hi + 1/2)
  const T first = floor_((p.lo > T(-0.5) ? p.lo : T(-0.5)) + T(0.5));
  const T last = floor_((p.hi < n - T(0.5) ? p.hi : n - T(0.5)) + T(0.5));
  p.first = static_cast<int64_t>(first);
  p.last = static_cast<int64_t>(last) < g.n[a] - 1 ? static_cast<int64_t>(last) : g.n[a] - 1;
  const T dt_dk = T(1) / s;  // signed dt per plane
  const T t_of_plane0 = -gr.start[a] * dt_dk;
  p.t_per_index = abs_(dt_dk);
  p.u0 = gr.start[p.b] + t_of_plane0 * gr.step[p.b];
  p.du = dt_dk * gr.step[p.b];
  p.v0 = gr.start[p.c] + t_of_plane0 * gr.step[p.c];
  p.dv = dt_dk * gr.step[p.c];
  joseph_fast_planes(g, p);
  return p;
}

// One plane crossing: the 4 taps' flat indices (always valid), bilinear weights (0 for taps
// outside) and the slab's length in t.
template <typename T>
struct JosephTaps {
  int64_t index[4];
  T weight[4];
  T length;
  bool hit;
};

template <typename T>
CTNERF_HD JosephTaps<T> joseph_taps(const GridView<T>& g, const JosephPlan<T>& p, int64_t k) {
  JosephTaps<T> j;
  const T kf = static_cast<T>(k);
  const T lo = p.lo > kf - T(0.5) ? p.lo : kf - T(0.5);
  const T hi = p.hi < kf + T(0.5) ? p.hi : kf + T(0.5);
  j.length = (hi - lo) * p.t_per_index;
  const Lerp<T> u = lerp_weights<T>(p.u0 + kf * p.du, g.n[p.b]);
  const Lerp<T> v = lerp_weights<T>(p.v0 + kf * p.dv, g.n[p.c]);
  j.hit = u.hit && v.hit && j.length > T(0);
  const int64_t base = k * p.stride[p.axis];
  const int64_t sb = p.stride[p.b], sc = p.stride[p.c];
  j.index[0] = base + v.i0 * sc + u.i0 * sb;
  j.index[1] = base + v.i0 * sc + u.i1 * sb;
  j.index[2] = base + v.i1 * sc + u.i0 * sb;
  j.index[3] = base + v.i1 * sc + u.i1 * sb;
  j.weight[0] = v.w0 * u.w0;
  j.weight[1] = v.w0 * u.w1;
  j.weight[2] = v.w1 * u.w0;
  j.weight[3] = v.w1 * u.w1;
  return j;
}

// A crossing of the fast range: the lowest tap's flat index and the two in-plane fractions (the
// other taps are +stride_b, +stride_c and both). The clamps never bind inside the range; they keep
// every index valid by construction.
template <typename T>
struct JosephCell {
  int64_t index;
  T au;
  T av;
};

template <typename T>
CTNERF_HD JosephCell<T> joseph_cell(const GridView<T>& g, const JosephPlan<T>& p, int64_t k) {
  const T kf = static_cast<T>(k);
  const T u = p.u0 + kf * p.du, v = p.v0 + kf * p.dv;
  int64_t iu = static_cast<int64_t>(u), iv = static_cast<int64_t>(v);  // u, v >= 0: truncation is the floor
  iu = iu < 0 ? 0 : (iu > g.n[p.b] - 2 ? g.n[p.b] - 2 : iu);
  iv = iv < 0 ? 0 : (iv > g.n[p.c] - 2 ? g.n[p.c] - 2 : iv);
  JosephCell<T> cell;
  cell.index = k * p.stride[p.axis] + iv * p.stride[p.c] + iu * p.stride[p.b];
  cell.au = u - static_cast<T>(iu);
  cell.av = v - static_cast<T>(iv);
  return cell;
}

// The general path over planes k0..k1 (partial slabs, taps outside the grid).
template <typename T>
CTNERF_HD T joseph_general_forward(const GridView<T>& g, const JosephPlan<T>& p, int64_t k0, int64_t k1) {
  T acc = T(0);
  for (int64_t k = k0; k <= k1; ++k) {
    const JosephTaps<T> j = joseph_taps(g, p, k);
    if (!j.hit) continue;
    T mu = T(0);
    for (int c = 0; c < 4; ++c) mu += j.weight[c] * g.volume[j.index[c]];
    acc += j.length * mu;
  }
  return acc;
}

template <typename T>
CTNERF_HD T joseph_ray_forward(const GridView<T>& g, const Ray<T>& r) {
  const GridRay<T> gr = grid_ray(g, r);
  const JosephPlan<T> p = joseph_plan(g, gr, r);
  // the planes before and after the fast range (none: fast_first = last + 1) take the general path
  T acc = joseph_general_forward(g, p, p.first, p.fast_first - 1) +
          joseph_general_forward(g, p, p.fast_last + 1, p.last);
  const int64_t sb = p.stride[p.b], sc = p.stride[p.c];
  T inner = T(0);
  for (int64_t k = p.fast_first; k <= p.fast_last; ++k) {
    const JosephCell<T> cell = joseph_cell(g, p, k);
    const T* q = g.volume + cell.index;
    inner += (T(1) - cell.av) * ((T(1) - cell.au) * q[0] + cell.au * q[sb]) +
             cell.av * ((T(1) - cell.au) * q[sc] + cell.au * q[sc + sb]);
  }
  return acc + p.t_per_index * inner;
}

// The general path's gradient over planes k0..k1, scattered with `add(pointer, value)`.
template <typename T, typename Add>
CTNERF_HD void joseph_general_backward(const GridView<T>& g, const JosephPlan<T>& p, int64_t k0, int64_t k1,
                                       T grad_out, T* grad_volume, Add add) {
  for (int64_t k = k0; k <= k1; ++k) {
    const JosephTaps<T> j = joseph_taps(g, p, k);
    if (!j.hit) continue;
    const T scale = grad_out * j.length;
    for (int c = 0; c < 4; ++c)
      if (j.weight[c] != T(0)) add(grad_volume + j.index[c], scale * j.weight[c]);
  }
}

// d(out_ray)/d(volume) of Joseph's rule, scattered with `add(pointer, value)`.
template <typename T, typename Add>
CTNERF_HD void joseph_ray_backward(const GridView<T>& g, const Ray<T>& r, T grad_out, T* grad_volume, Add add) {
  if (grad_out == T(0)) return;
  const GridRay<T> gr = grid_ray(g, r);
  const JosephPlan<T> p = joseph_plan(g, gr, r);
  joseph_general_backward(g, p, p.first, p.fast_first - 1, grad_out, grad_volume, add);
  joseph_general_backward(g, p, p.fast_last + 1, p.last, grad_out, grad_volume, add);
  const int64_t sb = p.stride[p.b], sc = p.stride[p.c];
  const T scale = grad_out * p.t_per_index;
  for (int64_t k = p.fast_first; k <= p.fast_last; ++k) {
    const JosephCell<T> cell = joseph_cell(g, p, k);
    T* q = grad_volume + cell.index;
    const T w_lo = scale * (T(1) - cell.av), w_hi = scale * cell.av;
    add(q, w_lo * (T(1) - cell.au));
    add(q + sb, w_lo * cell.au);
    add(q + sc, w_hi * (T(1) - cell.au));
    add(q + sc + sb, w_hi * cell.au);
  }
}

// ---------------------------------------------------------------------------------------------
// (b) TensoRF-VM field: three planes, three lines, a linear decoder and softplus
// ---------------------------------------------------------------------------------------------
// The kernels read the factors channels-last: planes (3, R, R, C) and lines (3, L, C), so the
// C values of one tap are contiguous (one cache line, SIMD over channels). The operators
// transpose the (3, C, R, R) / (3, C, L) inputs once per call and the gradients back.
template <typename T>
struct VMView {
  const T* planes;  // (3, R, R, C) channels-last
  const T* lines;   // (3, L, C) channels-last
  const T* basis;   // (3 C,)
  T bias;
  int64_t channels;
  int64_t plane_res;
  int64_t line_res;
  T box_min[3];
  T box_size[3];  // box_max - box_min
};

template <typename T>
CTNERF_HD VMView<T> make_vm_view(const T* planes_cl, const T* lines_cl, const T* basis, const T* bias,
                                 int64_t channels, int64_t plane_res, int64_t line_res, const T* box_min,
                                 const T* box_max) {
  VMView<T> v;
  v.planes = planes_cl;
  v.lines = lines_cl;
  v.basis = basis;
  v.bias = bias[0];
  v.channels = channels;
  v.plane_res = plane_res;
  v.line_res = line_res;
  for (int a = 0; a < 3; ++a) {
    v.box_min[a] = box_min[a];
    v.box_size[a] = box_max[a] - box_min[a];
  }
  return v;
}

// Where one sample reads its factors: per mode, element offsets of the first channel of the 4
// plane taps and the 2 line taps (always valid), with their weights (0 for taps outside).
template <typename T>
struct VMTaps {
  int64_t plane_offset[3][4];
  T plane_weight[3][4];
  int64_t line_offset[3][2];
  T line_weight[3][2];
};

template <typename T>
CTNERF_HD VMTaps<T> vm_taps(const VMView<T>& v, const T p[3]) {
  T pos_plane[3], pos_line[3];
  for (int a = 0; a < 3; ++a) {
    const T q = T(2) * (p[a] - v.box_min[a]) / v.box_size[a] - T(1);
    pos_plane[a] = (q + T(1)) * T(0.5) * static_cast<T>(v.plane_res - 1);
    pos_line[a] = (q + T(1)) * T(0.5) * static_cast<T>(v.line_res - 1);
  }
  // (plane's last axis, plane's first axis, line axis) per mode, as x = 0, y = 1, z = 2
  const int last_axis[3] = {0, 0, 1};
  const int first_axis[3] = {1, 2, 2};
  const int line_axis[3] = {2, 1, 0};
  const int64_t c = v.channels, r = v.plane_res;
  VMTaps<T> taps;
  for (int m = 0; m < 3; ++m) {
    const Lerp<T> u = lerp_weights<T>(pos_plane[last_axis[m]], r);
    const Lerp<T> w = lerp_weights<T>(pos_plane[first_axis[m]], r);
    const int64_t base = m * r * r * c;
    taps.plane_offset[m][0] = base + (w.i0 * r + u.i0) * c;
    taps.plane_offset[m][1] = base + (w.i0 * r + u.i1) * c;
    taps.plane_offset[m][2] = base + (w.i1 * r + u.i0) * c;
    taps.plane_offset[m][3] = base + (w.i1 * r + u.i1) * c;
    taps.plane_weight[m][0] = w.w0 * u.w0;
    taps.plane_weight[m][1] = w.w0 * u.w1;
    taps.plane_weight[m][2] = w.w1 * u.w0;
    taps.plane_weight[m][3] = w.w1 * u.w1;
    const Lerp<T> l = lerp_weights<T>(pos_line[line_axis[m]], v.line_res);
    const int64_t lbase = m * v.line_res * c;
    taps.line_offset[m][0] = lbase + l.i0 * c;
    taps.line_offset[m][1] = lbase + l.i1 * c;
    taps.line_weight[m][0] = l.w0;
    taps.line_weight[m][1] = l.w1;
  }
  return taps;
}

template <typename T>
CTNERF_HD T vm_plane_value(const VMView<T>& v, const VMTaps<T>& t, int m, int64_t c) {
  const T* p = v.planes;
  return t.plane_weight[m][0] * p[t.plane_offset[m][0] + c] + t.plane_weight[m][1] * p[t.plane_offset[m][1] + c] +
         t.plane_weight[m][2] * p[t.plane_offset[m][2] + c] + t.plane_weight[m][3] * p[t.plane_offset[m][3] + c];
}

template <typename T>
CTNERF_HD T vm_line_value(const VMView<T>& v, const VMTaps<T>& t, int m, int64_t c) {
  return t.line_weight[m][0] * v.lines[t.line_offset[m][0] + c] + t.line_weight[m][1] * v.lines[t.line_offset[m][1] + c];
}

// Decoder input: bias + sum over modes and channels of basis * plane * line.
template <typename T>
CTNERF_HD T vm_pre_activation(const VMView<T>& v, const VMTaps<T>& taps) {
  T pre = v.bias;
  for (int m = 0; m < 3; ++m) {
    const T* basis = v.basis + m * v.channels;
    T acc = T(0);
    for (int64_t c = 0; c < v.channels; ++c) acc += basis[c] * vm_plane_value(v, taps, m, c) * vm_line_value(v, taps, m, c);
    pre += acc;
  }
  return pre;
}

// softplus(x) = log(1 + e^x) without overflow, and its derivative, the logistic function.
template <typename T>
CTNERF_HD T softplus(T x) {
  return (x > T(0) ? x : T(0)) + log1p_(exp_(-abs_(x)));
}

template <typename T>
CTNERF_HD T sigmoid(T x) {
  if (x >= T(0)) return T(1) / (T(1) + exp_(-x));
  const T e = exp_(x);
  return e / (T(1) + e);
}

template <typename T>
CTNERF_HD T sample_point(const Ray<T>& r, T t, int a) {
  return r.o[a] + t * r.d[a];
}

template <typename T>
CTNERF_HD T vm_ray_forward(const VMView<T>& v, const Ray<T>& r, int64_t n_samples, int64_t seed, int64_t ray) {
  const Sampler<T> s(r, n_samples, seed, ray);
  if (!(s.dt > T(0))) return T(0);
  T acc = T(0);
  for (int64_t k = 0; k < n_samples; ++k) {
    const T t = s.at(k);
    const T p[3] = {sample_point(r, t, 0), sample_point(r, t, 1), sample_point(r, t, 2)};
    acc += softplus(vm_pre_activation(v, vm_taps(v, p)));
  }
  return acc * s.dt;
}

constexpr int kChannelBlock = 16;

// Gradients of one ray's output. Planes and lines (channels-last, like the view) are scattered
// with `add`; basis and bias go to the caller's private accumulators grad_basis[j * basis_stride]
// (j < 3C) and *grad_bias, updated with plain +=.
template <typename T, typename Add>
CTNERF_HD void vm_ray_backward(const VMView<T>& v, const Ray<T>& r, int64_t n_samples, int64_t seed, int64_t ray,
                               T grad_out, T* grad_planes, T* grad_lines, T* grad_basis, int64_t basis_stride,
                               T* grad_bias, Add add) {
  const Sampler<T> s(r, n_samples, seed, ray);
  const T scale = grad_out * s.dt;
  if (!(s.dt > T(0)) || scale == T(0)) return;
  for (int64_t k = 0; k < n_samples; ++k) {
    const T t = s.at(k);
    const T p[3] = {sample_point(r, t, 0), sample_point(r, t, 1), sample_point(r, t, 2)};
    const VMTaps<T> taps = vm_taps(v, p);
    const T g = scale * sigmoid(vm_pre_activation(v, taps));  // d out / d pre at this sample
    *grad_bias += g;
    for (int m = 0; m < 3; ++m) {
      const T* basis = v.basis + m * v.channels;
      T* gb = grad_basis + m * v.channels * basis_stride;
      // channels in blocks: first the per-channel factors, then one simple loop per tap, so each
      // scatter loop has a fixed target row (vectorisable) and taps with zero weight are skipped
      for (int64_t c0 = 0; c0 < v.channels; c0 += kChannelBlock) {
        const int nb = static_cast<int>(v.channels - c0 < kChannelBlock ? v.channels - c0 : kChannelBlock);
        T dp[kChannelBlock], dl[kChannelBlock];
        for (int j = 0; j < nb; ++j) {
          const int64_t c = c0 + j;
          const T pv = vm_plane_value(v, taps, m, c);
          const T lv = vm_line_value(v, taps, m, c);
          gb[c * basis_stride] += g * pv * lv;
          const T gc = g * basis[c];
          dp[j] = gc * lv;
          dl[j] = gc * pv;
        }
        for (int tap = 0; tap < 4; ++tap) {
          const T w = taps.plane_weight[m][tap];
          if (w == T(0)) continue;
          T* row = grad_planes + taps.plane_offset[m][tap] + c0;
          for (int j = 0; j < nb; ++j) add(row + j, w * dp[j]);
        }
        for (int tap = 0; tap < 2; ++tap) {
          const T w = taps.line_weight[m][tap];
          if (w == T(0)) continue;
          T* row = grad_lines + taps.line_offset[m][tap] + c0;
          for (int j = 0; j < nb; ++j) add(row + j, w * dl[j]);
        }
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// (c) Anisotropic total variation of a (z, y, x) grid, with an edge scale: the sum over the three
// axes of the mean penalty phi(d) of the forward differences d along that axis (an axis of length
// 1 has no differences and adds 0). phi(d) = |d| when edge is 0 (plain TV); otherwise
// phi(d) = edge * log(1 + |d| / edge), which is |d| for differences well below the edge scale and
// grows only logarithmically above it, so a real edge pays little more than its smallest value
// (the log penalty that reweighted-L1 minimisation approximates). phi'(d) = sign(d) / (1 + |d| /
// edge), one formula for both (1 / edge is stored as 0 for plain TV). Per voxel, so the CPU build
// runs it over slices and the CUDA build one thread per voxel; the gradient of a voxel reads only
// its six neighbours, so it needs no scatter. phi'(0) = 0, as torch's abs backward.
// ---------------------------------------------------------------------------------------------
template <typename T>
struct TVView {
  const T* volume;  // (nz, ny, nx), contiguous
  int64_t n[3];     // (nx, ny, nz)
  int64_t stride[3];
  T inv_count[3];   // 1 / (number of differences along the axis), 0 without any
  T edge;           // the edge scale, 0 for plain TV
  T inv_edge;       // 1 / edge, 0 for plain TV
};

template <typename T>
CTNERF_HD TVView<T> make_tv_view(const T* volume, int64_t nz, int64_t ny, int64_t nx, T edge) {
  TVView<T> t;
  t.volume = volume;
  t.n[0] = nx;
  t.n[1] = ny;
  t.n[2] = nz;
  t.stride[0] = 1;
  t.stride[1] = nx;
  t.stride[2] = nx * ny;
  for (int a = 0; a < 3; ++a) {
    const int64_t pairs = (t.n[a] - 1) * (nx * ny * nz / t.n[a]);
    t.inv_count[a] = pairs > 0 ? T(1) / static_cast<T>(pairs) : T(0);
  }
  t.edge = edge > T(0) ? edge : T(0);
  t.inv_edge = edge > T(0) ? T(1) / edge : T(0);
  return t;
}

template <typename T>
CTNERF_HD T sign_(T x) {
  return static_cast<T>((x > T(0)) - (x < T(0)));
}

// phi(d), the penalty of one difference.
template <typename T>
CTNERF_HD T tv_penalty(const TVView<T>& t, T d) {
  return t.inv_edge > T(0) ? t.edge * log1p_vec(abs_(d) * t.inv_edge) : abs_(d);
}

// phi'(d), its slope.
template <typename T>
CTNERF_HD T tv_slope(const TVView<T>& t, T d) {
  return sign_(d) / (T(1) + abs_(d) * t.inv_edge);
}

// This voxel's forward differences, penalised and weighted: its share of the TV value.
template <typename T>
CTNERF_HD T tv_voxel_value(const TVView<T>& t, int64_t index, const int64_t coord[3]) {
  const T v = t.volume[index];
  T acc = T(0);
  for (int a = 0; a < 3; ++a)
    if (coord[a] + 1 < t.n[a]) acc += tv_penalty(t, t.volume[index + t.stride[a]] - v) * t.inv_count[a];
  return acc;
}

// d TV / d voxel: the differences it starts and the ones it ends.
template <typename T>
CTNERF_HD T tv_voxel_grad(const TVView<T>& t, int64_t index, const int64_t coord[3]) {
  const T v = t.volume[index];
  T g = T(0);
  for (int a = 0; a < 3; ++a) {
    if (coord[a] + 1 < t.n[a]) g -= tv_slope(t, t.volume[index + t.stride[a]] - v) * t.inv_count[a];
    if (coord[a] > 0) g += tv_slope(t, v - t.volume[index - t.stride[a]]) * t.inv_count[a];
  }
  return g;
}

// sum over x in [0, count) of phi(b[x] - a[x]); the test of the edge scale hoisted out of the loop,
// so each loop is a plain sweep the compiler vectorises.
template <typename T>
CTNERF_HD T tv_sweep(const TVView<T>& t, const T* a, const T* b, int64_t count) {
  T acc = T(0);
  if (t.inv_edge > T(0)) {
    CTNERF_SIMD_SUM(acc)
    for (int64_t x = 0; x < count; ++x) acc += log1p_vec(abs_(b[x] - a[x]) * t.inv_edge);
    return acc * t.edge;
  }
  for (int64_t x = 0; x < count; ++x) acc += abs_(b[x] - a[x]);
  return acc;
}

// The same TV a row of x at a time (the CPU build): the boundary tests hoisted out of the loops over
// x. Sums of phi(differences) along x, y and z of row (z, y), each weighted like tv_voxel_value.
template <typename T>
CTNERF_HD T tv_row_value(const TVView<T>& t, int64_t z, int64_t y) {
  const int64_t nx = t.n[0];
  const T* r = t.volume + (z * t.n[1] + y) * nx;
  const T ax = tv_sweep(t, r, r + 1, nx - 1);
  const T ay = y + 1 < t.n[1] ? tv_sweep(t, r, r + t.stride[1], nx) : T(0);
  const T az = z + 1 < t.n[2] ? tv_sweep(t, r, r + t.stride[2], nx) : T(0);
  return ax * t.inv_count[0] + ay * t.inv_count[1] + az * t.inv_count[2];
}

// grad_out * d TV / d voxel for row (z, y), written to out[0 .. nx): tv_voxel_grad a row at a time.
template <typename T>
CTNERF_HD void tv_row_grad(const TVView<T>& t, int64_t z, int64_t y, T grad_out, T* out) {
  const int64_t nx = t.n[0];
  const T* r = t.volume + (z * t.n[1] + y) * nx;
  for (int64_t x = 0; x < nx; ++x) out[x] = T(0);
  const T wx = t.inv_count[0], wy = t.inv_count[1], wz = t.inv_count[2];
  for (int64_t x = 0; x + 1 < nx; ++x) {
    const T s = tv_slope(t, r[x + 1] - r[x]) * wx;
    out[x] -= s;
    out[x + 1] += s;
  }
  const int64_t sy = t.stride[1], sz = t.stride[2];
  if (y + 1 < t.n[1])
    for (int64_t x = 0; x < nx; ++x) out[x] -= tv_slope(t, r[x + sy] - r[x]) * wy;
  if (y > 0)
    for (int64_t x = 0; x < nx; ++x) out[x] += tv_slope(t, r[x] - r[x - sy]) * wy;
  if (z + 1 < t.n[2])
    for (int64_t x = 0; x < nx; ++x) out[x] -= tv_slope(t, r[x + sz] - r[x]) * wz;
  if (z > 0)
    for (int64_t x = 0; x < nx; ++x) out[x] += tv_slope(t, r[x] - r[x - sz]) * wz;
  for (int64_t x = 0; x < nx; ++x) out[x] *= grad_out;
}

}  // namespace ctnerf
