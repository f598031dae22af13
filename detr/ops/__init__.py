"""Multi-scale deformable attention: one function, three backends (reference, native CPU, CUDA).

Dispatch rules live in ``detr.ops.dispatch``; the native extension is never imported at module import.
"""

from detr.ops.dispatch import ms_deform_attn

__all__ = ["ms_deform_attn"]
