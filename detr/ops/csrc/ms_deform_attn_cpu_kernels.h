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
  coord_t* grad_locations;      // backward: like locations, uninitialized (every element is written)
  coord_t* grad_weights;        // backward: like weights, uninitialized (every element is written)
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

// Level constants of the L*P points of one (query, head), point i = l * P + p: built once per call so
// that the planning loop below runs over points without a level loop around it.
template <typename acc_t>
struct PointLevels {
  std::vector<acc_t> height, width;  // H_l, W_l
  std::vector<int32_t> height_i, width_i, start;  // H_l, W_l, level_start_index[l]

  PointLevels(const int64_t* shapes, const int64_t* starts, int64_t levels, int64_t points)
      : height(levels * points), width(levels * points), height_i(levels * points), width_i(levels * points),
        start(levels * points) {
    for (int64_t i = 0; i < levels * points; ++i) {
      const int64_t l = i / points;
      height[i] = static_cast<acc_t>(shapes[2 * l]);
      width[i] = static_cast<acc_t>(shapes[2 * l + 1]);
      height_i[i] = static_cast<int32_t>(shapes[2 * l]);
      width_i[i] = static_cast<int32_t>(shapes[2 * l + 1]);
      start[i] = static_cast<int32_t>(starts[l]);
    }
  }
};

// Sampling points resolved to memory, one array per field (so that the planning loop vectorizes
// across points): point i's corner (h0, w0) is pixel `pixel[i]` of the image (level start included;
// corner 1 is the next pixel, corners 2 and 3 the pixels one map row below), bit k of `corners[i]`
// says corner k lies inside the map, and weight[k][i] is its bilinear weight (times the attention
// weight when the plan is made with kScaled), 0 outside the map. Fixed capacity, so that it lives on
// the stack and the accumulation loop addresses it without reloading pointers: a row's points are
// planned in chunks of kCapacity.
template <typename acc_t>
struct PointPlans {
  static constexpr int64_t kCapacity = 32;
  alignas(64) int32_t pixel[kCapacity];
  alignas(64) int32_t corners[kCapacity];
  alignas(64) acc_t weight[4][kCapacity];
};

// Resolves `count` points whose locations, attention weights and level constants are at
// loc[2 * i], loc[2 * i + 1], att[i] and levels[first + i]. The body is the per-point math of
// ms_deform_attn_sampling.h (bilinear_corners) written without branches, so that the loop runs in
// SIMD lanes over points.
template <bool kScaled, typename acc_t, typename coord_t>
DETR_ALWAYS_INLINE void plan_points(const coord_t* __restrict loc, const coord_t* __restrict att, int64_t count,
                                    const PointLevels<acc_t>& levels, int64_t first, PointPlans<acc_t>& plans) {
  const acc_t* __restrict height = levels.height.data() + first;
  const acc_t* __restrict width = levels.width.data() + first;
  const int32_t* __restrict height_i = levels.height_i.data() + first;
  const int32_t* __restrict width_i = levels.width_i.data() + first;
  const int32_t* __restrict start = levels.start.data() + first;
  int32_t* __restrict pixel = plans.pixel;
  int32_t* __restrict corners = plans.corners;
  acc_t* __restrict weight0 = plans.weight[0];
  acc_t* __restrict weight1 = plans.weight[1];
  acc_t* __restrict weight2 = plans.weight[2];
  acc_t* __restrict weight3 = plans.weight[3];
#pragma omp simd
  for (int64_t i = 0; i < count; ++i) {
    acc_t h = pixel_coordinate(static_cast<acc_t>(loc[2 * i + 1]), height[i]);
    acc_t w = pixel_coordinate(static_cast<acc_t>(loc[2 * i]), width[i]);
    const bool near = near_map(h, w, height[i], width[i]);
    // Clamped into [-1, size] (NaN to -1) so that the integer conversions below stay in range; points
    // that were outside are masked by `near`. Selects with a non-constant arm: a constant one lets the
    // compiler split the loop body into branches, which stops vectorization.
    h = h >= acc_t(-1) ? h : acc_t(-1);
    h = h <= height[i] ? h : height[i];
    w = w >= acc_t(-1) ? w : acc_t(-1);
    w = w <= width[i] ? w : width[i];
    const acc_t h_floor = floor_of(h);
    const acc_t w_floor = floor_of(w);
    const int32_t h0 = static_cast<int32_t>(h_floor);
    const int32_t w0 = static_cast<int32_t>(w_floor);
    const acc_t lh = h - h_floor;
    const acc_t lw = w - w_floor;
    // Bitwise & rather than &&: no branches, so the loop stays vectorizable.
    const bool h0_in = near & (h0 >= 0) & (h0 < height_i[i]);
    const bool h1_in = near & (h0 + 1 >= 0) & (h0 + 1 < height_i[i]);
    const bool w0_in = (w0 >= 0) & (w0 < width_i[i]);
    const bool w1_in = (w0 + 1 >= 0) & (w0 + 1 < width_i[i]);
    const bool in0 = h0_in & w0_in, in1 = h0_in & w1_in, in2 = h1_in & w0_in, in3 = h1_in & w1_in;
    const CornerWeights<acc_t> bilinear = corner_weights(lh, lw);
    const acc_t scale = kScaled ? static_cast<acc_t>(att[i]) : acc_t(1);
    weight0[i] = in0 ? scale * bilinear.w00 : acc_t(0);
    weight1[i] = in1 ? scale * bilinear.w01 : acc_t(0);
    weight2[i] = in2 ? scale * bilinear.w10 : acc_t(0);
    weight3[i] = in3 ? scale * bilinear.w11 : acc_t(0);
    corners[i] = (in0 ? 1 : 0) | (in1 ? 2 : 0) | (in2 ? 4 : 0) | (in3 ? 8 : 0);
    pixel[i] = start[i] + h0 * width_i[i] + w0;
  }
}

// Forward rows [begin, end) of the (n, q, m) row space, m fastest: the heads of one query read
// neighbouring 128-byte pieces of the same pixels, and consecutive queries read overlapping
// neighbourhoods. (With q fastest, one head's rows lie M * D * 4 bytes apart, which maps them onto a
// few cache sets only: measured 1.35x slower at the encoder shape.)
// Each row runs in two passes over chunks of up to 32 points: plan them (vectorized across points,
// into stack arrays), then accumulate point by point over the D channels. No software prefetch: at
// the encoder shape the corner rows mostly come from L2, which the out-of-order core overlaps
// well, and a prefetch pass cost more than it saved (forward 1.17x faster without it, the decoder
// shape unchanged; bench/README.md).
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
  const PointLevels<acc_t> levels(a.shapes, a.starts, s.levels, s.points);
  PointPlans<acc_t> plans;
  constexpr int64_t kChunk = PointPlans<acc_t>::kCapacity;
  for (int64_t row = begin; row < end; ++row) {
    const int64_t m = row % s.heads;
    const int64_t n = row / (s.queries * s.heads);
    const int64_t point0 = row * points_per_head;  // row is (n * Lq + q) * M + m
    const scalar_t* head_value = a.value + (n * s.keys * s.heads + m) * D;  // value[n, 0, m, :]
    for (int64_t d = 0; d < D; ++d) acc[d] = acc_t(0);
    for (int64_t first = 0; first < points_per_head; first += kChunk) {
      const int64_t count = std::min(kChunk, points_per_head - first);
      plan_points<true>(a.locations + 2 * (point0 + first), a.weights + point0 + first, count, levels, first,
                        plans);
      const int32_t* width_i = levels.width_i.data() + first;
      for (int64_t i = 0; i < count; ++i) {
        const int32_t corners = plans.corners[i];
        if (corners == 0) continue;
        const int64_t offset0 = plans.pixel[i] * pixel_stride;
        const int64_t down = width_i[i] * pixel_stride;
        const acc_t w0 = plans.weight[0][i], w1 = plans.weight[1][i];
        const acc_t w2 = plans.weight[2][i], w3 = plans.weight[3][i];
        if (corners == 15) {
          // All four corners inside (the common case): one fused loop, no per-corner branches.
          const scalar_t* v0 = head_value + offset0;
          const scalar_t* v1 = v0 + pixel_stride;
          const scalar_t* v2 = v0 + down;
          const scalar_t* v3 = v2 + pixel_stride;
#pragma omp simd
          for (int64_t d = 0; d < D; ++d) {
            acc[d] += w0 * static_cast<acc_t>(v0[d]) + w1 * static_cast<acc_t>(v1[d]) +
                      w2 * static_cast<acc_t>(v2[d]) + w3 * static_cast<acc_t>(v3[d]);
          }
          continue;
        }
        const acc_t weight[4] = {w0, w1, w2, w3};
        const int64_t offset[4] = {offset0, offset0 + pixel_stride, offset0 + down, offset0 + down + pixel_stride};
        for (int k = 0; k < 4; ++k) {
          if (!(corners & (1 << k))) continue;
          const scalar_t* v = head_value + offset[k];
          const acc_t w = weight[k];
#pragma omp simd
          for (int64_t d = 0; d < D; ++d) acc[d] += w * static_cast<acc_t>(v[d]);
        }
      }
    }
    scalar_t* o = a.out + row * D;
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

// Backward tasks [begin, end) of the (n, l, head group) task space, `group` heads per task. Task
// (n, l, g) owns grad_value[n, start_l : start_l + H_l * W_l, heads of g, :] and the gradients of every
// point of those heads on level l of image n, so tasks write disjoint memory. Within a task the
// (query, head) pairs run query by query, heads fastest: a task with all M heads reads whole
// M * D pixel records (one head alone would read pieces M * D * 4 bytes apart, which alias onto a few
// cache sets). Every grad_value element is summed in (query, point) order whatever the grouping, so the
// result does not depend on `group` (which the caller picks from the thread count).
template <typename scalar_t, typename coord_t, int kD>
DETR_ALWAYS_INLINE void backward_tasks(const KernelArgs<scalar_t, coord_t>& a, int64_t group, int64_t begin,
                                       int64_t end) {
  using acc_t = at::opmath_type<scalar_t>;
  const MsdaSizes& s = a.s;
  const int64_t D = kD > 0 ? kD : s.channels;
  const int64_t pixel_stride = s.heads * D;
  const int64_t points_per_head = s.levels * s.points;
  const int64_t groups = s.heads / group;
  acc_t grad_fixed[kD > 0 ? kD : 1];  // grad_output[n, q, m, :] in acc_t
  std::vector<acc_t> grad_dynamic(kD > 0 ? 0 : D);
  acc_t* g = kD > 0 ? grad_fixed : grad_dynamic.data();
  constexpr int64_t kAhead = 4;  // (query, head) pairs planned ahead
  std::vector<PlannedPoint<acc_t>> ring((kAhead + 1) * s.points);
  for (int64_t task = begin; task < end; ++task) {
    const int64_t head0 = (task % groups) * group;
    const int64_t l = (task / groups) % s.levels;
    const int64_t n = task / (groups * s.levels);
    const int64_t height = a.shapes[2 * l];
    const int64_t width = a.shapes[2 * l + 1];
    const int64_t level_offset = (n * s.keys + a.starts[l]) * s.heads * D;  // [n, start_l, 0, 0]
    const int64_t pairs = s.queries * group;  // pair j: query j / group, head head0 + j % group

    // Corners of pair j + kAhead are resolved (and their rows prefetched) while pair j is processed:
    // the points of one task are scattered over the level when queries are not pixels of it
    // (decoder), and the prefetches keep several of their cache misses in flight.
    auto plan = [&](int64_t j, PlannedPoint<acc_t>* slot) {
      const int64_t q = j / group;
      const int64_t m = head0 + j % group;
      const scalar_t* level_value = a.value + level_offset + m * D;
      const acc_t* level_grad = a.grad_value + level_offset + m * D;
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
    const int64_t ring_size = kAhead + 1;  // the slot of j is not reused before j is done
    for (int64_t j = 0; j < std::min<int64_t>(kAhead, pairs); ++j) plan(j, &ring[(j % ring_size) * s.points]);

    for (int64_t j = 0; j < pairs; ++j) {
      if (j + kAhead < pairs) plan(j + kAhead, &ring[((j + kAhead) % ring_size) * s.points]);
      const PlannedPoint<acc_t>* planned_points = &ring[(j % ring_size) * s.points];
      const int64_t q = j / group;
      const int64_t m = head0 + j % group;
      const scalar_t* level_value = a.value + level_offset + m * D;
      acc_t* level_grad = a.grad_value + level_offset + m * D;
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
