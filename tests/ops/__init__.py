"""Tests of the multi-scale deformable attention op (detr.ops)."""
