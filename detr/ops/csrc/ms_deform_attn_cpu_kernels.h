// CPU kernel bodies of multi-scale deformable attention (included by ms_deform_attn_cpu.cpp only).
//
// forward_rows / backward_tasks are force-inlined into one out-of-line copy per instruction set
// (see ms_deform_attn_cpu.cpp), so the same source is compiled for the baseline ISA and for AVX2+FMA.
#pragma once

#include <ATen/OpMathType.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "ms_deform_attn_checks.h"
#include "ms_deform_attn_sampling.h"

// x86-64: the kernels are compiled twice, for the baseline ISA and for AVX2+FMA, and the AVX2 copy is
// picked at run time when the CPU has it. No -march flag: the library stays valid on any x86-64 host.
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define DETR_X86_MULTIVERSION 1
#define DETR_TARGET_AVX2 __attribute__((target("avx2,fma")))
#else
#define DETR_X86_MULTIVERSION 0
#endif
#if defined(__GNUC__) || defined(__clang__)
#define DETR_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define DETR_ALWAYS_INLINE inline
#endif

namespace detr_ops {
namespace cpu {

template <typename scalar_t, typename coord_t>
struct KernelArgs {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* value;        // [N, S, M, D]
  const int64_t* shapes;        // [L, 2]
  const int64_t* starts;        // [L]
  const coord_t* locations;     // [N, Lq, M, L, P, 2]
  const coord_t* weights;       // [N, Lq, M, L, P]
  scalar_t* out;                // forward: [N, Lq, M * D]
  const scalar_t* grad_output;  // backward: [N, Lq, M * D]
  acc_t* grad_value;            // backward: [N, S, M, D], zero-initialized
  coord_t* grad_locations;      // backward: like locations
  coord_t* grad_weights;        // backward: like weights
  MsdaSizes s;
};

// Prefetches the first bytes of one corner's channel row (up to 4 cache lines).
template <typename T>
DETR_ALWAYS_INLINE void prefetch_row(const T* row, int64_t channels) {
  const char* bytes = reinterpret_cast<const char*>(row);
  const int64_t size = std::min<int64_t>(channels * static_cast<int64_t>(sizeof(T)), 256);
  for (int64_t offset = 0; offset < size; offset += 64) {
#if defined(__GNUC__) || defined(__clang__)
    __builtin_prefetch(bytes + offset, 0, 3);
#endif
  }
}

// One sampling point resolved to memory: corner rows of value (nullptr outside the map) and their
// weights (attention weight times bilinear weight).
template <typename scalar_t, typename acc_t>
struct SamplePlan {
  const scalar_t* corner[4];
  acc_t weight[4];
};

// Forward rows [begin, end) of the (n, m, q) row space, q fastest: consecutive queries of one head
// sample neighbouring pixels of that head's value slice, which then stays in cache.
// Each row runs in two passes: resolve all L*P points and prefetch their corner rows, then
// accumulate. The prefetches put every corner load of the row in flight at once, which matters when
// the points are scattered over a value tensor larger than the caches (decoder queries).
// kD > 0: the channel count is a compile-time constant (the common head widths), so the accumulators
// live in registers and the channel loops unroll completely; kD == 0: any width.
template <typename scalar_t, typename coord_t, int kD>
DETR_ALWAYS_INLINE void forward_rows(const KernelArgs<scalar_t, coord_t>& a, int64_t begin, int64_t end) {
  using acc_t = at::opmath_type<scalar_t>;
  const MsdaSizes& s = a.s;
  const int64_t D = kD > 0 ? kD : s.channels;
  const int64_t pixel_stride = s.heads * D;  // between neighbouring positions of one head's value
  const int64_t points_per_head = s.levels * s.points;
  acc_t acc_fixed[kD > 0 ? kD : 1];
  std::vector<acc_t> acc_dynamic(kD > 0 ? 0 : D);
  acc_t* acc = kD > 0 ? acc_fixed : acc_dynamic.data();
  std::vector<SamplePlan<scalar_t, acc_t>> plans(points_per_head);
  for (int64_t row = begin; row < end; ++row) {
    const int64_t q = row % s.queries;
    const int64_t m = (row / s.queries) % s.heads;
    const int64_t n = row / (s.queries * s.heads);
    const int64_t nqm = (n * s.queries + q) * s.heads + m;
    const int64_t point0 = nqm * points_per_head;  // index of point (l=0, p=0)

    for (int64_t l = 0; l < s.levels; ++l) {
      const int64_t height = a.shapes[2 * l];
      const int64_t width = a.shapes[2 * l + 1];
      const scalar_t* level_value = a.value + ((n * s.keys + a.starts[l]) * s.heads + m) * D;
      for (int64_t p = 0; p < s.points; ++p) {
        const int64_t i = l * s.points + p;
        SamplePlan<scalar_t, acc_t>& plan = plans[i];
        BilinearCorners<acc_t> c;
        const bool inside = bilinear_corners<acc_t>(static_cast<acc_t>(a.locations[2 * (point0 + i)]),
                                                    static_cast<acc_t>(a.locations[2 * (point0 + i) + 1]),
                                                    height, width, c);
        const acc_t attention = static_cast<acc_t>(a.weights[point0 + i]);
        for (int k = 0; k < 4; ++k) {
          const bool used = inside && c.valid[k];
          plan.corner[k] = used ? level_value + c.pixel[k] * pixel_stride : nullptr;
          plan.weight[k] = used ? attention * c.weight[k] : acc_t(0);
          if (used) prefetch_row(plan.corner[k], D);
        }
      }
    }

    for (int64_t d = 0; d < D; ++d) acc[d] = acc_t(0);
    for (int64_t i = 0; i < points_per_head; ++i) {
      const SamplePlan<scalar_t, acc_t>& plan = plans[i];
      if (plan.corner[0] && plan.corner[1] && plan.corner[2] && plan.corner[3]) {
        // All four corners inside (the common case): one fused loop, no per-corner branches.
        const scalar_t* v0 = plan.corner[0];
        const scalar_t* v1 = plan.corner[1];
        const scalar_t* v2 = plan.corner[2];
        const scalar_t* v3 = plan.corner[3];
        const acc_t w0 = plan.weight[0], w1 = plan.weight[1], w2 = plan.weight[2], w3 = plan.weight[3];
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) {
          acc[d] += w0 * static_cast<acc_t>(v0[d]) + w1 * static_cast<acc_t>(v1[d]) +
                    w2 * static_cast<acc_t>(v2[d]) + w3 * static_cast<acc_t>(v3[d]);
        }
        continue;
      }
      for (int k = 0; k < 4; ++k) {
        const scalar_t* v = plan.corner[k];
        if (v == nullptr) continue;
        const acc_t w = plan.weight[k];
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) acc[d] += w * static_cast<acc_t>(v[d]);
      }
    }
    scalar_t* o = a.out + nqm * D;
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) o[d] = static_cast<scalar_t>(acc[d]);
  }
}

template <typename acc_t>
struct PlannedPoint {
  BilinearCorners<acc_t> c;
  acc_t attention;
  bool inside;  // some corner lies inside the map
};

// Backward tasks [begin, end) of the (n, m, l) task space. Task (n, m, l) owns
// grad_value[n, start_l : start_l + H_l * W_l, m, :] and the gradients of every point of head m on
// level l of image n, so tasks write disjoint memory.
template <typename scalar_t, typename coord_t, int kD>
DETR_ALWAYS_INLINE void backward_tasks(const KernelArgs<scalar_t, coord_t>& a, int64_t begin, int64_t end) {
  using acc_t = at::opmath_type<scalar_t>;
  const MsdaSizes& s = a.s;
  const int64_t D = kD > 0 ? kD : s.channels;
  const int64_t pixel_stride = s.heads * D;
  const int64_t points_per_head = s.levels * s.points;
  acc_t grad_fixed[kD > 0 ? kD : 1];  // grad_output[n, q, m, :] in acc_t
  std::vector<acc_t> grad_dynamic(kD > 0 ? 0 : D);
  acc_t* g = kD > 0 ? grad_fixed : grad_dynamic.data();
  constexpr int64_t kAhead = 4;  // queries planned ahead
  std::vector<PlannedPoint<acc_t>> ring((kAhead + 1) * s.points);
  for (int64_t task = begin; task < end; ++task) {
    const int64_t l = task % s.levels;
    const int64_t m = (task / s.levels) % s.heads;
    const int64_t n = task / (s.levels * s.heads);
    const int64_t height = a.shapes[2 * l];
    const int64_t width = a.shapes[2 * l + 1];
    const int64_t level_offset = ((n * s.keys + a.starts[l]) * s.heads + m) * D;
    const scalar_t* level_value = a.value + level_offset;
    acc_t* level_grad = a.grad_value + level_offset;

    // Corners of query q + kAhead are resolved (and their rows prefetched) while query q is processed:
    // the points of one task are scattered over the level when queries are not pixels of it
    // (decoder), and the prefetches keep several of their cache misses in flight.
    auto plan = [&](int64_t q, PlannedPoint<acc_t>* slot) {
      const int64_t point0 = ((n * s.queries + q) * s.heads + m) * points_per_head + l * s.points;
      for (int64_t p = 0; p < s.points; ++p) {
        PlannedPoint<acc_t>& planned = slot[p];
        planned.inside = bilinear_corners<acc_t>(static_cast<acc_t>(a.locations[2 * (point0 + p)]),
                                                 static_cast<acc_t>(a.locations[2 * (point0 + p) + 1]), height,
                                                 width, planned.c);
        planned.attention = static_cast<acc_t>(a.weights[point0 + p]);
        if (!planned.inside) continue;
        for (int k = 0; k < 4; ++k) {
          if (!planned.c.valid[k]) continue;
          prefetch_row(level_value + planned.c.pixel[k] * pixel_stride, D);
          prefetch_row(level_grad + planned.c.pixel[k] * pixel_stride, D);
        }
      }
    };
    const int64_t ring_size = kAhead + 1;  // the slot of q is not reused before q is done
    for (int64_t q = 0; q < std::min<int64_t>(kAhead, s.queries); ++q) plan(q, &ring[(q % ring_size) * s.points]);

    for (int64_t q = 0; q < s.queries; ++q) {
      if (q + kAhead < s.queries) plan(q + kAhead, &ring[((q + kAhead) % ring_size) * s.points]);
      const PlannedPoint<acc_t>* planned_points = &ring[(q % ring_size) * s.points];
      const int64_t nqm = (n * s.queries + q) * s.heads + m;
      const scalar_t* go = a.grad_output + nqm * D;
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) g[d] = static_cast<acc_t>(go[d]);

      const int64_t point0 = nqm * points_per_head + l * s.points;
      for (int64_t p = 0; p < s.points; ++p) {
        const int64_t idx = point0 + p;
        const BilinearCorners<acc_t>& c = planned_points[p].c;
        if (!planned_points[p].inside) {
          a.grad_weights[idx] = coord_t(0);
          a.grad_locations[2 * idx] = coord_t(0);
          a.grad_locations[2 * idx + 1] = coord_t(0);
          continue;
        }
        const acc_t attention = planned_points[p].attention;
        acc_t dot[4] = {acc_t(0), acc_t(0), acc_t(0), acc_t(0)};
        if (c.valid[0] && c.valid[3]) {
          // All four corners inside (the common case): one fused loop, no per-corner branches.
          const int64_t offset0 = c.pixel[0] * pixel_stride;
          const int64_t offset2 = offset0 + width * pixel_stride;
          const scalar_t* v0 = level_value + offset0;
          const scalar_t* v1 = v0 + pixel_stride;
          const scalar_t* v2 = level_value + offset2;
          const scalar_t* v3 = v2 + pixel_stride;
          acc_t* gv0 = level_grad + offset0;
          acc_t* gv1 = gv0 + pixel_stride;
          acc_t* gv2 = level_grad + offset2;
          acc_t* gv3 = gv2 + pixel_stride;
          const acc_t w0 = attention * c.weight[0], w1 = attention * c.weight[1];
          const acc_t w2 = attention * c.weight[2], w3 = attention * c.weight[3];
          acc_t dot0 = acc_t(0), dot1 = acc_t(0), dot2 = acc_t(0), dot3 = acc_t(0);
#pragma omp simd reduction(+ : dot0, dot1, dot2, dot3)
          for (int64_t d = 0; d < D; ++d) {
            const acc_t gd = g[d];
            dot0 += gd * static_cast<acc_t>(v0[d]);
            dot1 += gd * static_cast<acc_t>(v1[d]);
            dot2 += gd * static_cast<acc_t>(v2[d]);
            dot3 += gd * static_cast<acc_t>(v3[d]);
            gv0[d] += w0 * gd;
            gv1[d] += w1 * gd;
            gv2[d] += w2 * gd;
            gv3[d] += w3 * gd;
          }
          dot[0] = dot0;
          dot[1] = dot1;
          dot[2] = dot2;
          dot[3] = dot3;
        } else {
          for (int k = 0; k < 4; ++k) {
            if (!c.valid[k]) continue;
            const acc_t w = attention * c.weight[k];
            const scalar_t* v = level_value + c.pixel[k] * pixel_stride;
            acc_t* gv = level_grad + c.pixel[k] * pixel_stride;
            acc_t sum = acc_t(0);
#pragma omp simd reduction(+ : sum)
            for (int64_t d = 0; d < D; ++d) {
              sum += g[d] * static_cast<acc_t>(v[d]);
              gv[d] += w * g[d];
            }
            dot[k] = sum;
          }
        }
        const PointGrads<acc_t> pg = point_grads<acc_t>(c, dot, attention, height, width);
        a.grad_weights[idx] = static_cast<coord_t>(pg.attention);
        a.grad_locations[2 * idx] = static_cast<coord_t>(pg.x);
        a.grad_locations[2 * idx + 1] = static_cast<coord_t>(pg.y);
      }
    }
  }
}

}  // namespace cpu
}  // namespace detr_ops
