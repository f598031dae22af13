// Multi-scale deformable attention on CUDA: kernels of the detr_ops operators defined in
// ms_deform_attn_cpu.cpp. The design (thread mapping, vector loads, staging, reductions) is written
// down in README.md next to this file.
//
// Shapes: value [N, S, M, D], spatial_shapes [L, 2], level_start_index [L],
// sampling_locations [N, Lq, M, L, P, 2], attention_weights [N, Lq, M, L, P], output [N, Lq, M * D].
// A "row" is one (n, q, m) triple, row = (n * Lq + q) * M + m; rows are handled by groups of
// `group` threads, each thread owning chunks of VEC channels of the head.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
// Only c10/cuda headers: ATen/cuda/CUDAContext.h would also need the cuBLAS/cuSPARSE headers, which a
// minimal CUDA toolkit lacks.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <initializer_list>
#include <limits>
#include <tuple>

#include "ms_deform_attn_checks.h"
#include "ms_deform_attn_sampling.h"

namespace detr_ops {
namespace {

constexpr int kWarpSize = 32;
constexpr int kMaxThreads = 256;
constexpr size_t kDefaultSharedBytes = 48 * 1024;

// VEC consecutive channels moved as one 16-byte (or narrower) access.
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

template <typename T, int VEC>
__device__ __forceinline__ Pack<T, VEC> load_pack(const T* address) {
  return *reinterpret_cast<const Pack<T, VEC>*>(address);
}

// grad_value accumulation. On sm_90+ a float chunk of 4k channels goes out as vector atomics.
template <typename T, int VEC>
__device__ __forceinline__ void atomic_add_scalars(T* address, const T (&values)[VEC]) {
#pragma unroll
  for (int j = 0; j < VEC; ++j) atomicAdd(address + j, values[j]);
}

template <int VEC>
__device__ __forceinline__ void atomic_add_pack(float* address, const float (&values)[VEC]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  if constexpr (VEC % 4 == 0) {
#pragma unroll
    for (int j = 0; j < VEC; j += 4) {
      atomicAdd(reinterpret_cast<float4*>(address + j),
                make_float4(values[j], values[j + 1], values[j + 2], values[j + 3]));
    }
  } else {
    atomic_add_scalars<float, VEC>(address, values);
  }
#else
  atomic_add_scalars<float, VEC>(address, values);
#endif
}

template <int VEC>
__device__ __forceinline__ void atomic_add_pack(double* address, const double (&values)[VEC]) {
  atomic_add_scalars<double, VEC>(address, values);
}

// Shared memory of a block: the level table (H, W, start per level, int64) followed by each group's
// staged points, `per_point` acc_t values per point.
struct Geometry {
  int64_t chunks;  // channel chunks per head (D / VEC)
  int group;       // threads per row: a power of two <= 32, so a group never straddles warps
  int threads;     // per block, a multiple of 32
  unsigned int blocks;
  size_t shared_bytes;
};

Geometry make_geometry(const MsdaSizes& s, int vec, size_t acc_bytes, int per_point) {
  Geometry g{};
  g.chunks = s.channels / vec;
  g.group = 1;
  while (g.group < g.chunks && g.group < kWarpSize) g.group *= 2;
  const int64_t points_per_row = s.levels * s.points;
  const size_t table_bytes = static_cast<size_t>(3 * s.levels) * sizeof(int64_t);
  const size_t group_bytes = static_cast<size_t>(points_per_row) * per_point * acc_bytes;
  int groups_per_block = kMaxThreads / g.group;
  const int min_groups = kWarpSize / g.group;  // one full warp
  while (groups_per_block > min_groups && table_bytes + groups_per_block * group_bytes > kDefaultSharedBytes) {
    groups_per_block /= 2;  // both are powers of two: stays a whole number of warps
  }
  g.threads = groups_per_block * g.group;
  g.shared_bytes = table_bytes + groups_per_block * group_bytes;
  int device = 0;
  int optin_attribute = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&optin_attribute, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  const size_t optin = static_cast<size_t>(optin_attribute);
  TORCH_CHECK(g.shared_bytes <= optin, "ms_deform_attn (CUDA): L * P = ", text(points_per_row),
              " points per query and head need ", text(static_cast<int64_t>(g.shared_bytes)),
              " bytes of shared memory per block; this GPU has ", text(static_cast<int64_t>(optin)));
  const int64_t rows = s.batch * s.queries * s.heads;
  const int64_t blocks = (rows + groups_per_block - 1) / groups_per_block;
  TORCH_CHECK(blocks <= std::numeric_limits<int>::max(), "ms_deform_attn (CUDA): too many queries (", text(rows),
              " rows of (batch, query, head))");
  g.blocks = static_cast<unsigned int>(blocks);
  return g;
}

template <typename Kernel>
void allow_shared_bytes(Kernel kernel, size_t bytes) {
  if (bytes > kDefaultSharedBytes) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
  }
}

// Copies the level table into shared memory: table[3l .. 3l+2] = H_l, W_l, start_l.
__device__ __forceinline__ void stage_levels(int64_t* table, const int64_t* shapes, const int64_t* starts,
                                             int64_t levels) {
  for (int64_t l = threadIdx.x; l < levels; l += blockDim.x) {
    table[3 * l] = shapes[2 * l];
    table[3 * l + 1] = shapes[2 * l + 1];
    table[3 * l + 2] = starts[l];
  }
}

template <typename scalar_t, typename coord_t, int VEC>
__global__ void __launch_bounds__(kMaxThreads)
    forward_kernel(const scalar_t* __restrict__ value, const int64_t* __restrict__ shapes,
                   const int64_t* __restrict__ starts, const coord_t* __restrict__ locations,
                   const coord_t* __restrict__ weights, scalar_t* __restrict__ out, const MsdaSizes s,
                   const int64_t chunks, const int group) {
  using acc_t = at::opmath_type<scalar_t>;
  extern __shared__ __align__(16) unsigned char shared_raw[];
  int64_t* table = reinterpret_cast<int64_t*>(shared_raw);
  acc_t* staged = reinterpret_cast<acc_t*>(table + 3 * s.levels);

  const int64_t points_per_row = s.levels * s.points;
  const int lane = threadIdx.x % group;
  const int group_in_block = threadIdx.x / group;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * (blockDim.x / group) + group_in_block;
  const bool active = row < s.batch * s.queries * s.heads;

  // The row's locations and weights are read from global memory once, by the group's lanes together
  // (coalesced), and shared by every channel chunk: mine[3i .. 3i+2] = x, y, attention weight.
  stage_levels(table, shapes, starts, s.levels);
  acc_t* mine = staged + group_in_block * points_per_row * 3;
  if (active) {
    for (int64_t i = lane; i < points_per_row; i += group) {
      const int64_t point = row * points_per_row + i;
      mine[3 * i] = static_cast<acc_t>(locations[2 * point]);
      mine[3 * i + 1] = static_cast<acc_t>(locations[2 * point + 1]);
      mine[3 * i + 2] = static_cast<acc_t>(weights[point]);
    }
  }
  __syncthreads();
  if (!active) return;  // no block-wide synchronization follows

  const int64_t m = row % s.heads;
  const int64_t n = row / (s.queries * s.heads);
  const int64_t pixel_stride = s.heads * s.channels;
  const scalar_t* value_nm = value + n * s.keys * pixel_stride + m * s.channels;

  for (int64_t chunk = lane; chunk < chunks; chunk += group) {
    const int64_t channel = chunk * VEC;
    acc_t acc[VEC];
#pragma unroll
    for (int j = 0; j < VEC; ++j) acc[j] = acc_t(0);
    for (int64_t l = 0; l < s.levels; ++l) {
      const int64_t height = table[3 * l];
      const int64_t width = table[3 * l + 1];
      const scalar_t* level_value = value_nm + table[3 * l + 2] * pixel_stride + channel;
      for (int64_t p = 0; p < s.points; ++p) {
        const acc_t* point = mine + 3 * (l * s.points + p);
        BilinearCorners<acc_t> c;
        if (!bilinear_corners<acc_t>(point[0], point[1], height, width, c)) continue;
        const acc_t attention = point[2];
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          if (!c.valid[k]) continue;
          const Pack<scalar_t, VEC> v = load_pack<scalar_t, VEC>(level_value + c.pixel[k] * pixel_stride);
          const acc_t w = attention * c.weight[k];
#pragma unroll
          for (int j = 0; j < VEC; ++j) acc[j] += w * static_cast<acc_t>(v.v[j]);
        }
      }
    }
    Pack<scalar_t, VEC> result;
#pragma unroll
    for (int j = 0; j < VEC; ++j) result.v[j] = static_cast<scalar_t>(acc[j]);
    *reinterpret_cast<Pack<scalar_t, VEC>*>(out + row * s.channels + channel) = result;
  }
}

template <typename scalar_t, typename coord_t, int VEC>
__global__ void __launch_bounds__(kMaxThreads)
    backward_kernel(const scalar_t* __restrict__ value, const int64_t* __restrict__ shapes,
                    const int64_t* __restrict__ starts, const coord_t* __restrict__ locations,
                    const coord_t* __restrict__ weights, const scalar_t* __restrict__ grad_output,
                    at::opmath_type<scalar_t>* __restrict__ grad_value,  // [N, S, M, D], zeroed
                    coord_t* __restrict__ grad_locations, coord_t* __restrict__ grad_weights, const MsdaSizes s,
                    const int64_t chunks, const int group) {
  using acc_t = at::opmath_type<scalar_t>;
  extern __shared__ __align__(16) unsigned char shared_raw[];
  int64_t* table = reinterpret_cast<int64_t*>(shared_raw);
  acc_t* staged = reinterpret_cast<acc_t*>(table + 3 * s.levels);

  const int64_t points_per_row = s.levels * s.points;
  const int lane = threadIdx.x % group;
  const int group_in_block = threadIdx.x / group;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * (blockDim.x / group) + group_in_block;
  const bool active = row < s.batch * s.queries * s.heads;

  // mine[6i .. 6i+5] = x, y, attention weight, then the point's gradients (attention, x, y), summed
  // over channel chunks by lane 0. Rows past the end stage points far outside every map.
  stage_levels(table, shapes, starts, s.levels);
  acc_t* mine = staged + group_in_block * points_per_row * 6;
  for (int64_t i = lane; i < points_per_row; i += group) {
    const int64_t point = row * points_per_row + i;
    mine[6 * i] = active ? static_cast<acc_t>(locations[2 * point]) : acc_t(-2);
    mine[6 * i + 1] = active ? static_cast<acc_t>(locations[2 * point + 1]) : acc_t(-2);
    mine[6 * i + 2] = active ? static_cast<acc_t>(weights[point]) : acc_t(0);
    mine[6 * i + 3] = acc_t(0);
    mine[6 * i + 4] = acc_t(0);
    mine[6 * i + 5] = acc_t(0);
  }
  __syncthreads();
  // From here on no thread leaves early: all 32 lanes of a warp must reach every shuffle.

  const int64_t m = active ? row % s.heads : 0;
  const int64_t n = active ? row / (s.queries * s.heads) : 0;
  const int64_t pixel_stride = s.heads * s.channels;
  const int64_t nm_offset = n * s.keys * pixel_stride + m * s.channels;
  const scalar_t* value_nm = value + nm_offset;
  acc_t* grad_nm = grad_value + nm_offset;
  const int64_t rounds = (chunks + group - 1) / group;  // the same for every thread of the launch

  for (int64_t r = 0; r < rounds; ++r) {
    const int64_t chunk = r * group + lane;
    const bool has_chunk = active && chunk < chunks;
    const int64_t channel = has_chunk ? chunk * VEC : 0;
    acc_t g[VEC];
    if (has_chunk) {
      const Pack<scalar_t, VEC> go = load_pack<scalar_t, VEC>(grad_output + row * s.channels + channel);
#pragma unroll
      for (int j = 0; j < VEC; ++j) g[j] = static_cast<acc_t>(go.v[j]);
    } else {
#pragma unroll
      for (int j = 0; j < VEC; ++j) g[j] = acc_t(0);
    }

    for (int64_t l = 0; l < s.levels; ++l) {
      const int64_t height = table[3 * l];
      const int64_t width = table[3 * l + 1];
      const int64_t level_offset = table[3 * l + 2] * pixel_stride + channel;
      for (int64_t p = 0; p < s.points; ++p) {
        acc_t* point = mine + 6 * (l * s.points + p);
        BilinearCorners<acc_t> c;
        const bool inside = bilinear_corners<acc_t>(point[0], point[1], height, width, c);
        const acc_t attention = point[2];
        PointGrads<acc_t> pg{acc_t(0), acc_t(0), acc_t(0)};
        if (inside) {
          acc_t dot[4] = {acc_t(0), acc_t(0), acc_t(0), acc_t(0)};
          if (has_chunk) {
#pragma unroll
            for (int k = 0; k < 4; ++k) {
              if (!c.valid[k]) continue;
              const int64_t offset = level_offset + c.pixel[k] * pixel_stride;
              const Pack<scalar_t, VEC> v = load_pack<scalar_t, VEC>(value_nm + offset);
              const acc_t w = attention * c.weight[k];
              acc_t contribution[VEC];
#pragma unroll
              for (int j = 0; j < VEC; ++j) {
                dot[k] += g[j] * static_cast<acc_t>(v.v[j]);
                contribution[j] = w * g[j];
              }
              atomic_add_pack<VEC>(grad_nm + offset, contribution);
            }
          }
          pg = point_grads<acc_t>(c, dot, attention, height, width);
        }
        // Sum the partial gradients of the group's channel chunks with shuffles (no atomics).
        for (int offset = group / 2; offset > 0; offset /= 2) {
          pg.attention += __shfl_xor_sync(0xffffffffu, pg.attention, offset, group);
          pg.x += __shfl_xor_sync(0xffffffffu, pg.x, offset, group);
          pg.y += __shfl_xor_sync(0xffffffffu, pg.y, offset, group);
        }
        if (lane == 0 && inside) {
          point[3] += pg.attention;
          point[4] += pg.x;
          point[5] += pg.y;
        }
      }
    }
  }
  __syncwarp();  // lane 0's sums -> the whole group

  if (active) {
    for (int64_t i = lane; i < points_per_row; i += group) {
      const int64_t point = row * points_per_row + i;
      grad_weights[point] = static_cast<coord_t>(mine[6 * i + 3]);
      grad_locations[2 * point] = static_cast<coord_t>(mine[6 * i + 4]);
      grad_locations[2 * point + 1] = static_cast<coord_t>(mine[6 * i + 5]);
    }
  }
}

// 16-byte vectors when the channel count and the pointers allow it, else one channel at a time.
int vector_width(const MsdaSizes& s, size_t element_bytes, std::initializer_list<const void*> pointers) {
  const int wide = static_cast<int>(16 / element_bytes);
  if (s.channels % wide != 0) return 1;
  for (const void* pointer : pointers) {
    if (reinterpret_cast<uintptr_t>(pointer) % 16 != 0) return 1;
  }
  return wide;
}

template <typename scalar_t, typename coord_t, int VEC>
void launch_forward(const at::Tensor& value, const at::Tensor& shapes, const at::Tensor& starts,
                    const at::Tensor& locations, const at::Tensor& weights, at::Tensor& out, const MsdaSizes& s) {
  using acc_t = at::opmath_type<scalar_t>;
  const Geometry g = make_geometry(s, VEC, sizeof(acc_t), 3);
  auto kernel = forward_kernel<scalar_t, coord_t, VEC>;
  allow_shared_bytes(kernel, g.shared_bytes);
  kernel<<<g.blocks, g.threads, g.shared_bytes, c10::cuda::getCurrentCUDAStream()>>>(
      value.const_data_ptr<scalar_t>(), shapes.const_data_ptr<int64_t>(), starts.const_data_ptr<int64_t>(),
      locations.const_data_ptr<coord_t>(), weights.const_data_ptr<coord_t>(), out.mutable_data_ptr<scalar_t>(), s,
      g.chunks, g.group);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t, typename coord_t, int VEC>
void launch_backward(const at::Tensor& value, const at::Tensor& shapes, const at::Tensor& starts,
                     const at::Tensor& locations, const at::Tensor& weights, const at::Tensor& grad_output,
                     at::Tensor& grad_value_acc, at::Tensor& grad_locations, at::Tensor& grad_weights,
                     const MsdaSizes& s) {
  using acc_t = at::opmath_type<scalar_t>;
  const Geometry g = make_geometry(s, VEC, sizeof(acc_t), 6);
  auto kernel = backward_kernel<scalar_t, coord_t, VEC>;
  allow_shared_bytes(kernel, g.shared_bytes);
  kernel<<<g.blocks, g.threads, g.shared_bytes, c10::cuda::getCurrentCUDAStream()>>>(
      value.const_data_ptr<scalar_t>(), shapes.const_data_ptr<int64_t>(), starts.const_data_ptr<int64_t>(),
      locations.const_data_ptr<coord_t>(), weights.const_data_ptr<coord_t>(), grad_output.const_data_ptr<scalar_t>(),
      grad_value_acc.mutable_data_ptr<acc_t>(), grad_locations.mutable_data_ptr<coord_t>(),
      grad_weights.mutable_data_ptr<coord_t>(), s, g.chunks, g.group);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor ms_deform_attn_cuda(const at::Tensor& value_in, const at::Tensor& spatial_shapes_in,
                               const at::Tensor& level_start_index_in, const at::Tensor& sampling_locations_in,
                               const at::Tensor& attention_weights_in) {
  const MsdaSizes s = check_inputs(value_in, spatial_shapes_in, level_start_index_in, sampling_locations_in,
                                   attention_weights_in);
  const c10::cuda::CUDAGuard guard(value_in.device());
  const at::Tensor value = value_in.contiguous();
  const at::Tensor shapes = spatial_shapes_in.contiguous();
  const at::Tensor starts = level_start_index_in.contiguous();
  const at::Tensor locations = sampling_locations_in.contiguous();
  const at::Tensor weights = attention_weights_in.contiguous();

  at::Tensor out = at::empty({s.batch, s.queries, s.heads * s.channels}, value.options());  // fully written
  if (out.numel() == 0) return out;
  DETR_DISPATCH_VALUE_AND_COORD(value.scalar_type(), locations.scalar_type(), "ms_deform_attn_cuda", [&] {
    constexpr int kWide = static_cast<int>(16 / sizeof(scalar_t));
    if (vector_width(s, sizeof(scalar_t), {value.const_data_ptr(), out.const_data_ptr()}) == kWide) {
      launch_forward<scalar_t, coord_t, kWide>(value, shapes, starts, locations, weights, out, s);
    } else {
      launch_forward<scalar_t, coord_t, 1>(value, shapes, starts, locations, weights, out, s);
    }
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_deform_attn_backward_cuda(
    const at::Tensor& value_in, const at::Tensor& spatial_shapes_in, const at::Tensor& level_start_index_in,
    const at::Tensor& sampling_locations_in, const at::Tensor& attention_weights_in,
    const at::Tensor& grad_output_in) {
  const MsdaSizes s = check_inputs(value_in, spatial_shapes_in, level_start_index_in, sampling_locations_in,
                                   attention_weights_in);
  check_grad_output(grad_output_in, value_in, s);
  const c10::cuda::CUDAGuard guard(value_in.device());
  const at::Tensor value = value_in.contiguous();
  const at::Tensor shapes = spatial_shapes_in.contiguous();
  const at::Tensor starts = level_start_index_in.contiguous();
  const at::Tensor locations = sampling_locations_in.contiguous();
  const at::Tensor weights = attention_weights_in.contiguous();
  const at::Tensor grad_output = grad_output_in.contiguous();

  // float16/bfloat16 gradients are summed in float32 (atomics included) and rounded once at the end.
  const bool reduced = is_reduced_float(value.scalar_type());
  at::Tensor grad_value_acc =
      at::zeros(value.sizes(), value.options().dtype(reduced ? at::kFloat : value.scalar_type()));
  at::Tensor grad_locations = at::zeros_like(locations);
  at::Tensor grad_weights = at::zeros_like(weights);
  if (s.batch * s.queries * s.heads * s.channels > 0) {
    DETR_DISPATCH_VALUE_AND_COORD(value.scalar_type(), locations.scalar_type(), "ms_deform_attn_backward_cuda", [&] {
      constexpr int kWide = static_cast<int>(16 / sizeof(scalar_t));
      if (vector_width(s, sizeof(scalar_t), {value.const_data_ptr(), grad_output.const_data_ptr()}) == kWide) {
        launch_backward<scalar_t, coord_t, kWide>(value, shapes, starts, locations, weights, grad_output,
                                                  grad_value_acc, grad_locations, grad_weights, s);
      } else {
        launch_backward<scalar_t, coord_t, 1>(value, shapes, starts, locations, weights, grad_output,
                                              grad_value_acc, grad_locations, grad_weights, s);
      }
    });
  }
  at::Tensor grad_value = reduced ? grad_value_acc.to(value.scalar_type()) : grad_value_acc;
  return {grad_value, grad_locations, grad_weights};
}

}  // namespace

TORCH_LIBRARY_IMPL(detr_ops, CUDA, m) {
  m.impl("ms_deform_attn", &ms_deform_attn_cuda);
  m.impl("ms_deform_attn_backward", &ms_deform_attn_backward_cuda);
}

}  // namespace detr_ops
