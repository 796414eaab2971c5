// Operator schemas of the fused renderer (namespace torch.ops.ctnerf) and their CPU kernels.
//
// The schemas are declared once here; each device registers its implementation for its dispatch
// key (CPU below, CUDA in cuda/render_cuda.cu), so choosing the implementation is the
// dispatcher's job. Autograd is wired in Python (CTNeRFReconLib/fused.py) around these ops.
#include <torch/library.h>

#include "ctnerf_ops.h"

TORCH_LIBRARY(ctnerf, m) {
  m.def(
      "grid_line_integrals(Tensor volume, Tensor origin_xyz, Tensor spacing_xyz, Tensor origins, Tensor dirs, "
      "Tensor t_near, Tensor t_far, int n_samples, int jitter_seed) -> Tensor");
  m.def(
      "grid_line_integrals_backward(Tensor grad_out, Tensor volume, Tensor origin_xyz, Tensor spacing_xyz, "
      "Tensor origins, Tensor dirs, Tensor t_near, Tensor t_far, int n_samples, int jitter_seed, "
      "int reduce_mode) -> Tensor");
  m.def(
      "joseph_line_integrals(Tensor volume, Tensor origin_xyz, Tensor spacing_xyz, Tensor origins, Tensor dirs, "
      "Tensor t_near, Tensor t_far) -> Tensor");
  m.def(
      "joseph_line_integrals_backward(Tensor grad_out, Tensor volume, Tensor origin_xyz, Tensor spacing_xyz, "
      "Tensor origins, Tensor dirs, Tensor t_near, Tensor t_far, int reduce_mode) -> Tensor");
  m.def("tv(Tensor volume, float edge) -> Tensor");
  m.def("tv_backward(Tensor grad_out, Tensor volume, float edge) -> Tensor");
  m.def(
      "vm_line_integrals(Tensor planes, Tensor lines, Tensor basis, Tensor bias, Tensor box_min, Tensor box_max, "
      "Tensor origins, Tensor dirs, Tensor t_near, Tensor t_far, int n_samples, int jitter_seed) -> Tensor");
  m.def(
      "vm_line_integrals_backward(Tensor grad_out, Tensor planes, Tensor lines, Tensor basis, Tensor bias, "
      "Tensor box_min, Tensor box_max, Tensor origins, Tensor dirs, Tensor t_near, Tensor t_far, int n_samples, "
      "int jitter_seed, int reduce_mode) -> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(ctnerf, CPU, m) {
  m.impl("grid_line_integrals", &ctnerf::grid_line_integrals_cpu);
  m.impl("grid_line_integrals_backward", &ctnerf::grid_line_integrals_backward_cpu);
  m.impl("joseph_line_integrals", &ctnerf::joseph_line_integrals_cpu);
  m.impl("joseph_line_integrals_backward", &ctnerf::joseph_line_integrals_backward_cpu);
  m.impl("tv", &ctnerf::tv_cpu);
  m.impl("tv_backward", &ctnerf::tv_backward_cpu);
  m.impl("vm_line_integrals", &ctnerf::vm_line_integrals_cpu);
  m.impl("vm_line_integrals_backward", &ctnerf::vm_line_integrals_backward_cpu);
}
