"""`detr register`, `detr serve`, `detr predict`: from a checkpoint to a served model."""

from __future__ import annotations

import json
from pathlib import Path

from detr.cli.common import _command
from detr.errors import InvalidInputError
from detr.models.detection_params import BOX_FORMATS, DetectionParams

DEFAULT_PORT = 8000


def _add_serving_commands(commands) -> None:
    p = _command(commands, "register",
                 "log a checkpoint as a self-contained MLflow pyfunc model, register it and set an alias",
                 ["detr register outputs/checkpoints/best.pt --name shapes --alias champion",
                  "detr register best.pt --name shapes --run-id 0123abcd  # into that (training) run"])
    p.add_argument("checkpoint", type=Path)
    p.add_argument("--name", help="registered model name (without it the model is only logged)")
    p.add_argument("--alias", help="alias to point at the new version, e.g. champion (needs --name)")
    p.add_argument("--run-id", help="log into this run (default: the run that trained the checkpoint, if "
                                    "recorded in it, else a new run)")
    p.set_defaults(func=_cmd_register)

    p = _command(commands, "serve",
                 "serve a model over REST: a try-it page at /, /model/predict (image upload), /model/metadata, "
                 "/model/labels, /health/live, /health/ready, /metrics, /docs",
                 ["detr serve models:/shapes@champion --port 8000",
                  "detr serve outputs/checkpoints/best.pt",
                  "curl -F image=@photo.jpg 'http://127.0.0.1:8000/model/predict?score_threshold=0.3'"])
    p.add_argument("model", help="checkpoint file or MLflow model URI (models:/<name>@<alias>, runs:/<id>/model)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT)
    p.add_argument("--max-body-mb", type=float, default=32.0, help="largest request body accepted (MB)")
    p.add_argument("--max-images", type=int, help="most images in one request (default 16, as the pyfunc model)")
    p.add_argument("--max-batch-size", type=int,
                   help="most images in one forward pass shared by concurrent requests (default 8)")
    p.add_argument("--max-batch-wait-ms", type=float, default=5.0,
                   help="how long a request's images wait for others to share their forward pass (default 5)")
    p.add_argument("--batch-workers", type=int,
                   help="batches run at once (default 2: the next batch starts while one runs)")
    p.add_argument("--no-batching", dest="batching", action="store_false",
                   help="run each request on its own (its images still share forward passes)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.set_defaults(func=_cmd_serve)

    p = _command(commands, "predict", "detect objects in image files with a checkpoint or MLflow model",
                 ["detr predict models:/shapes@champion photo.jpg --score-threshold 0.3",
                  "detr predict best.pt images/*.png --json detections.json --draw outputs/drawn"])
    p.add_argument("model", help="checkpoint file or MLflow model URI")
    p.add_argument("images", type=Path, nargs="+")
    defaults = DetectionParams()
    p.add_argument("--score-threshold", type=float,
                   help=f"keep detections scoring at least this (default {defaults.score_threshold})")
    p.add_argument("--max-detections", type=int,
                   help=f"at most this many per image, best first (default {defaults.max_detections})")
    p.add_argument("--box-format", choices=BOX_FORMATS,
                   help=f"xyxy corners, xywh (COCO) or cxcywh, in pixels of the image (default {defaults.box_format})")
    p.add_argument("--json", type=Path, help="write the detections to this file (default: print them)")
    p.add_argument("--draw", type=Path, metavar="DIR", help="also save each image with its detections drawn")
    p.set_defaults(func=_cmd_predict)


def _cmd_register(args) -> None:
    from deploy.packaging import log_detr_model
    from detr.tracking import resolve_tracking_uri, use_tracking_uri

    tracking_uri = use_tracking_uri(None)
    logged = log_detr_model(args.checkpoint, registered_name=args.name, alias=args.alias, run_id=args.run_id)
    print(f"logged {args.checkpoint} as {logged.model_uri} in run {logged.run_id} ({resolve_tracking_uri()})")
    if logged.registered_name:
        alias = f", alias {logged.alias!r}" if logged.alias else ""
        print(f"registered as {logged.registered_name!r} version {logged.version}{alias}")
    print("serve it with either of:")
    print(f"  mlflow models serve -m {logged.serving_uri} --env-manager local --port 5000")
    print(f"  detr serve {logged.serving_uri} --port {DEFAULT_PORT}")
    if not tracking_uri.startswith(("http://", "https://")):
        print(f"(with MLFLOW_TRACKING_URI={tracking_uri} set for `mlflow models serve` outside this directory)")


def _cmd_serve(args) -> None:
    import uvicorn

    from deploy.app import create_app, load_detector
    from deploy.batching import DEFAULT_MAX_BATCH_SIZE, DEFAULT_WORKERS
    from deploy.images import DEFAULT_MAX_IMAGES
    from deploy.metrics import model_identity
    from detr.tracking import use_tracking_uri

    args.max_images = DEFAULT_MAX_IMAGES if args.max_images is None else args.max_images
    args.max_batch_size = DEFAULT_MAX_BATCH_SIZE if args.max_batch_size is None else args.max_batch_size
    args.batch_workers = DEFAULT_WORKERS if args.batch_workers is None else args.batch_workers
    if args.max_body_mb <= 0 or args.max_images < 1:
        raise InvalidInputError("--max-body-mb must be positive and --max-images at least 1")
    if args.max_batch_size < 1 or args.batch_workers < 1 or args.max_batch_wait_ms < 0:
        raise InvalidInputError("--max-batch-size and --batch-workers must be at least 1 and --max-batch-wait-ms "
                                "not negative")
    use_tracking_uri(None)
    detector = load_detector(args.model, device=args.device)
    detector.batch_size = max(detector.batch_size, args.max_batch_size)
    app = create_app(detector, source=args.model, model_info=model_identity(args.model),
                     max_body_bytes=int(args.max_body_mb * 1024 * 1024), max_images=args.max_images,
                     batching=args.batching, max_batch_size=args.max_batch_size,
                     max_batch_wait_s=args.max_batch_wait_ms / 1000, batch_workers=args.batch_workers)
    print(f"serving {args.model} on http://{args.host}:{args.port} (try it: /, docs: /docs)", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")


def _cmd_predict(args) -> None:
    from deploy.app import load_detector
    from deploy.images import decode_image_bytes
    from detr.tracking import use_tracking_uri

    given = {"score_threshold": args.score_threshold, "max_detections": args.max_detections,
             "box_format": args.box_format}
    params = DetectionParams(**{k: v for k, v in given.items() if v is not None})
    for path in args.images:
        if not path.is_file():
            raise InvalidInputError(f"{path}: image file not found")
    use_tracking_uri(None)
    detector = load_detector(args.model)
    results = []
    for path in args.images:
        pixels = decode_image_bytes(path.read_bytes(), where=str(path))
        (record,) = detector.detect([pixels], params)
        results.append({"image": str(path), **record})
        if args.draw is not None:
            _draw(pixels, record, params.box_format, args.draw / f"{path.stem}.png")
    text = json.dumps(results, indent=2)
    if args.json is None:
        print(text)
    else:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")
        found = sum(len(r["scores"]) for r in results)
        print(f"wrote {found} detections in {len(results)} images to {args.json}")


def _draw(pixels, record: dict, box_format: str, out: Path) -> None:
    import torch
    from PIL import Image
    from torchvision.ops import box_convert
    from torchvision.utils import draw_bounding_boxes

    from detr.data.show import class_colour

    boxes = torch.tensor(record["boxes"], dtype=torch.float32).reshape(-1, 4)
    if box_format != "xyxy":
        boxes = box_convert(boxes, box_format, "xyxy")
    captions = [f"{name} {score:.2f}" for name, score in zip(record["labels"], record["scores"])]
    colours = [class_colour(i) for i in record["label_ids"]]
    # torchvision warns that "no box was drawn" for an empty list: an image without detections is
    # saved as it is.
    drawn = draw_bounding_boxes(pixels, boxes, labels=captions, colors=colours, width=2) if len(boxes) else pixels
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(drawn.permute(1, 2, 0).numpy()).save(out)
