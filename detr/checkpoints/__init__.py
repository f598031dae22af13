"""The checkpoint: what hands work from training to evaluation, export and serving.

Modules:
    format           the file: written atomically, read with ``weights_only=True``, kind and format
                     version checked; the training run's directory of step and best checkpoints
    load             ``detr.load_model``: a checkpoint in, (model in eval mode, config, label map) out
    convert          ``detr.convert_checkpoint``: official DETR / Deformable-DETR and Hugging Face
                     checkpoints into this package's format, optionally onto another label map
    convert_sources  reading official checkpoints; the official COCO class list
    convert_hf       reading Hugging Face ``transformers`` checkpoints (safetensors or torch files)
    convert_arch     the model config an official or Hugging Face checkpoint implies

This layer sits on top of ``detr.models`` (it builds the model a checkpoint describes) and below
``detr.engine`` (training writes checkpoints); it never sees a training loop or MLflow.
"""
