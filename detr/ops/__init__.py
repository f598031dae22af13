"""Multi-scale deformable attention: one function, three backends (reference, native CPU, CUDA).

``ms_deform_attn(value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
backend="auto")`` runs the PyTorch reference or the native kernel of the inputs' device; the rules
(argument, ``$DETR_MSDA_BACKEND``, availability) are in ``detr.ops.dispatch``. The native kernels
(``csrc/``) are built just in time into a cache (``detr.ops.build``; ``detr ops build`` prebuilds,
``detr ops info`` reports). Nothing is built or loaded at import.
"""

from detr.ops.dispatch import ms_deform_attn

__all__ = ["ms_deform_attn"]
