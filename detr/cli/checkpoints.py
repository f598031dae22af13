"""`detr convert` and `detr export`: checkpoints of other implementations in, ONNX out."""

from __future__ import annotations

from pathlib import Path

from detr.cli.common import _command
from detr.errors import DetrError


def _add_convert_command(commands) -> None:
    p = _command(commands, "convert",
                 "convert an official DETR / Deformable-DETR or Hugging Face checkpoint into this package's format",
                 ["detr convert detr-r50-e632da11.pth --source detr --out detr_r50_coco.pt",
                  "detr convert r50_deformable_detr-checkpoint.pth --source deformable_detr --out ddetr.pt "
                  "--classes car,person",
                  "detr convert ./detr-resnet-50 --source hf --out detr_hf.pt --labels labels.json",
                  "detr convert model.safetensors --source hf --hf-config config.json --out detr_hf.pt"])
    p.add_argument("src", type=Path, help="checkpoint file, or a Hugging Face model directory")
    p.add_argument("--source", required=True, choices=("detr", "deformable_detr", "hf"),
                   help="detr: facebookresearch/detr; deformable_detr: fundamentalvision/Deformable-DETR; "
                        "hf: transformers DetrForObjectDetection / DeformableDetrForObjectDetection")
    p.add_argument("--out", type=Path, required=True, help="the checkpoint to write")
    labels = p.add_mutually_exclusive_group()
    labels.add_argument("--labels", type=Path, metavar="JSON",
                        help="move to this label map (class heads re-initialised, rows of shared class names kept)")
    labels.add_argument("--classes", metavar="A,B,C", help="the same with the class names given inline")
    p.add_argument("--hf-config", type=Path, help="config.json of a Hugging Face weights file given on its own")
    p.set_defaults(func=_cmd_convert)

    p = _command(commands, "export", "export a checkpoint's inference path to ONNX (onnxruntime-ready)",
                 ["detr export outputs/checkpoints/best.pt --out model.onnx",
                  "detr export ddetr.pt --out ddetr.onnx --image-size 800x1216"])
    p.add_argument("checkpoint", type=Path)
    p.add_argument("--out", type=Path, required=True, help="the .onnx file to write")
    p.add_argument("--image-size", default="800x800", metavar="HxW",
                   help="example input size HEIGHTxWIDTH; Deformable DETR graphs accept only this size")
    p.add_argument("--opset", type=int, default=18)
    p.add_argument("--no-ema", action="store_true", help="export the raw weights even if the checkpoint has EMA")
    p.set_defaults(func=_cmd_export)


def _cmd_convert(args) -> None:
    from detr.data.labelmap import LabelMap
    from detr.checkpoints.convert import convert_with_report

    label_map = args.labels
    if args.classes is not None:
        names = [name.strip() for name in args.classes.split(",")]
        if not all(names):
            raise DetrError(f"--classes {args.classes!r}: expected comma-separated class names, e.g. car,person")
        label_map = LabelMap(tuple(names))
    report = convert_with_report(args.src, args.source, label_map, out=args.out, hf_config=args.hf_config)
    print(report)


def _cmd_export(args) -> None:
    from detr.models.export import export_onnx, supports_dynamic_image_size
    from detr.checkpoints.load import load_model

    try:
        height, width = (int(v) for v in args.image_size.lower().split("x"))
    except ValueError:
        raise DetrError(f"--image-size {args.image_size!r}: expected HEIGHTxWIDTH, e.g. 800x1216") from None
    model, _, label_map = load_model(args.checkpoint, use_ema=not args.no_ema)
    path = export_onnx(model, args.out, (height, width), opset=args.opset)
    labels = label_map.save(path.with_suffix(".labels.json"))
    size = "height, width" if supports_dynamic_image_size(model) else f"{height}, {width}"
    print(f"wrote {path} (input images [batch, 3, {size}]; outputs pred_logits, pred_boxes) and its label map "
          f"{labels}")
