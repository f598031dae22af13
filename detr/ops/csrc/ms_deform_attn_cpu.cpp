// Multi-scale deformable attention on CPU: entry points, ISA selection, and the definition of the
// detr_ops operator library. The kernel bodies are in ms_deform_attn_cpu_kernels.h.
//
// Shapes (all contiguous after the entry points call .contiguous()):
//   value               [N, S, M, D]        channels of one head are contiguous: inner loops run over D
//   spatial_shapes      [L, 2] int64        (H_l, W_l)
//   level_start_index   [L] int64           offset of level l in S
//   sampling_locations  [N, Lq, M, L, P, 2] (x, y) in [0, 1]
//   attention_weights   [N, Lq, M, L, P]
//   output              [N, Lq, M * D]
//
// Forward: parallel over (n, q, m) rows, heads fastest; per row the L*P points are planned in SIMD
// lanes (corner pixels and weights) and the corner rows are accumulated over D channels in a
// vectorizable loop. No [N, Lq, M, L, P, D] temporary ever exists.
//
// Backward: grad_value receives scattered contributions from every query, so the work is partitioned
// by what it writes: task (n, l, head group) owns grad_value[n, start_l : start_l + H_l * W_l, heads of
// the group, :] and the location/weight gradients of every point of those heads on level l of image n.
// Tasks write disjoint memory, need no atomics or per-thread copies, and sum in a fixed order
// (deterministic results, for any thread count and grouping).
//
// float16/bfloat16 accumulate in float32 (at::opmath_type); float64 in float64.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <tuple>
#include <vector>

#include "ms_deform_attn_checks.h"
#include "ms_deform_attn_cpu_kernels.h"
#include "ms_deform_attn_sampling.h"

namespace detr_ops {
namespace {

using cpu::backward_tasks;
using cpu::forward_rows;
using cpu::KernelArgs;

bool cpu_has_avx2_fma() {
#if DETR_X86_MULTIVERSION
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return has;
#else
  return false;
#endif
}

// The kernels index pixels of one image in int32 (SIMD lanes over points): pixel h * W + w of a corner
// up to one row past the last level must fit.
void check_keys_fit_int32(const at::Tensor& spatial_shapes, int64_t keys) {
  const auto shapes = spatial_shapes.accessor<int64_t, 2>();
  int64_t widest = 0;
  for (int64_t l = 0; l < spatial_shapes.size(0); ++l) widest = std::max(widest, shapes[l][1]);
  TORCH_CHECK(keys + 2 * widest + 2 < (int64_t(1) << 31), "ms_deform_attn (CPU): value has S = ", text(keys),
              " positions per image; the CPU kernel supports S + 2 * (widest level) below 2^31");
}

// at::parallel_for with dynamic scheduling: it starts one worker per thread (so torch.set_num_threads
// and the nested-parallelism rules apply) and each worker takes chunks of `chunk` items from a shared
// counter until none is left. at::parallel_for alone gives each thread one fixed share, and then the
// whole call waits for the thread whose core is busiest.
template <typename F>
void parallel_dynamic(int64_t total, int64_t chunk, const F& body) {
  const int64_t chunks = (total + chunk - 1) / chunk;
  std::atomic<int64_t> next{0};
  const int64_t workers = std::min<int64_t>(chunks, at::get_num_threads());
  at::parallel_for(0, workers, 1, [&](int64_t first_worker, int64_t last_worker) {
    for (int64_t worker = first_worker; worker < last_worker; ++worker) {
      for (int64_t c = next.fetch_add(1); c < chunks; c = next.fetch_add(1)) {
        body(c * chunk, std::min(total, (c + 1) * chunk));
      }
    }
  });
}

// One out-of-line copy per ISA of each kernel body.
template <typename scalar_t, typename coord_t, int kD>
void forward_rows_baseline(const KernelArgs<scalar_t, coord_t>& a, int64_t begin, int64_t end) {
  forward_rows<scalar_t, coord_t, kD>(a, begin, end);
}
template <typename scalar_t, typename coord_t, int kD>
void backward_tasks_baseline(const KernelArgs<scalar_t, coord_t>& a, int64_t group, int64_t begin, int64_t end) {
  backward_tasks<scalar_t, coord_t, kD>(a, group, begin, end);
}
#if DETR_X86_MULTIVERSION
template <typename scalar_t, typename coord_t, int kD>
DETR_TARGET_AVX2 void forward_rows_avx2(const KernelArgs<scalar_t, coord_t>& a, int64_t begin, int64_t end) {
  forward_rows<scalar_t, coord_t, kD>(a, begin, end);
}
template <typename scalar_t, typename coord_t, int kD>
DETR_TARGET_AVX2 void backward_tasks_avx2(const KernelArgs<scalar_t, coord_t>& a, int64_t group, int64_t begin,
                                          int64_t end) {
  backward_tasks<scalar_t, coord_t, kD>(a, group, begin, end);
}
#endif

template <typename scalar_t, typename coord_t, int kD>
void forward_kernel(const KernelArgs<scalar_t, coord_t>& a) {
  const MsdaSizes& s = a.s;
  auto rows = &forward_rows_baseline<scalar_t, coord_t, kD>;
#if DETR_X86_MULTIVERSION
  if (cpu_has_avx2_fma()) rows = &forward_rows_avx2<scalar_t, coord_t, kD>;
#endif
  // About 64k multiply-adds per chunk keeps the scheduling overhead negligible.
  const int64_t work_per_row = std::max<int64_t>(1, s.levels * s.points * 4 * s.channels);
  const int64_t grain = std::max<int64_t>(1, 65536 / work_per_row);
  parallel_dynamic(s.batch * s.heads * s.queries, grain, [&](int64_t begin, int64_t end) { rows(a, begin, end); });
}

template <typename scalar_t, typename coord_t, int kD>
void backward_kernel(const KernelArgs<scalar_t, coord_t>& a) {
  const MsdaSizes& s = a.s;
  auto tasks = &backward_tasks_baseline<scalar_t, coord_t, kD>;
#if DETR_X86_MULTIVERSION
  if (cpu_has_avx2_fma()) tasks = &backward_tasks_avx2<scalar_t, coord_t, kD>;
#endif
  // Heads per task: all M while there are at least two tasks per thread, else the largest divisor of M
  // that gives that many (the results do not depend on it, see backward_tasks).
  const int64_t threads = at::get_num_threads();
  int64_t group = s.heads;
  while (group > 1 && s.batch * s.levels * (s.heads / group) < 2 * threads) {
    int64_t smaller = group - 1;
    while (s.heads % smaller != 0) --smaller;
    group = smaller;
  }
  parallel_dynamic(s.batch * s.levels * (s.heads / group), 1,
                   [&](int64_t begin, int64_t end) { tasks(a, group, begin, end); });
}

// Runs `body<kD>()` with kD = the channel count for the usual head widths, else kD = 0 (runtime width).
#define DETR_DISPATCH_CHANNELS(CHANNELS, ...)  \
  [&] {                                        \
    switch (CHANNELS) {                        \
      case 32: {                               \
        constexpr int kD = 32;                 \
        return __VA_ARGS__();                  \
      }                                        \
      case 64: {                               \
        constexpr int kD = 64;                 \
        return __VA_ARGS__();                  \
      }                                        \
      default: {                               \
        constexpr int kD = 0;                  \
        return __VA_ARGS__();                  \
      }                                        \
    }                                          \
  }()

at::Tensor ms_deform_attn_cpu(const at::Tensor& value_in, const at::Tensor& spatial_shapes_in,
                              const at::Tensor& level_start_index_in, const at::Tensor& sampling_locations_in,
                              const at::Tensor& attention_weights_in) {
  const MsdaSizes s = check_inputs(value_in, spatial_shapes_in, level_start_index_in, sampling_locations_in,
                                   attention_weights_in);
  const at::Tensor value = value_in.contiguous();
  const at::Tensor spatial_shapes = spatial_shapes_in.contiguous();
  const at::Tensor level_start_index = level_start_index_in.contiguous();
  const at::Tensor locations = sampling_locations_in.contiguous();
  const at::Tensor weights = attention_weights_in.contiguous();
  check_levels_on_host(spatial_shapes, level_start_index, s.keys);
  check_keys_fit_int32(spatial_shapes, s.keys);

  // Every element is written by the kernel.
  at::Tensor out = at::empty({s.batch, s.queries, s.heads * s.channels}, value.options());
  if (out.numel() == 0) return out;
  DETR_DISPATCH_VALUE_AND_COORD(value.scalar_type(), locations.scalar_type(), "ms_deform_attn_cpu", [&] {
    DETR_DISPATCH_CHANNELS(s.channels, [&] {
      KernelArgs<scalar_t, coord_t> args{};
      args.value = value.const_data_ptr<scalar_t>();
      args.shapes = spatial_shapes.const_data_ptr<int64_t>();
      args.starts = level_start_index.const_data_ptr<int64_t>();
      args.locations = locations.const_data_ptr<coord_t>();
      args.weights = weights.const_data_ptr<coord_t>();
      args.out = out.mutable_data_ptr<scalar_t>();
      args.s = s;
      forward_kernel<scalar_t, coord_t, kD>(args);
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_deform_attn_backward_cpu(
    const at::Tensor& value_in, const at::Tensor& spatial_shapes_in, const at::Tensor& level_start_index_in,
    const at::Tensor& sampling_locations_in, const at::Tensor& attention_weights_in,
    const at::Tensor& grad_output_in) {
  const MsdaSizes s = check_inputs(value_in, spatial_shapes_in, level_start_index_in, sampling_locations_in,
                                   attention_weights_in);
  check_grad_output(grad_output_in, value_in, s);
  const at::Tensor value = value_in.contiguous();
  const at::Tensor spatial_shapes = spatial_shapes_in.contiguous();
  const at::Tensor level_start_index = level_start_index_in.contiguous();
  const at::Tensor locations = sampling_locations_in.contiguous();
  const at::Tensor weights = attention_weights_in.contiguous();
  const at::Tensor grad_output = grad_output_in.contiguous();
  check_levels_on_host(spatial_shapes, level_start_index, s.keys);
  check_keys_fit_int32(spatial_shapes, s.keys);

  // float16/bfloat16 gradients are summed in a float32 buffer and rounded once at the end.
  const bool reduced = is_reduced_float(value.scalar_type());
  at::Tensor grad_value_acc = at::zeros(value.sizes(), value.options().dtype(reduced ? at::kFloat : value.scalar_type()));
  // The kernel writes every location and attention-weight gradient (zeros for points outside every map),
  // so those start uninitialized; only when it does not run (no channels) are they zero.
  const bool runs = s.batch * s.queries * s.heads * s.channels > 0 && s.levels * s.points > 0;
  at::Tensor grad_locations = runs ? at::empty_like(locations) : at::zeros_like(locations);
  at::Tensor grad_weights = runs ? at::empty_like(weights) : at::zeros_like(weights);
  if (runs) {
    DETR_DISPATCH_VALUE_AND_COORD(value.scalar_type(), locations.scalar_type(), "ms_deform_attn_backward_cpu", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      DETR_DISPATCH_CHANNELS(s.channels, [&] {
        KernelArgs<scalar_t, coord_t> args{};
        args.value = value.const_data_ptr<scalar_t>();
        args.shapes = spatial_shapes.const_data_ptr<int64_t>();
        args.starts = level_start_index.const_data_ptr<int64_t>();
        args.locations = locations.const_data_ptr<coord_t>();
        args.weights = weights.const_data_ptr<coord_t>();
        args.grad_output = grad_output.const_data_ptr<scalar_t>();
        args.grad_value = grad_value_acc.mutable_data_ptr<acc_t>();
        args.grad_locations = grad_locations.mutable_data_ptr<coord_t>();
        args.grad_weights = grad_weights.mutable_data_ptr<coord_t>();
        args.s = s;
        backward_kernel<scalar_t, coord_t, kD>(args);
      });
    });
  }
  at::Tensor grad_value = reduced ? grad_value_acc.to(value.scalar_type()) : grad_value_acc;
  return {grad_value, grad_locations, grad_weights};
}

}  // namespace

TORCH_LIBRARY(detr_ops, m) {
  // The fake (meta) kernels and the autograd formula are registered from this Python module.
  m.set_python_module("detr.ops.registration");
  m.def(
      "ms_deform_attn(Tensor value, Tensor spatial_shapes, Tensor level_start_index, "
      "Tensor sampling_locations, Tensor attention_weights) -> Tensor");
  m.def(
      "ms_deform_attn_backward(Tensor value, Tensor spatial_shapes, Tensor level_start_index, "
      "Tensor sampling_locations, Tensor attention_weights, Tensor grad_output) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(detr_ops, CPU, m) {
  m.impl("ms_deform_attn", &ms_deform_attn_cpu);
  m.impl("ms_deform_attn_backward", &ms_deform_attn_backward_cpu);
}

}  // namespace detr_ops
