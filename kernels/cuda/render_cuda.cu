// CUDA build of the fused renderer: the per-ray math of ctnerf_render.h, one thread per ray, on
// the current stream. Gradients to the volume, planes and lines are scattered with atomicAdd;
// basis and bias gradients go to one private column per ray (coalesced across a warp) and are
// summed afterwards, so the small, hot decoder gradients never contend.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "ctnerf_ops.h"
#include "ctnerf_render.h"

namespace ctnerf {
namespace {

constexpr int kThreads = 128;

struct AtomicAdd {
  template <typename T>
  __device__ __forceinline__ void operator()(T* target, T value) const {
    atomicAdd(target, value);
  }
};

inline unsigned int blocks_for(int64_t n) { return static_cast<unsigned int>((n + kThreads - 1) / kThreads); }

template <typename T>
__global__ void grid_forward_kernel(const T* __restrict__ volume, int64_t nz, int64_t ny, int64_t nx,
                                    const T* __restrict__ origin_xyz, const T* __restrict__ spacing_xyz,
                                    const T* __restrict__ origins, const T* __restrict__ dirs,
                                    const T* __restrict__ t_near, const T* __restrict__ t_far, int64_t n,
                                    int64_t n_samples, int64_t seed, T* __restrict__ out) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const GridView<T> g = make_grid_view(volume, nz, ny, nx, origin_xyz, spacing_xyz);
  out[i] = grid_ray_forward(g, load_ray(origins, dirs, t_near, t_far, i), n_samples, seed, i);
}

template <typename T>
__global__ void grid_backward_kernel(const T* __restrict__ grad_out, int64_t nz, int64_t ny, int64_t nx,
                                     const T* __restrict__ origin_xyz, const T* __restrict__ spacing_xyz,
                                     const T* __restrict__ origins, const T* __restrict__ dirs,
                                     const T* __restrict__ t_near, const T* __restrict__ t_far, int64_t n,
                                     int64_t n_samples, int64_t seed, T* __restrict__ grad_volume) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const GridView<T> g = make_grid_view<T>(nullptr, nz, ny, nx, origin_xyz, spacing_xyz);
  grid_ray_backward(g, load_ray(origins, dirs, t_near, t_far, i), n_samples, seed, i, grad_out[i], grad_volume,
                    AtomicAdd{});
}

template <typename T>
__global__ void joseph_forward_kernel(const T* __restrict__ volume, int64_t nz, int64_t ny, int64_t nx,
                                      const T* __restrict__ origin_xyz, const T* __restrict__ spacing_xyz,
                                      const T* __restrict__ origins, const T* __restrict__ dirs,
                                      const T* __restrict__ t_near, const T* __restrict__ t_far, int64_t n,
                                      T* __restrict__ out) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const GridView<T> g = make_grid_view(volume, nz, ny, nx, origin_xyz, spacing_xyz);
  out[i] = joseph_ray_forward(g, load_ray(origins, dirs, t_near, t_far, i));
}

template <typename T>
__global__ void joseph_backward_kernel(const T* __restrict__ grad_out, int64_t nz, int64_t ny, int64_t nx,
                                       const T* __restrict__ origin_xyz, const T* __restrict__ spacing_xyz,
                                       const T* __restrict__ origins, const T* __restrict__ dirs,
                                       const T* __restrict__ t_near, const T* __restrict__ t_far, int64_t n,
                                       T* __restrict__ grad_volume) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const GridView<T> g = make_grid_view<T>(nullptr, nz, ny, nx, origin_xyz, spacing_xyz);
  joseph_ray_backward(g, load_ray(origins, dirs, t_near, t_far, i), grad_out[i], grad_volume, AtomicAdd{});
}

template <typename T>
__global__ void tv_forward_kernel(const T* __restrict__ volume, int64_t nz, int64_t ny, int64_t nx, T edge,
                                  T* __restrict__ per_voxel) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= nz * ny * nx) return;
  const TVView<T> t = make_tv_view(volume, nz, ny, nx, edge);
  const int64_t coord[3] = {i % nx, (i / nx) % ny, i / (nx * ny)};
  per_voxel[i] = tv_voxel_value(t, i, coord);
}

template <typename T>
__global__ void tv_backward_kernel(const T* __restrict__ grad_out, const T* __restrict__ volume, int64_t nz,
                                   int64_t ny, int64_t nx, T edge, T* __restrict__ grad) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= nz * ny * nx) return;
  const TVView<T> t = make_tv_view(volume, nz, ny, nx, edge);
  const int64_t coord[3] = {i % nx, (i / nx) % ny, i / (nx * ny)};
  grad[i] = grad_out[0] * tv_voxel_grad(t, i, coord);
}

template <typename T>
__global__ void vm_forward_kernel(const T* __restrict__ planes, const T* __restrict__ lines,
                                  const T* __restrict__ basis, const T* __restrict__ bias, int64_t channels,
                                  int64_t plane_res, int64_t line_res, const T* __restrict__ box_min,
                                  const T* __restrict__ box_max, const T* __restrict__ origins,
                                  const T* __restrict__ dirs, const T* __restrict__ t_near,
                                  const T* __restrict__ t_far, int64_t n, int64_t n_samples, int64_t seed,
                                  T* __restrict__ out) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const VMView<T> v = make_vm_view(planes, lines, basis, bias, channels, plane_res, line_res, box_min, box_max);
  out[i] = vm_ray_forward(v, load_ray(origins, dirs, t_near, t_far, i), n_samples, seed, i);
}

// decoder_cols is (3C + 1, n): column i holds ray i's basis gradients and, last, its bias gradient.
template <typename T>
__global__ void vm_backward_kernel(const T* __restrict__ grad_out, const T* __restrict__ planes,
                                   const T* __restrict__ lines, const T* __restrict__ basis,
                                   const T* __restrict__ bias, int64_t channels, int64_t plane_res,
                                   int64_t line_res, const T* __restrict__ box_min, const T* __restrict__ box_max,
                                   const T* __restrict__ origins, const T* __restrict__ dirs,
                                   const T* __restrict__ t_near, const T* __restrict__ t_far, int64_t n,
                                   int64_t n_samples, int64_t seed, T* __restrict__ grad_planes,
                                   T* __restrict__ grad_lines, T* __restrict__ decoder_cols) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const VMView<T> v = make_vm_view(planes, lines, basis, bias, channels, plane_res, line_res, box_min, box_max);
  vm_ray_backward(v, load_ray(origins, dirs, t_near, t_far, i), n_samples, seed, i, grad_out[i], grad_planes,
                  grad_lines, decoder_cols + i, n, decoder_cols + 3 * channels * n + i, AtomicAdd{});
}

struct Rays {
  at::Tensor origins, dirs, t_near, t_far;
  Rays(const at::Tensor& o, const at::Tensor& d, const at::Tensor& tn, const at::Tensor& tf)
      : origins(o.contiguous()), dirs(d.contiguous()), t_near(tn.contiguous()), t_far(tf.contiguous()) {}
};

void check_cuda(const at::Tensor& t, const char* op) {
  TORCH_CHECK(t.device().is_cuda(), "ctnerf: ", op, " (CUDA build) got a ", t.device(), " tensor");
}

}  // namespace

at::Tensor grid_line_integrals_cuda(const at::Tensor& volume, const at::Tensor& origin_xyz,
                                    const at::Tensor& spacing_xyz, const at::Tensor& origins, const at::Tensor& dirs,
                                    const at::Tensor& t_near, const at::Tensor& t_far, int64_t n_samples,
                                    int64_t jitter_seed) {
  check_grid_inputs(volume, origin_xyz, spacing_xyz, origins, dirs, t_near, t_far, n_samples);
  check_cuda(volume, "grid_line_integrals");
  const c10::cuda::CUDAGuard guard(volume.device());
  const at::Tensor vol = volume.contiguous(), org = origin_xyz.contiguous(), spc = spacing_xyz.contiguous();
  const Rays r(origins, dirs, t_near, t_far);
  const int64_t n = origins.size(0);
  at::Tensor out = at::empty({n}, volume.options());
  if (n == 0) return out;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(volume.scalar_type(), "grid_line_integrals_cuda", [&] {
    grid_forward_kernel<scalar_t><<<blocks_for(n), kThreads, 0, stream>>>(
        vol.const_data_ptr<scalar_t>(), vol.size(0), vol.size(1), vol.size(2), org.const_data_ptr<scalar_t>(),
        spc.const_data_ptr<scalar_t>(), r.origins.const_data_ptr<scalar_t>(), r.dirs.const_data_ptr<scalar_t>(),
        r.t_near.const_data_ptr<scalar_t>(), r.t_far.const_data_ptr<scalar_t>(), n, n_samples, jitter_seed,
        out.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor grid_line_integrals_backward_cuda(const at::Tensor& grad_out, const at::Tensor& volume,
                                             const at::Tensor& origin_xyz, const at::Tensor& spacing_xyz,
                                             const at::Tensor& origins, const at::Tensor& dirs,
                                             const at::Tensor& t_near, const at::Tensor& t_far, int64_t n_samples,
                                             int64_t jitter_seed, int64_t /*reduce_mode: always atomics*/) {
  check_grid_inputs(volume, origin_xyz, spacing_xyz, origins, dirs, t_near, t_far, n_samples);
  check_cuda(volume, "grid_line_integrals_backward");
  const int64_t n = origins.size(0);
  check_grad_out(volume, grad_out, n);
  const c10::cuda::CUDAGuard guard(volume.device());
  const at::Tensor gout = grad_out.contiguous(), org = origin_xyz.contiguous(), spc = spacing_xyz.contiguous();
  const Rays r(origins, dirs, t_near, t_far);
  at::Tensor grad = at::zeros(volume.sizes(), volume.options());
  if (n == 0) return grad;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(volume.scalar_type(), "grid_line_integrals_backward_cuda", [&] {
    grid_backward_kernel<scalar_t><<<blocks_for(n), kThreads, 0, stream>>>(
        gout.const_data_ptr<scalar_t>(), volume.size(0), volume.size(1), volume.size(2),
        org.const_data_ptr<scalar_t>(), spc.const_data_ptr<scalar_t>(), r.origins.const_data_ptr<scalar_t>(),
        r.dirs.const_data_ptr<scalar_t>(), r.t_near.const_data_ptr<scalar_t>(), r.t_far.const_data_ptr<scalar_t>(),
        n, n_samples, jitter_seed, grad.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return grad;
}

at::Tensor joseph_line_integrals_cuda(const at::Tensor& volume, const at::Tensor& origin_xyz,
                                      const at::Tensor& spacing_xyz, const at::Tensor& origins, const at::Tensor& dirs,
                                      const at::Tensor& t_near, const at::Tensor& t_far) {
  check_grid_inputs(volume, origin_xyz, spacing_xyz, origins, dirs, t_near, t_far, 1);
  check_cuda(volume, "joseph_line_integrals");
  const c10::cuda::CUDAGuard guard(volume.device());
  const at::Tensor vol = volume.contiguous(), org = origin_xyz.contiguous(), spc = spacing_xyz.contiguous();
  const Rays r(origins, dirs, t_near, t_far);
  const int64_t n = origins.size(0);
  at::Tensor out = at::empty({n}, volume.options());
  if (n == 0) return out;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(volume.scalar_type(), "joseph_line_integrals_cuda", [&] {
    joseph_forward_kernel<scalar_t><<<blocks_for(n), kThreads, 0, stream>>>(
        vol.const_data_ptr<scalar_t>(), vol.size(0), vol.size(1), vol.size(2), org.const_data_ptr<scalar_t>(),
        spc.const_data_ptr<scalar_t>(), r.origins.const_data_ptr<scalar_t>(), r.dirs.const_data_ptr<scalar_t>(),
        r.t_near.const_data_ptr<scalar_t>(), r.t_far.const_data_ptr<scalar_t>(), n, out.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor joseph_line_integrals_backward_cuda(const at::Tensor& grad_out, const at::Tensor& volume,
                                               const at::Tensor& origin_xyz, const at::Tensor& spacing_xyz,
                                               const at::Tensor& origins, const at::Tensor& dirs,
                                               const at::Tensor& t_near, const at::Tensor& t_far,
                                               int64_t /*reduce_mode: always atomics*/) {
  check_grid_inputs(volume, origin_xyz, spacing_xyz, origins, dirs, t_near, t_far, 1);
  check_cuda(volume, "joseph_line_integrals_backward");
  const int64_t n = origins.size(0);
  check_grad_out(volume, grad_out, n);
  const c10::cuda::CUDAGuard guard(volume.device());
  const at::Tensor gout = grad_out.contiguous(), org = origin_xyz.contiguous(), spc = spacing_xyz.contiguous();
  const Rays r(origins, dirs, t_near, t_far);
  at::Tensor grad = at::zeros(volume.sizes(), volume.options());
  if (n == 0) return grad;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(volume.scalar_type(), "joseph_line_integrals_backward_cuda", [&] {
    joseph_backward_kernel<scalar_t><<<blocks_for(n), kThreads, 0, stream>>>(
        gout.const_data_ptr<scalar_t>(), volume.size(0), volume.size(1), volume.size(2),
        org.const_data_ptr<scalar_t>(), spc.const_data_ptr<scalar_t>(), r.origins.const_data_ptr<scalar_t>(),
        r.dirs.const_data_ptr<scalar_t>(), r.t_near.const_data_ptr<scalar_t>(), r.t_far.const_data_ptr<scalar_t>(),
        n, grad.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return grad;
}

at::Tensor tv_cuda(const at::Tensor& volume, double edge) {
  check_tv_inputs(volume, edge);
  check_cuda(volume, "tv");
  const c10::cuda::CUDAGuard guard(volume.device());
  const at::Tensor vol = volume.contiguous();
  const int64_t n = vol.numel();
  // per-voxel terms, then ATen's reduction (accumulated in float for float input, as torch's sum)
  at::Tensor per_voxel = at::empty_like(vol, at::MemoryFormat::Contiguous);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(vol.scalar_type(), "tv_cuda", [&] {
    tv_forward_kernel<scalar_t><<<blocks_for(n), kThreads, 0, stream>>>(
        vol.const_data_ptr<scalar_t>(), vol.size(0), vol.size(1), vol.size(2), static_cast<scalar_t>(edge),
        per_voxel.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return per_voxel.sum();
}

at::Tensor tv_backward_cuda(const at::Tensor& grad_out, const at::Tensor& volume, double edge) {
  check_tv_inputs(volume, edge);
  check_cuda(volume, "tv_backward");
  TORCH_CHECK(grad_out.numel() == 1, "ctnerf: grad_out of tv must hold one value, got ", grad_out.sizes());
  const c10::cuda::CUDAGuard guard(volume.device());
  const at::Tensor vol = volume.contiguous(), gout = grad_out.reshape({1}).contiguous();
  const int64_t n = vol.numel();
  at::Tensor grad = at::empty_like(vol, at::MemoryFormat::Contiguous);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(vol.scalar_type(), "tv_backward_cuda", [&] {
    tv_backward_kernel<scalar_t><<<blocks_for(n), kThreads, 0, stream>>>(
        gout.const_data_ptr<scalar_t>(), vol.const_data_ptr<scalar_t>(), vol.size(0), vol.size(1), vol.size(2),
        static_cast<scalar_t>(edge), grad.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return grad;
}

at::Tensor vm_line_integrals_cuda(const at::Tensor& planes, const at::Tensor& lines, const at::Tensor& basis,
                                  const at::Tensor& bias, const at::Tensor& box_min, const at::Tensor& box_max,
                                  const at::Tensor& origins, const at::Tensor& dirs, const at::Tensor& t_near,
                                  const at::Tensor& t_far, int64_t n_samples, int64_t jitter_seed) {
  check_vm_inputs(planes, lines, basis, bias, box_min, box_max, origins, dirs, t_near, t_far, n_samples);
  check_cuda(planes, "vm_line_integrals");
  const c10::cuda::CUDAGuard guard(planes.device());
  // channels-last copies: the C values of one tap are contiguous (see VMView)
  const at::Tensor pl = planes.permute({0, 2, 3, 1}).contiguous(), li = lines.permute({0, 2, 1}).contiguous();
  const at::Tensor ba = basis.contiguous(), bi = bias.contiguous();
  const at::Tensor lo = box_min.contiguous(), hi = box_max.contiguous();
  const Rays r(origins, dirs, t_near, t_far);
  const int64_t n = origins.size(0);
  at::Tensor out = at::empty({n}, planes.options());
  if (n == 0) return out;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(planes.scalar_type(), "vm_line_integrals_cuda", [&] {
    vm_forward_kernel<scalar_t><<<blocks_for(n), kThreads, 0, stream>>>(
        pl.const_data_ptr<scalar_t>(), li.const_data_ptr<scalar_t>(), ba.const_data_ptr<scalar_t>(),
        bi.const_data_ptr<scalar_t>(), planes.size(1), planes.size(2), lines.size(2), lo.const_data_ptr<scalar_t>(),
        hi.const_data_ptr<scalar_t>(), r.origins.const_data_ptr<scalar_t>(), r.dirs.const_data_ptr<scalar_t>(),
        r.t_near.const_data_ptr<scalar_t>(), r.t_far.const_data_ptr<scalar_t>(), n, n_samples, jitter_seed,
        out.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> vm_line_integrals_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& planes, const at::Tensor& lines, const at::Tensor& basis,
    const at::Tensor& bias, const at::Tensor& box_min, const at::Tensor& box_max, const at::Tensor& origins,
    const at::Tensor& dirs, const at::Tensor& t_near, const at::Tensor& t_far, int64_t n_samples,
    int64_t jitter_seed, int64_t /*reduce_mode: always atomics*/) {
  check_vm_inputs(planes, lines, basis, bias, box_min, box_max, origins, dirs, t_near, t_far, n_samples);
  check_cuda(planes, "vm_line_integrals_backward");
  const int64_t n = origins.size(0);
  check_grad_out(planes, grad_out, n);
  const c10::cuda::CUDAGuard guard(planes.device());
  const at::Tensor gout = grad_out.contiguous();
  // channels-last copies: the C values of one tap are contiguous (see VMView)
  const at::Tensor pl = planes.permute({0, 2, 3, 1}).contiguous(), li = lines.permute({0, 2, 1}).contiguous();
  const at::Tensor ba = basis.contiguous(), bi = bias.contiguous();
  const at::Tensor lo = box_min.contiguous(), hi = box_max.contiguous();
  const Rays r(origins, dirs, t_near, t_far);
  // channels-last like the factors the kernel reads; permuted back at the end
  at::Tensor grad_planes_cl = at::zeros(pl.sizes(), planes.options());
  at::Tensor grad_lines_cl = at::zeros(li.sizes(), planes.options());
  at::Tensor decoder_cols = at::zeros({basis.numel() + 1, n}, planes.options());
  if (n > 0) {
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES(planes.scalar_type(), "vm_line_integrals_backward_cuda", [&] {
      vm_backward_kernel<scalar_t><<<blocks_for(n), kThreads, 0, stream>>>(
          gout.const_data_ptr<scalar_t>(), pl.const_data_ptr<scalar_t>(), li.const_data_ptr<scalar_t>(),
          ba.const_data_ptr<scalar_t>(), bi.const_data_ptr<scalar_t>(), planes.size(1), planes.size(2), lines.size(2),
          lo.const_data_ptr<scalar_t>(), hi.const_data_ptr<scalar_t>(), r.origins.const_data_ptr<scalar_t>(),
          r.dirs.const_data_ptr<scalar_t>(), r.t_near.const_data_ptr<scalar_t>(), r.t_far.const_data_ptr<scalar_t>(),
          n, n_samples, jitter_seed, grad_planes_cl.mutable_data_ptr<scalar_t>(), grad_lines_cl.mutable_data_ptr<scalar_t>(),
          decoder_cols.mutable_data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  const at::Tensor decoder = decoder_cols.sum(1);
  at::Tensor grad_basis = decoder.narrow(0, 0, basis.numel()).clone();
  at::Tensor grad_bias = decoder.narrow(0, basis.numel(), 1).clone();
  return {grad_planes_cl.permute({0, 3, 1, 2}).contiguous(), grad_lines_cl.permute({0, 2, 1}).contiguous(), grad_basis,
          grad_bias};
}

}  // namespace ctnerf

TORCH_LIBRARY_IMPL(ctnerf, CUDA, m) {
  m.impl("grid_line_integrals", &ctnerf::grid_line_integrals_cuda);
  m.impl("grid_line_integrals_backward", &ctnerf::grid_line_integrals_backward_cuda);
  m.impl("joseph_line_integrals", &ctnerf::joseph_line_integrals_cuda);
  m.impl("joseph_line_integrals_backward", &ctnerf::joseph_line_integrals_backward_cuda);
  m.impl("tv", &ctnerf::tv_cuda);
  m.impl("tv_backward", &ctnerf::tv_backward_cuda);
  m.impl("vm_line_integrals", &ctnerf::vm_line_integrals_cuda);
  m.impl("vm_line_integrals_backward", &ctnerf::vm_line_integrals_backward_cuda);
}
