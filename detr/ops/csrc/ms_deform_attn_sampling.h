// Per-point bilinear sampling math of multi-scale deformable attention, shared by the CPU (.cpp)
// and CUDA (.cu) kernels so that both compute exactly one function.
//
// Convention (the reference backend's grid_sample with align_corners=False, padding_mode="zeros"):
//   pixel row    h = y * H - 0.5,   pixel column w = x * W - 0.5   (x, y normalized to [0, 1])
//   corners      (h0, w0) (h0, w1) (h1, w0) (h1, w1) with h0 = floor(h), h1 = h0 + 1, same for w
//   weights      (1-lh)(1-lw)  (1-lh)lw  lh(1-lw)  lh*lw       with lh = h - h0, lw = w - w0
// A corner outside the map contributes zero (and receives no gradient), exactly like zero padding.
//
// Everything here is plain arithmetic on scalars: the kernels own the memory access (a contiguous
// channel loop on CPU, vector loads and atomics on CUDA).
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define DETR_HOST_DEVICE __host__ __device__
#else
#define DETR_HOST_DEVICE
#endif

namespace detr_ops {

DETR_HOST_DEVICE inline float floor_of(float v) { return floorf(v); }
DETR_HOST_DEVICE inline double floor_of(double v) { return floor(v); }

// The four neighbours of one sampling point on one level.
template <typename acc_t>
struct BilinearCorners {
  int64_t pixel[4];  // h * W + w inside the level (meaningful only where valid)
  acc_t weight[4];   // bilinear weight, 0 where the corner lies outside the map
  bool valid[4];     // corner inside the map
  acc_t lh;          // fractional row position h - h0
  acc_t lw;          // fractional column position w - w0
};

// Pixel coordinate of a normalized location on a map of `size` pixels: h = y * H - 0.5, w = x * W - 0.5.
template <typename acc_t>
DETR_HOST_DEVICE inline acc_t pixel_coordinate(acc_t normalized, acc_t size) {
  return normalized * size - acc_t(0.5);
}

// Whether a point at pixel coordinates (h, w) has a corner inside a height x width map: beyond
// [-1, size] every corner is outside. Written as a negated test so that NaN is rejected too; it also
// keeps floor() inside the integer range. At exactly -1 or size the in-map corner has weight 0 but
// still passes a location gradient, as grid_sample does.
template <typename acc_t>
DETR_HOST_DEVICE inline bool near_map(acc_t h, acc_t w, acc_t height, acc_t width) {
  // & rather than &&: no branches, so that the CPU kernel's loop over points vectorizes.
  return (h >= acc_t(-1)) & (w >= acc_t(-1)) & (h <= height) & (w <= width);
}

// Bilinear weights of the corners (h0, w0) (h0, w1) (h1, w0) (h1, w1) from the fractional position
// lh = h - h0, lw = w - w0, before corners outside the map are zeroed. Returned by value (no array in
// memory) so that the CPU kernel's loop over points if-converts and vectorizes.
template <typename acc_t>
struct CornerWeights {
  acc_t w00, w01, w10, w11;
};

template <typename acc_t>
DETR_HOST_DEVICE inline CornerWeights<acc_t> corner_weights(acc_t lh, acc_t lw) {
  const acc_t hh = acc_t(1) - lh;
  const acc_t hw = acc_t(1) - lw;
  return {hh * hw, hh * lw, lh * hw, lh * lw};
}

// Fills `c` for the point (x, y) on a height x width level. Returns false when no corner lies inside
// the map; then the point contributes nothing and all its gradients are zero.
template <typename acc_t>
DETR_HOST_DEVICE inline bool bilinear_corners(acc_t x, acc_t y, int64_t height, int64_t width,
                                              BilinearCorners<acc_t>& c) {
  const acc_t h = pixel_coordinate(y, static_cast<acc_t>(height));
  const acc_t w = pixel_coordinate(x, static_cast<acc_t>(width));
  if (!near_map(h, w, static_cast<acc_t>(height), static_cast<acc_t>(width))) return false;
  const acc_t h_floor = floor_of(h);
  const acc_t w_floor = floor_of(w);
  const int64_t h0 = static_cast<int64_t>(h_floor);
  const int64_t w0 = static_cast<int64_t>(w_floor);
  const int64_t h1 = h0 + 1;
  const int64_t w1 = w0 + 1;
  c.lh = h - h_floor;
  c.lw = w - w_floor;

  // h ranges over [-1, height], so h0 over [-1, height] and h1 over [0, height + 1]: both ends matter.
  const bool h0_in = h0 >= 0 && h0 < height;
  const bool h1_in = h1 >= 0 && h1 < height;
  const bool w0_in = w0 >= 0 && w0 < width;
  const bool w1_in = w1 >= 0 && w1 < width;
  c.valid[0] = h0_in && w0_in;
  c.valid[1] = h0_in && w1_in;
  c.valid[2] = h1_in && w0_in;
  c.valid[3] = h1_in && w1_in;
  c.pixel[0] = h0 * width + w0;
  c.pixel[1] = h0 * width + w1;
  c.pixel[2] = h1 * width + w0;
  c.pixel[3] = h1 * width + w1;
  const CornerWeights<acc_t> weight = corner_weights(c.lh, c.lw);
  c.weight[0] = c.valid[0] ? weight.w00 : acc_t(0);
  c.weight[1] = c.valid[1] ? weight.w01 : acc_t(0);
  c.weight[2] = c.valid[2] ? weight.w10 : acc_t(0);
  c.weight[3] = c.valid[3] ? weight.w11 : acc_t(0);
  return c.valid[0] || c.valid[1] || c.valid[2] || c.valid[3];
}

// Gradients of one point's contribution  attention_weight * sum_k weight[k] * value[corner k]  with
// respect to its attention weight and its normalized location (x, y).
template <typename acc_t>
struct PointGrads {
  acc_t attention;
  acc_t x;
  acc_t y;
};

// dot[k] = <grad_output, value at corner k> over the channels at hand (0 for a corner outside the
// map). Every output is linear in dot, so partial dots over channel chunks give partial gradients
// that simply add up (the CUDA backward reduces them across threads afterwards).
template <typename acc_t>
DETR_HOST_DEVICE inline PointGrads<acc_t> point_grads(const BilinearCorners<acc_t>& c, const acc_t dot[4],
                                                      acc_t attention_weight, int64_t height, int64_t width) {
  const acc_t hh = acc_t(1) - c.lh;
  const acc_t hw = acc_t(1) - c.lw;
  // d(sample)/d(lw) and d(sample)/d(lh) of  hh*hw*v0 + hh*lw*v1 + lh*hw*v2 + lh*lw*v3
  const acc_t d_lw = hh * (dot[1] - dot[0]) + c.lh * (dot[3] - dot[2]);
  const acc_t d_lh = hw * (dot[2] - dot[0]) + c.lw * (dot[3] - dot[1]);
  PointGrads<acc_t> g;
  g.attention = c.weight[0] * dot[0] + c.weight[1] * dot[1] + c.weight[2] * dot[2] + c.weight[3] * dot[3];
  // w = x * W - 0.5, so dw/dx = W (and dh/dy = H).
  g.x = attention_weight * static_cast<acc_t>(width) * d_lw;
  g.y = attention_weight * static_cast<acc_t>(height) * d_lh;
  return g;
}

}  // namespace detr_ops
