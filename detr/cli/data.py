"""`detr data synth|convert|stats|show`: generate, convert and inspect datasets."""

from __future__ import annotations

from pathlib import Path

from detr.cli.common import _command
from detr.errors import DetrError

FORMATS = ("coco", "voc", "yolo", "kitti")
FORMAT_HELP = "auto, coco, voc, yolo, kitti, datumaro:<fmt>, a format plugin's name or package.module:Class"


def _add_data_commands(commands) -> None:
    data = commands.add_parser("data", help="generate, convert, inspect datasets").add_subparsers(
        dest="data_command", metavar="<data command>", required=True
    )

    p = _command(
        data,
        "synth",
        "generate the synthetic shapes dataset (deterministic for a seed)",
        ["detr data synth --format coco --out data/synth --images 200 --seed 0",
         "detr data synth --format kitti --out data/synth_kitti --images 50 --seed 1 --size 320x240"],
    )
    p.add_argument("--format", choices=FORMATS, default="coco")
    p.add_argument("--out", type=Path, required=True, help="output directory (created)")
    p.add_argument("--images", type=int, default=200, help="number of images (split train/val)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", default="320x320", help="image size WIDTHxHEIGHT (default 320x320)")
    p.add_argument("--val-fraction", type=float, default=0.2, help="fraction of images in the val split")
    p.set_defaults(func=_cmd_data_synth)

    p = _command(
        data,
        "convert",
        "convert a dataset between formats (annotations rewritten, images copied or linked)",
        ["detr data convert data/voc --from voc --to coco --out data/voc_as_coco",
         "detr data convert data/synth --from auto --to yolo --out data/synth_yolo"],
    )
    p.add_argument("path", type=Path)
    p.add_argument("--from", dest="src_format", default="auto", help=FORMAT_HELP)
    p.add_argument("--to", dest="dst_format", required=True, help=FORMAT_HELP + " (one that can be written)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--split", default=None, help="source split to convert (default: all splits)")
    p.set_defaults(func=_cmd_data_convert)

    for name, help_text, examples in (
        ("stats", "class counts, objects per image and box sizes of a dataset or a config's view",
         ["detr data stats data/synth", "detr data stats --config configs/data_kitti_cars.yaml --split train"]),
        ("show", "draw one image with its boxes and save it as PNG",
         ["detr data show data/synth --index 3 --out sample.png"]),
    ):
        p = _command(data, name, help_text, examples)
        p.add_argument("path", type=Path, nargs="?", help="dataset directory (or use --config)")
        p.add_argument("--format", default="auto", help=FORMAT_HELP)
        p.add_argument("--split", default=None, help="split (dataset split, or train|val with --config)")
        p.add_argument("--config", type=Path, help="take the sources, labels and view from a config")
        p.add_argument("-o", "--override", action="append", default=[], metavar="KEY=VALUE")
        if name == "stats":
            p.add_argument("--plot", type=Path,
                           help="also save the box-size histogram as PNG (and the health plot as <name>_health.png)")
            p.add_argument("--stride", type=int, default=32,
                           help="the model's finest output stride for the small-box check (DETR 32, "
                                "DETR-DC5 16, Deformable DETR with 3+ levels 8; default 32)")
            p.set_defaults(func=_cmd_data_stats)
        else:
            p.add_argument("--index", type=int, default=0)
            p.add_argument("--out", type=Path, required=True)
            p.set_defaults(func=_cmd_data_show)


def _dataset_from_args(args):
    from detr.data import load_dataset, load_split

    if args.config is not None:
        if args.path is not None:
            raise DetrError("give either a dataset path or --config, not both")
        from detr.config import load_config

        config = load_config(args.config, args.override)
        split = args.split or "train"
        if split not in ("train", "val"):
            raise DetrError(f"--split with --config must be 'train' or 'val', got {split!r}")
        return load_split(config.data, split)
    if args.path is None:
        raise DetrError("give a dataset path or --config")
    return load_dataset(args.path, format=args.format, split=args.split)


def _cmd_data_synth(args) -> None:
    from detr.data.synth import generate_synthetic_dataset

    width, height = _parse_size(args.size)
    out = generate_synthetic_dataset(
        args.out,
        format=args.format,
        num_images=args.images,
        seed=args.seed,
        image_size=(width, height),
        val_fraction=args.val_fraction,
    )
    print(f"wrote {args.images} images in {args.format} format to {out}")


def _cmd_data_convert(args) -> None:
    from detr.data.convert import convert_dataset

    report = convert_dataset(args.path, args.out, src_format=args.src_format, dst_format=args.dst_format,
                             split=args.split)
    print(report)


def _cmd_data_stats(args) -> None:
    from detr.data.health import compute_health, plot_health
    from detr.data.stats import compute_stats, plot_box_sizes

    dataset = _dataset_from_args(args)
    stats = compute_stats(dataset)
    health = compute_health(dataset, stride=args.stride)
    print(stats.format())
    print()
    print(health.format())
    if args.plot is not None:
        plot_box_sizes(stats, args.plot)
        health_plot = args.plot.with_name(f"{args.plot.stem}_health.png")
        plot_health(health, health_plot)
        print(f"box-size histogram saved to {args.plot}, health plot to {health_plot}")


def _cmd_data_show(args) -> None:
    from detr.data.show import save_drawn_record

    dataset = _dataset_from_args(args)
    path = save_drawn_record(dataset, args.index, args.out)
    print(f"saved {path}")


def _parse_size(text: str) -> tuple[int, int]:
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise DetrError(f"--size {text!r}: expected WIDTHxHEIGHT, e.g. 320x240") from None
    if width < 32 or height < 32:
        raise DetrError(f"--size {text!r}: width and height must be at least 32 pixels")
    return width, height
