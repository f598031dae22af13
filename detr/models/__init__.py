"""DETR and Deformable DETR models, Hungarian matching, set criterion and post-processing.

Modules (one concept each):
    backbone             ResNet body with frozen BatchNorm, multi-level features and their masks
    position_encoding    2-D sine and learned position encodings
    transformer          DETR encoder-decoder (nn.MultiheadAttention, post-norm or pre-norm)
    ms_deform_attn       the multi-scale deformable attention module (calls ``detr.ops.ms_deform_attn``)
    deformable_layers    Deformable DETR encoder/decoder layers and stacks (iterative box refinement)
    deformable_transformer  Deformable DETR transformer: level embeddings, reference points, two-stage
    heads                MLP box head and ``inverse_sigmoid``
    inplace              ReLU and masked fill in place only where autograd does not record them
    detr / deformable_detr  the two detectors (forward returns outputs, never a loss)
    matcher              Hungarian matcher (scipy ``linear_sum_assignment``)
    criterion            set criterion (classification, L1, GIoU, auxiliary and encoder losses)
    training_queries     training aids: the extra decoder queries of training mode (query groups, one-to-many,
                         denoising), their attention mask and how their outputs split; training-only parameters
    denoising            DN-DETR / DINO denoising queries: noised copies of the targets
    postprocess          model outputs -> detections in pixels; ``predict``, the one inference path
    detection_params     score threshold, max detections, box format: their defaults and their checks
    inputs               input checks; padding a list of images into one batch plus its padding mask
    export               the inference path as ONNX
    build                model settings (``ModelConfig``) -> modules (the only place here that reads a config
                         section; it never receives the whole ``Config``)

Loading a model from a checkpoint and converting other implementations' checkpoints live one layer
up, in ``detr.checkpoints``.

Targets, wherever a loss or matcher takes them, are a list with one dict per image:
``"labels"`` int64 [N] contiguous class ids and ``"boxes"`` float [N, 4] normalized cxcywh.
"""
