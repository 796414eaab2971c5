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

#if defined(__CUDACC__)
#define CTNERF_HD __host__ __device__ __forceinline__
#else
#define CTNERF_HD inline
#endif

namespace ctnerf {

// Math overloads that resolve to the single- or double-precision routine on host and device alike.
CTNERF_HD float floor_(float x) { return floorf(x); }
CTNERF_HD double floor_(double x) { return ::floor(x); }
CTNERF_HD float exp_(float x) { return expf(x); }
CTNERF_HD double exp_(double x) { return ::exp(x); }
CTNERF_HD float log1p_(float x) { return log1pf(x); }
CTNERF_HD double log1p_(double x) { return ::log1p(x); }
CTNERF_HD float abs_(float x) { return fabsf(x); }
CTNERF_HD double abs_(double x) { return ::fabs(x); }

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

// Uniform in [0, 1) on a 2^-24 lattice (exact in float and double).
template <typename T>
CTNERF_HD T hash_uniform(int64_t seed, int64_t ray, int64_t k) {
  const uint64_t s = static_cast<uint64_t>(seed);
  uint32_t h = mix32(static_cast<uint32_t>(s & 0xffffffffULL) + mix32(static_cast<uint32_t>(s >> 32)));
  h = mix32(h ^ static_cast<uint32_t>(static_cast<uint64_t>(ray) & 0xffffffffULL));
  h = mix32(h + static_cast<uint32_t>(static_cast<uint64_t>(k) & 0xffffffffULL));
  return static_cast<T>(h >> 8) * static_cast<T>(1.0 / 16777216.0);
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

template <typename T>
CTNERF_HD T bin_length(const Ray<T>& r, int64_t n_samples) {
  return r.t_far > r.t_near ? (r.t_far - r.t_near) / static_cast<T>(n_samples) : T(0);
}

template <typename T>
CTNERF_HD T sample_distance(const Ray<T>& r, T dt, int64_t seed, int64_t ray, int64_t k) {
  const T off = seed < 0 ? T(0.5) : hash_uniform<T>(seed, ray, k);
  return r.t_near + (static_cast<T>(k) + off) * dt;
}

// ---------------------------------------------------------------------------------------------
// Linear interpolation weights with zero padding (one axis)
// ---------------------------------------------------------------------------------------------
template <typename T>
struct Lerp {
  int64_t i0;  // first neighbour, -1 when outside
  int64_t i1;  // second neighbour, -1 when outside
  T w0;
  T w1;
};

// Weights at continuous index `pos` of a length-n axis; neighbours outside [0, n-1] get weight
// zero. Positions far outside (or NaN) give no neighbours and never reach the integer cast.
template <typename T>
CTNERF_HD Lerp<T> lerp_weights(T pos, int64_t n) {
  Lerp<T> l;
  l.i0 = -1;
  l.i1 = -1;
  l.w0 = T(0);
  l.w1 = T(0);
  if (!(pos > T(-1)) || !(pos < static_cast<T>(n))) return l;
  const T f = floor_(pos);
  const int64_t i = static_cast<int64_t>(f);
  const T a = pos - f;
  if (i >= 0) {  // i <= n - 1 holds because pos < n
    l.i0 = i;
    l.w0 = T(1) - a;
  }
  if (i + 1 < n) {  // i + 1 >= 0 holds because pos > -1
    l.i1 = i + 1;
    l.w1 = a;
  }
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

template <typename T>
struct Trilinear {
  int64_t index[8];  // flat voxel index, -1 when outside
  T weight[8];
};

template <typename T>
CTNERF_HD Trilinear<T> trilinear_at(const GridView<T>& g, const T p[3]) {
  Lerp<T> ax[3];
  for (int a = 0; a < 3; ++a) ax[a] = lerp_weights<T>((p[a] - g.origin[a]) / g.spacing[a], g.n[a]);
  Trilinear<T> tri;
  for (int corner = 0; corner < 8; ++corner) {
    const int bx = corner & 1, by = (corner >> 1) & 1, bz = (corner >> 2) & 1;
    const int64_t ix = bx ? ax[0].i1 : ax[0].i0;
    const int64_t iy = by ? ax[1].i1 : ax[1].i0;
    const int64_t iz = bz ? ax[2].i1 : ax[2].i0;
    const bool ok = ix >= 0 && iy >= 0 && iz >= 0;
    tri.index[corner] = ok ? (iz * g.n[1] + iy) * g.n[0] + ix : -1;
    tri.weight[corner] = ok ? (bx ? ax[0].w1 : ax[0].w0) * (by ? ax[1].w1 : ax[1].w0) * (bz ? ax[2].w1 : ax[2].w0)
                            : T(0);
  }
  return tri;
}

template <typename T>
CTNERF_HD T grid_ray_forward(const GridView<T>& g, const Ray<T>& r, int64_t n_samples, int64_t seed, int64_t ray) {
  const T dt = bin_length(r, n_samples);
  if (!(dt > T(0))) return T(0);
  T acc = T(0);
  for (int64_t k = 0; k < n_samples; ++k) {
    const T t = sample_distance(r, dt, seed, ray, k);
    const T p[3] = {r.o[0] + t * r.d[0], r.o[1] + t * r.d[1], r.o[2] + t * r.d[2]};
    const Trilinear<T> tri = trilinear_at(g, p);
    T mu = T(0);
    for (int c = 0; c < 8; ++c)
      if (tri.index[c] >= 0) mu += tri.weight[c] * g.volume[tri.index[c]];
    acc += mu;
  }
  return acc * dt;
}

// d(out_ray)/d(volume) scattered with `add(pointer, value)`.
template <typename T, typename Add>
CTNERF_HD void grid_ray_backward(const GridView<T>& g, const Ray<T>& r, int64_t n_samples, int64_t seed,
                                 int64_t ray, T grad_out, T* grad_volume, Add add) {
  const T dt = bin_length(r, n_samples);
  const T scale = grad_out * dt;
  if (!(dt > T(0)) || scale == T(0)) return;
  for (int64_t k = 0; k < n_samples; ++k) {
    const T t = sample_distance(r, dt, seed, ray, k);
    const T p[3] = {r.o[0] + t * r.d[0], r.o[1] + t * r.d[1], r.o[2] + t * r.d[2]};
    const Trilinear<T> tri = trilinear_at(g, p);
    for (int c = 0; c < 8; ++c)
      if (tri.index[c] >= 0) add(grad_volume + tri.index[c], scale * tri.weight[c]);
  }
}

// ---------------------------------------------------------------------------------------------
// (b) TensoRF-VM field: three planes (3, C, R, R), three lines (3, C, L), linear decoder
// ---------------------------------------------------------------------------------------------
template <typename T>
struct VMView {
  const T* planes;  // (3, C, R, R)
  const T* lines;   // (3, C, L)
  const T* basis;   // (3 C,)
  T bias;
  int64_t channels;
  int64_t plane_res;
  int64_t line_res;
  T box_min[3];
  T box_size[3];  // box_max - box_min
};

template <typename T>
CTNERF_HD VMView<T> make_vm_view(const T* planes, const T* lines, const T* basis, const T* bias, int64_t channels,
                                 int64_t plane_res, int64_t line_res, const T* box_min, const T* box_max) {
  VMView<T> v;
  v.planes = planes;
  v.lines = lines;
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

// Where one sample reads its factors: per mode, 4 plane taps (offsets inside one R x R channel
// slice) and 2 line taps (offsets inside one length-L channel row).
template <typename T>
struct VMTaps {
  int64_t plane_index[3][4];
  T plane_weight[3][4];
  int64_t line_index[3][2];
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
  // (plane's last axis, plane's first axis, line axis) per mode, as x=0, y=1, z=2
  const int last_axis[3] = {0, 0, 1};
  const int first_axis[3] = {1, 2, 2};
  const int line_axis[3] = {2, 1, 0};
  VMTaps<T> taps;
  for (int m = 0; m < 3; ++m) {
    const Lerp<T> u = lerp_weights<T>(pos_plane[last_axis[m]], v.plane_res);
    const Lerp<T> w = lerp_weights<T>(pos_plane[first_axis[m]], v.plane_res);
    const int64_t ui[2] = {u.i0, u.i1}, wi[2] = {w.i0, w.i1};
    const T uw[2] = {u.w0, u.w1}, ww[2] = {w.w0, w.w1};
    for (int j = 0; j < 4; ++j) {
      const int bu = j & 1, bw = j >> 1;
      const bool ok = ui[bu] >= 0 && wi[bw] >= 0;
      taps.plane_index[m][j] = ok ? wi[bw] * v.plane_res + ui[bu] : -1;
      taps.plane_weight[m][j] = ok ? uw[bu] * ww[bw] : T(0);
    }
    const Lerp<T> l = lerp_weights<T>(pos_line[line_axis[m]], v.line_res);
    taps.line_index[m][0] = l.i0;
    taps.line_index[m][1] = l.i1;
    taps.line_weight[m][0] = l.w0;
    taps.line_weight[m][1] = l.w1;
  }
  return taps;
}

template <typename T>
CTNERF_HD T vm_plane_value(const VMView<T>& v, const VMTaps<T>& taps, int m, int64_t c) {
  const T* plane = v.planes + (m * v.channels + c) * v.plane_res * v.plane_res;
  T s = T(0);
  for (int j = 0; j < 4; ++j)
    if (taps.plane_index[m][j] >= 0) s += taps.plane_weight[m][j] * plane[taps.plane_index[m][j]];
  return s;
}

template <typename T>
CTNERF_HD T vm_line_value(const VMView<T>& v, const VMTaps<T>& taps, int m, int64_t c) {
  const T* line = v.lines + (m * v.channels + c) * v.line_res;
  T s = T(0);
  for (int j = 0; j < 2; ++j)
    if (taps.line_index[m][j] >= 0) s += taps.line_weight[m][j] * line[taps.line_index[m][j]];
  return s;
}

// Decoder input: bias + sum over modes and channels of basis * plane * line.
template <typename T>
CTNERF_HD T vm_pre_activation(const VMView<T>& v, const VMTaps<T>& taps) {
  T pre = v.bias;
  for (int m = 0; m < 3; ++m)
    for (int64_t c = 0; c < v.channels; ++c)
      pre += v.basis[m * v.channels + c] * vm_plane_value(v, taps, m, c) * vm_line_value(v, taps, m, c);
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
CTNERF_HD T vm_ray_forward(const VMView<T>& v, const Ray<T>& r, int64_t n_samples, int64_t seed, int64_t ray) {
  const T dt = bin_length(r, n_samples);
  if (!(dt > T(0))) return T(0);
  T acc = T(0);
  for (int64_t k = 0; k < n_samples; ++k) {
    const T t = sample_distance(r, dt, seed, ray, k);
    const T p[3] = {r.o[0] + t * r.d[0], r.o[1] + t * r.d[1], r.o[2] + t * r.d[2]};
    acc += softplus(vm_pre_activation(v, vm_taps(v, p)));
  }
  return acc * dt;
}

// Gradients of one ray's output. Planes and lines are scattered with `add` (shared targets);
// basis and bias go to the caller's private accumulators: grad_basis[j * basis_stride] for
// j < 3C and *grad_bias, updated with plain +=.
template <typename T, typename Add>
CTNERF_HD void vm_ray_backward(const VMView<T>& v, const Ray<T>& r, int64_t n_samples, int64_t seed, int64_t ray,
                               T grad_out, T* grad_planes, T* grad_lines, T* grad_basis, int64_t basis_stride,
                               T* grad_bias, Add add) {
  const T dt = bin_length(r, n_samples);
  const T scale = grad_out * dt;
  if (!(dt > T(0)) || scale == T(0)) return;
  const int64_t plane_size = v.plane_res * v.plane_res;
  for (int64_t k = 0; k < n_samples; ++k) {
    const T t = sample_distance(r, dt, seed, ray, k);
    const T p[3] = {r.o[0] + t * r.d[0], r.o[1] + t * r.d[1], r.o[2] + t * r.d[2]};
    const VMTaps<T> taps = vm_taps(v, p);
    const T g = scale * sigmoid(vm_pre_activation(v, taps));  // d out / d pre at this sample
    *grad_bias += g;
    for (int m = 0; m < 3; ++m) {
      for (int64_t c = 0; c < v.channels; ++c) {
        const int64_t mc = m * v.channels + c;
        const T pv = vm_plane_value(v, taps, m, c);
        const T lv = vm_line_value(v, taps, m, c);
        grad_basis[mc * basis_stride] += g * pv * lv;
        const T gb = g * v.basis[mc];
        const T gp = gb * lv, gl = gb * pv;
        if (gp != T(0)) {
          T* gplane = grad_planes + mc * plane_size;
          for (int j = 0; j < 4; ++j)
            if (taps.plane_index[m][j] >= 0) add(gplane + taps.plane_index[m][j], gp * taps.plane_weight[m][j]);
        }
        if (gl != T(0)) {
          T* gline = grad_lines + mc * v.line_res;
          for (int j = 0; j < 2; ++j)
            if (taps.line_index[m][j] >= 0) add(gline + taps.line_index[m][j], gl * taps.line_weight[m][j]);
        }
      }
    }
  }
}

}  // namespace ctnerf
