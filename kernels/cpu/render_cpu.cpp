// CPU build of the fused renderer: the per-ray math of ctnerf_render.h, parallel over rays with
// ATen's parallel_for (OpenMP in torch's CPU builds; it follows torch.set_num_threads and uses
// torch's own OpenMP runtime, so no second runtime is linked in).
//
// Gradients are scattered either into one buffer per thread, summed at the end, or with atomic
// adds into a single buffer (ReduceMode); per-thread buffers win when they fit (see
// benchmarks/bench_kernels.py), atomics bound the memory for very large grids.
#include <ATen/Parallel.h>

#include <atomic>

#include "ctnerf_ops.h"
#include "ctnerf_render.h"

namespace ctnerf {
namespace {

// Rays per parallel_for chunk: each ray is hundreds of samples, so small chunks balance well.
constexpr int64_t kRayGrain = 16;

struct AtomicAdd {
  template <typename T>
  void operator()(T* target, T value) const {
    std::atomic_ref<T>(*target).fetch_add(value, std::memory_order_relaxed);
  }
};

bool use_buffers(int64_t reduce_mode, int64_t numel, int64_t elem_size) {
  TORCH_CHECK(reduce_mode >= 0 && reduce_mode <= 2, "ctnerf: reduce_mode must be 0 (auto), 1 (buffers) or 2 ",
              "(atomics), got ", reduce_mode);
  if (reduce_mode == static_cast<int64_t>(ReduceMode::kBuffers)) return true;
  if (reduce_mode == static_cast<int64_t>(ReduceMode::kAtomics)) return false;
  return at::get_num_threads() * numel * elem_size <= kBufferBudgetBytes;
}

struct RayInputs {
  at::Tensor origins, dirs, t_near, t_far;
  RayInputs(const at::Tensor& o, const at::Tensor& d, const at::Tensor& tn, const at::Tensor& tf)
      : origins(o.contiguous()), dirs(d.contiguous()), t_near(tn.contiguous()), t_far(tf.contiguous()) {}
  template <typename T>
  Ray<T> ray(int64_t i) const {
    return load_ray(origins.const_data_ptr<T>(), dirs.const_data_ptr<T>(), t_near.const_data_ptr<T>(),
                    t_far.const_data_ptr<T>(), i);
  }
};

// A grid integral's forward, whichever rule: out[i] = per_ray(grid view, ray i, i), rays in parallel.
template <typename PerRay>
at::Tensor grid_forward_by_rays(const at::Tensor& volume, const at::Tensor& origin_xyz, const at::Tensor& spacing_xyz,
                                const RayInputs& rays, int64_t n, const PerRay& per_ray) {
  const at::Tensor vol = volume.contiguous(), org = origin_xyz.contiguous(), spc = spacing_xyz.contiguous();
  at::Tensor out = at::empty({n}, volume.options());
  AT_DISPATCH_FLOATING_TYPES(volume.scalar_type(), "grid_forward_by_rays", [&] {
    const GridView<scalar_t> g =
        make_grid_view(vol.const_data_ptr<scalar_t>(), vol.size(0), vol.size(1), vol.size(2),
                       org.const_data_ptr<scalar_t>(), spc.const_data_ptr<scalar_t>());
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, n, kRayGrain, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) o[i] = per_ray(g, rays.ray<scalar_t>(i), i);
    });
  });
  return out;
}

// A grid integral's gradient to the volume, whichever rule: per_ray(grid view, ray i, i, grad_out[i],
// target, add) scatters ray i's share, into one buffer per thread (summed at the end) or with atomics
// into one (use_buffers). The gradient does not depend on the volume's values, only on its shape.
template <typename PerRay>
at::Tensor grid_backward_by_rays(const at::Tensor& grad_out, const at::Tensor& volume, const at::Tensor& origin_xyz,
                                 const at::Tensor& spacing_xyz, const RayInputs& rays, int64_t n, int64_t reduce_mode,
                                 const PerRay& per_ray) {
  const at::Tensor gout = grad_out.contiguous(), org = origin_xyz.contiguous(), spc = spacing_xyz.contiguous();
  const int64_t numel = volume.numel();
  const bool buffers = use_buffers(reduce_mode, numel, volume.element_size());
  const int64_t n_buf = buffers ? at::get_num_threads() : 1;
  at::Tensor grad = at::zeros({n_buf, volume.size(0), volume.size(1), volume.size(2)}, volume.options());
  AT_DISPATCH_FLOATING_TYPES(volume.scalar_type(), "grid_backward_by_rays", [&] {
    const GridView<scalar_t> g = make_grid_view<scalar_t>(nullptr, volume.size(0), volume.size(1), volume.size(2),
                                                          org.const_data_ptr<scalar_t>(),
                                                          spc.const_data_ptr<scalar_t>());
    const scalar_t* go = gout.const_data_ptr<scalar_t>();
    scalar_t* base = grad.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, n, kRayGrain, [&](int64_t begin, int64_t end) {
      if (buffers) {
        scalar_t* mine = base + static_cast<int64_t>(at::get_thread_num()) * numel;
        for (int64_t i = begin; i < end; ++i) per_ray(g, rays.ray<scalar_t>(i), i, go[i], mine, PlainAdd{});
      } else {
        for (int64_t i = begin; i < end; ++i) per_ray(g, rays.ray<scalar_t>(i), i, go[i], base, AtomicAdd{});
      }
    });
  });
  return n_buf == 1 ? grad[0] : grad.sum(0);
}

}  // namespace

at::Tensor grid_line_integrals_cpu(const at::Tensor& volume, const at::Tensor& origin_xyz,
                                   const at::Tensor& spacing_xyz, const at::Tensor& origins, const at::Tensor& dirs,
                                   const at::Tensor& t_near, const at::Tensor& t_far, int64_t n_samples,
                                   int64_t jitter_seed) {
  check_grid_inputs(volume, origin_xyz, spacing_xyz, origins, dirs, t_near, t_far, n_samples);
  TORCH_CHECK(volume.device().is_cpu(), "ctnerf: grid_line_integrals_cpu got a ", volume.device(), " tensor");
  return grid_forward_by_rays(volume, origin_xyz, spacing_xyz, RayInputs(origins, dirs, t_near, t_far), origins.size(0),
                              [&](const auto& g, const auto& ray, int64_t i) {
                                return grid_ray_forward(g, ray, n_samples, jitter_seed, i);
                              });
}

at::Tensor grid_line_integrals_backward_cpu(const at::Tensor& grad_out, const at::Tensor& volume,
                                            const at::Tensor& origin_xyz, const at::Tensor& spacing_xyz,
                                            const at::Tensor& origins, const at::Tensor& dirs,
                                            const at::Tensor& t_near, const at::Tensor& t_far, int64_t n_samples,
                                            int64_t jitter_seed, int64_t reduce_mode) {
  check_grid_inputs(volume, origin_xyz, spacing_xyz, origins, dirs, t_near, t_far, n_samples);
  const int64_t n = origins.size(0);
  check_grad_out(volume, grad_out, n);
  return grid_backward_by_rays(
      grad_out, volume, origin_xyz, spacing_xyz, RayInputs(origins, dirs, t_near, t_far), n, reduce_mode,
      [&](const auto& g, const auto& ray, int64_t i, auto go, auto* target, auto add) {
        grid_ray_backward(g, ray, n_samples, jitter_seed, i, go, target, add);
      });
}

at::Tensor joseph_line_integrals_cpu(const at::Tensor& volume, const at::Tensor& origin_xyz,
                                     const at::Tensor& spacing_xyz, const at::Tensor& origins, const at::Tensor& dirs,
                                     const at::Tensor& t_near, const at::Tensor& t_far) {
  check_grid_inputs(volume, origin_xyz, spacing_xyz, origins, dirs, t_near, t_far, 1);
  TORCH_CHECK(volume.device().is_cpu(), "ctnerf: joseph_line_integrals_cpu got a ", volume.device(), " tensor");
  return grid_forward_by_rays(volume, origin_xyz, spacing_xyz, RayInputs(origins, dirs, t_near, t_far), origins.size(0),
                              [](const auto& g, const auto& ray, int64_t) { return joseph_ray_forward(g, ray); });
}

at::Tensor joseph_line_integrals_backward_cpu(const at::Tensor& grad_out, const at::Tensor& volume,
                                              const at::Tensor& origin_xyz, const at::Tensor& spacing_xyz,
                                              const at::Tensor& origins, const at::Tensor& dirs,
                                              const at::Tensor& t_near, const at::Tensor& t_far, int64_t reduce_mode) {
  check_grid_inputs(volume, origin_xyz, spacing_xyz, origins, dirs, t_near, t_far, 1);
  const int64_t n = origins.size(0);
  check_grad_out(volume, grad_out, n);
  return grid_backward_by_rays(
      grad_out, volume, origin_xyz, spacing_xyz, RayInputs(origins, dirs, t_near, t_far), n, reduce_mode,
      [](const auto& g, const auto& ray, int64_t, auto go, auto* target, auto add) {
        joseph_ray_backward(g, ray, go, target, add);
      });
}

at::Tensor tv_cpu(const at::Tensor& volume, double edge) {
  check_tv_inputs(volume, edge);
  TORCH_CHECK(volume.device().is_cpu(), "ctnerf: tv_cpu got a ", volume.device(), " tensor");
  const at::Tensor vol = volume.contiguous();
  const int64_t nz = vol.size(0), ny = vol.size(1), nx = vol.size(2);
  double total = 0.0;
  AT_DISPATCH_FLOATING_TYPES(vol.scalar_type(), "tv_cpu", [&] {
    const TVView<scalar_t> t =
        make_tv_view(vol.const_data_ptr<scalar_t>(), nz, ny, nx, static_cast<scalar_t>(edge));
    // rows of x in parallel, the rows' sums added in double: 10^7 float terms lose nothing that way
    total = at::parallel_reduce(
        0, nz * ny, 8, 0.0,
        [&](int64_t begin, int64_t end, double acc) {
          for (int64_t row = begin; row < end; ++row) acc += static_cast<double>(tv_row_value(t, row / ny, row % ny));
          return acc;
        },
        [](double a, double b) { return a + b; });
  });
  return at::scalar_tensor(total, vol.options());
}

at::Tensor tv_backward_cpu(const at::Tensor& grad_out, const at::Tensor& volume, double edge) {
  check_tv_inputs(volume, edge);
  TORCH_CHECK(grad_out.numel() == 1, "ctnerf: grad_out of tv must hold one value, got ", grad_out.sizes());
  const at::Tensor vol = volume.contiguous();
  const int64_t nz = vol.size(0), ny = vol.size(1), nx = vol.size(2);
  at::Tensor grad = at::empty_like(vol, at::MemoryFormat::Contiguous);
  AT_DISPATCH_FLOATING_TYPES(vol.scalar_type(), "tv_backward_cpu", [&] {
    const TVView<scalar_t> t =
        make_tv_view(vol.const_data_ptr<scalar_t>(), nz, ny, nx, static_cast<scalar_t>(edge));
    const scalar_t go = grad_out.item<scalar_t>();
    scalar_t* g = grad.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, nz * ny, 8, [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) tv_row_grad(t, row / ny, row % ny, go, g + row * nx);
    });
  });
  return grad;
}

at::Tensor vm_line_integrals_cpu(const at::Tensor& planes, const at::Tensor& lines, const at::Tensor& basis,
                                 const at::Tensor& bias, const at::Tensor& box_min, const at::Tensor& box_max,
                                 const at::Tensor& origins, const at::Tensor& dirs, const at::Tensor& t_near,
                                 const at::Tensor& t_far, int64_t n_samples, int64_t jitter_seed) {
  check_vm_inputs(planes, lines, basis, bias, box_min, box_max, origins, dirs, t_near, t_far, n_samples);
  TORCH_CHECK(planes.device().is_cpu(), "ctnerf: vm_line_integrals_cpu got a ", planes.device(), " tensor");
  // channels-last copies: the C values of one tap are contiguous (see VMView)
  const at::Tensor pl = planes.permute({0, 2, 3, 1}).contiguous(), li = lines.permute({0, 2, 1}).contiguous();
  const at::Tensor ba = basis.contiguous(), bi = bias.contiguous();
  const at::Tensor lo = box_min.contiguous(), hi = box_max.contiguous();
  const RayInputs rays(origins, dirs, t_near, t_far);
  const int64_t n = origins.size(0);
  at::Tensor out = at::empty({n}, planes.options());
  AT_DISPATCH_FLOATING_TYPES(planes.scalar_type(), "vm_line_integrals_cpu", [&] {
    const VMView<scalar_t> v = make_vm_view(pl.const_data_ptr<scalar_t>(), li.const_data_ptr<scalar_t>(),
                                            ba.const_data_ptr<scalar_t>(), bi.const_data_ptr<scalar_t>(),
                                            planes.size(1), planes.size(2), lines.size(2), lo.const_data_ptr<scalar_t>(),
                                            hi.const_data_ptr<scalar_t>());
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, n, kRayGrain, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) o[i] = vm_ray_forward(v, rays.ray<scalar_t>(i), n_samples, jitter_seed, i);
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> vm_line_integrals_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& planes, const at::Tensor& lines, const at::Tensor& basis,
    const at::Tensor& bias, const at::Tensor& box_min, const at::Tensor& box_max, const at::Tensor& origins,
    const at::Tensor& dirs, const at::Tensor& t_near, const at::Tensor& t_far, int64_t n_samples,
    int64_t jitter_seed, int64_t reduce_mode) {
  check_vm_inputs(planes, lines, basis, bias, box_min, box_max, origins, dirs, t_near, t_far, n_samples);
  const int64_t n = origins.size(0);
  check_grad_out(planes, grad_out, n);
  const at::Tensor gout = grad_out.contiguous();
  // channels-last copies: the C values of one tap are contiguous (see VMView)
  const at::Tensor pl = planes.permute({0, 2, 3, 1}).contiguous(), li = lines.permute({0, 2, 1}).contiguous();
  const at::Tensor ba = basis.contiguous(), bi = bias.contiguous();
  const at::Tensor lo = box_min.contiguous(), hi = box_max.contiguous();
  const RayInputs rays(origins, dirs, t_near, t_far);
  const int64_t threads = at::get_num_threads();
  const int64_t factor_numel = planes.numel() + lines.numel();
  const bool buffers = use_buffers(reduce_mode, factor_numel, planes.element_size());
  const int64_t n_buf = buffers ? threads : 1;
  // planes and lines (channels-last) of one thread side by side in one row, so one buffer serves both
  at::Tensor gfactors = at::zeros({n_buf, factor_numel}, planes.options());
  // basis (3C) and bias (1) are always private per thread: few values, touched by every sample
  const int64_t n_dec = basis.numel() + 1;
  at::Tensor gdecoder = at::zeros({threads, n_dec}, planes.options());
  AT_DISPATCH_FLOATING_TYPES(planes.scalar_type(), "vm_line_integrals_backward_cpu", [&] {
    const VMView<scalar_t> v = make_vm_view(pl.const_data_ptr<scalar_t>(), li.const_data_ptr<scalar_t>(),
                                            ba.const_data_ptr<scalar_t>(), bi.const_data_ptr<scalar_t>(),
                                            planes.size(1), planes.size(2), lines.size(2), lo.const_data_ptr<scalar_t>(),
                                            hi.const_data_ptr<scalar_t>());
    const scalar_t* go = gout.const_data_ptr<scalar_t>();
    scalar_t* fbase = gfactors.mutable_data_ptr<scalar_t>();
    scalar_t* dbase = gdecoder.mutable_data_ptr<scalar_t>();
    const int64_t plane_numel = planes.numel();
    at::parallel_for(0, n, kRayGrain, [&](int64_t begin, int64_t end) {
      const int64_t tid = at::get_thread_num();
      scalar_t* dec = dbase + tid * n_dec;
      if (buffers) {
        scalar_t* gp = fbase + tid * factor_numel;
        for (int64_t i = begin; i < end; ++i)
          vm_ray_backward(v, rays.ray<scalar_t>(i), n_samples, jitter_seed, i, go[i], gp, gp + plane_numel, dec, 1,
                          dec + n_dec - 1, PlainAdd{});
      } else {
        for (int64_t i = begin; i < end; ++i)
          vm_ray_backward(v, rays.ray<scalar_t>(i), n_samples, jitter_seed, i, go[i], fbase, fbase + plane_numel,
                          dec, 1, dec + n_dec - 1, AtomicAdd{});
      }
    });
  });
  const at::Tensor factors = n_buf == 1 ? gfactors[0] : gfactors.sum(0);
  const at::Tensor decoder = gdecoder.sum(0);
  // back from channels-last to the inputs' (3, C, R, R) and (3, C, L)
  at::Tensor grad_planes = factors.narrow(0, 0, planes.numel())
                               .view({3, planes.size(2), planes.size(3), planes.size(1)})
                               .permute({0, 3, 1, 2})
                               .contiguous();
  at::Tensor grad_lines =
      factors.narrow(0, planes.numel(), lines.numel()).view({3, lines.size(2), lines.size(1)}).permute({0, 2, 1}).contiguous();
  at::Tensor grad_basis = decoder.narrow(0, 0, basis.numel()).clone();
  at::Tensor grad_bias = decoder.narrow(0, basis.numel(), 1).clone();
  return {grad_planes, grad_lines, grad_basis, grad_bias};
}

}  // namespace ctnerf
