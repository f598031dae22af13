// Argument checks and dtype dispatch shared by the CPU and CUDA entry points (host code only).
//
// The Python wrapper (detr/ops/validation.py) already reports bad input as a DetrError with a
// friendly message; these checks are the kernels' own guard against out-of-bounds access when the
// op is called directly through torch.ops.detr_ops.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include <string>

namespace detr_ops {

// Numbers in error messages are turned into text with std::to_string, never streamed: with torch
// 2.11 and g++ 13 (Ubuntu 24.04) streaming an integer into the message (c10::str of an IntArrayRef or
// an int64_t) crashed the process with a segmentation fault inside std::ostream, so a bad direct call
// killed Python instead of raising. Only strings reach the stream.
inline std::string text(int64_t number) { return std::to_string(number); }

inline std::string text(at::IntArrayRef sizes) {
  std::string out = "[";
  for (size_t i = 0; i < sizes.size(); ++i) out += (i ? ", " : "") + std::to_string(sizes[i]);
  return out + "]";
}

inline std::string text(at::ScalarType type) { return c10::toString(type); }

inline std::string text(const at::Device& device) { return device.str(); }

// Runs `body()` with scalar_t/coord_t set for the dtype pair of (value, sampling_locations): both the
// same floating type, or float16/bfloat16 value with float32 locations and weights (the autocast
// case; check_inputs rejects every other pair). Only these pairs are instantiated.
#define DETR_DISPATCH_VALUE_AND_COORD(VALUE_TYPE, COORD_TYPE, NAME, ...)                     \
  [&] {                                                                                        \
    const at::ScalarType detr_value_type = (VALUE_TYPE);                                       \
    if ((COORD_TYPE) == detr_value_type) {                                                     \
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, detr_value_type, NAME, [&] {   \
        using coord_t = scalar_t;                                                              \
        __VA_ARGS__();                                                                         \
      });                                                                                      \
    } else {                                                                                   \
      AT_DISPATCH_REDUCED_FLOATING_TYPES(detr_value_type, NAME, [&] {                          \
        using coord_t = float;                                                                 \
        __VA_ARGS__();                                                                         \
      });                                                                                      \
    }                                                                                          \
  }()

struct MsdaSizes {
  int64_t batch;     // N
  int64_t keys;      // S = sum over levels of H * W
  int64_t heads;     // M
  int64_t channels;  // D, channels per head
  int64_t queries;   // Lq
  int64_t levels;    // L
  int64_t points;    // P, points per level
};

inline bool is_reduced_float(at::ScalarType t) { return t == at::kHalf || t == at::kBFloat16; }

inline MsdaSizes check_inputs(const at::Tensor& value, const at::Tensor& spatial_shapes,
                              const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                              const at::Tensor& attention_weights) {
  TORCH_CHECK(value.dim() == 4, "ms_deform_attn: value must be [N, S, M, D], got shape ", text(value.sizes()));
  TORCH_CHECK(sampling_locations.dim() == 6 && sampling_locations.size(5) == 2,
              "ms_deform_attn: sampling_locations must be [N, Lq, M, L, P, 2], got shape ",
              text(sampling_locations.sizes()));
  TORCH_CHECK(attention_weights.dim() == 5, "ms_deform_attn: attention_weights must be [N, Lq, M, L, P], got shape ",
              text(attention_weights.sizes()));
  TORCH_CHECK(spatial_shapes.dim() == 2 && spatial_shapes.size(1) == 2,
              "ms_deform_attn: spatial_shapes must be [L, 2], got shape ", text(spatial_shapes.sizes()));
  TORCH_CHECK(level_start_index.dim() == 1, "ms_deform_attn: level_start_index must be [L], got shape ",
              text(level_start_index.sizes()));
  MsdaSizes s{value.size(0),
              value.size(1),
              value.size(2),
              value.size(3),
              sampling_locations.size(1),
              sampling_locations.size(3),
              sampling_locations.size(4)};
  TORCH_CHECK(sampling_locations.size(0) == s.batch && sampling_locations.size(2) == s.heads,
              "ms_deform_attn: sampling_locations ", text(sampling_locations.sizes()), " does not match value ",
              text(value.sizes()), " in N or M");
  TORCH_CHECK(attention_weights.sizes() == sampling_locations.sizes().slice(0, 5),
              "ms_deform_attn: attention_weights ", text(attention_weights.sizes()),
              " must equal sampling_locations without its last dimension, ", text(sampling_locations.sizes()));
  TORCH_CHECK(spatial_shapes.size(0) == s.levels && level_start_index.size(0) == s.levels,
              "ms_deform_attn: spatial_shapes and level_start_index must have L = ", text(s.levels), " rows");
  TORCH_CHECK(spatial_shapes.scalar_type() == at::kLong && level_start_index.scalar_type() == at::kLong,
              "ms_deform_attn: spatial_shapes and level_start_index must be int64");

  const at::ScalarType vt = value.scalar_type();
  const at::ScalarType ct = sampling_locations.scalar_type();
  TORCH_CHECK(vt == at::kDouble || vt == at::kFloat || is_reduced_float(vt),
              "ms_deform_attn: value must be float64, float32, float16 or bfloat16, got ", text(vt));
  TORCH_CHECK(attention_weights.scalar_type() == ct,
              "ms_deform_attn: sampling_locations and attention_weights must share a dtype, got ", text(ct), " and ",
              text(attention_weights.scalar_type()));
  TORCH_CHECK(ct == vt || (is_reduced_float(vt) && ct == at::kFloat),
              "ms_deform_attn: sampling_locations/attention_weights must have value's dtype (", text(vt),
              ") or float32 when value is float16/bfloat16, got ", text(ct));

  const at::Device device = value.device();
  for (const at::Tensor* t : {&spatial_shapes, &level_start_index, &sampling_locations, &attention_weights}) {
    TORCH_CHECK(t->device() == device, "ms_deform_attn: all inputs must be on ", text(device), ", got one on ",
                text(t->device()));
  }
  return s;
}

inline void check_grad_output(const at::Tensor& grad_output, const at::Tensor& value, const MsdaSizes& s) {
  TORCH_CHECK(grad_output.dim() == 3 && grad_output.size(0) == s.batch && grad_output.size(1) == s.queries &&
                  grad_output.size(2) == s.heads * s.channels,
              "ms_deform_attn_backward: grad_output must be [N, Lq, M * D] = [", text(s.batch), ", ", text(s.queries),
              ", ", text(s.heads * s.channels), "], got ", text(grad_output.sizes()));
  TORCH_CHECK(grad_output.scalar_type() == value.scalar_type(), "ms_deform_attn_backward: grad_output dtype ",
              text(grad_output.scalar_type()), " must equal value dtype ", text(value.scalar_type()));
  TORCH_CHECK(grad_output.device() == value.device(), "ms_deform_attn_backward: grad_output must be on ",
              text(value.device()));
}

// Level table consistency; reads the (tiny) tensors, so only for host tensors.
inline void check_levels_on_host(const at::Tensor& spatial_shapes, const at::Tensor& level_start_index,
                                 int64_t keys) {
  const auto shapes = spatial_shapes.accessor<int64_t, 2>();
  const auto starts = level_start_index.accessor<int64_t, 1>();
  int64_t expected_start = 0;
  for (int64_t l = 0; l < spatial_shapes.size(0); ++l) {
    TORCH_CHECK(shapes[l][0] > 0 && shapes[l][1] > 0, "ms_deform_attn: spatial_shapes[", text(l), "] = (", text(shapes[l][0]),
                ", ", text(shapes[l][1]), ") must be positive");
    TORCH_CHECK(starts[l] == expected_start, "ms_deform_attn: level_start_index[", text(l), "] = ", text(starts[l]),
                " but the levels before it hold ", text(expected_start), " positions");
    expected_start += shapes[l][0] * shapes[l][1];
  }
  TORCH_CHECK(expected_start == keys, "ms_deform_attn: value has S = ", text(keys),
              " positions but spatial_shapes sum to ", text(expected_start));
}

}  // namespace detr_ops
