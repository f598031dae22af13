"""The main job on the embedded defaults, behind `make demo`, `mlflow run .` and `detr demo`.

The generated shapes dataset -> training of the tiny Deformable DETR preset (7-9 minutes on
2 CPU cores) -> COCO and VOC evaluation of its best checkpoint, registered as the pyfunc model
``models:/shapes-demo@champion`` -> the commands that open the MLflow UI on the run and serve the model. Training and evaluation land in one MLflow run (under `mlflow run`, the project's).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from detr.errors import InvalidInputError

DEMO_CONFIG = Path("configs/deformable_detr_tiny.yaml")
DEMO_DATA = Path("data/synth_small")  # the dataset the tiny presets name
DEMO_IMAGES = 3700
DEMO_IMAGE_SIZE = (160, 160)  # (width, height): what the tiny presets train at
DEMO_VAL_FRACTION = 200 / 3700  # 3500 training and 200 validation images
DEMO_REGISTERED_MODEL = "shapes-demo"  # the best checkpoint is registered as models:/shapes-demo@champion


@dataclass(frozen=True)
class DemoResult:
    run_id: str | None
    tracking_uri: str
    checkpoint: Path
    metrics: dict[str, float]
    served_model_uri: str | None = None

    def ui_command(self) -> str:
        from detr.tracking import ui_command

        return ui_command(self.tracking_uri)


def ensure_demo_dataset(data: Path, *, images: int, seed: int) -> Path:
    """Generate the shapes dataset into ``data``, or reuse a complete one already there."""
    from detr.data.synth import generate_synthetic_dataset

    if data.exists() and any(data.iterdir()):
        missing = [split for split in ("train", "val") if not (data / "annotations" / f"{split}.json").is_file()]
        if missing:
            raise InvalidInputError(
                f"{data} exists but has no annotations/{missing[0]}.json: it is not a generated COCO dataset "
                "with train and val splits; remove it or pass another --data directory"
            )
        print(f"demo: reusing the dataset in {data} (remove it to generate it again)")
        return data
    generate_synthetic_dataset(data, format="coco", num_images=images, seed=seed, image_size=DEMO_IMAGE_SIZE,
                               val_fraction=DEMO_VAL_FRACTION)
    print(f"demo: generated {images} images ({DEMO_IMAGE_SIZE[0]}x{DEMO_IMAGE_SIZE[1]}) in {data}")
    return data


def run_demo(
    out: str | Path = "outputs/demo",
    *,
    data: str | Path = DEMO_DATA,
    images: int = DEMO_IMAGES,
    seed: int = 0,
    config_path: str | Path = DEMO_CONFIG,
    overrides: Sequence[str] = (),
    track: bool = True,
) -> DemoResult:
    """Run the whole demo; ``overrides`` apply to the preset after the demo's own data and output paths."""
    from detr.config import load_config
    from detr.data.formats import load_dataset
    from detr.data.show import save_drawn_record
    from detr.data.stats import compute_stats
    from detr.engine.diagnostics import save_report
    from detr.run import evaluate_checkpoint_report, train_from_config
    from detr.tracking import log_diagnostic_report, log_evaluation_to_run, resolve_tracking_uri

    out, data = Path(out), Path(data)
    out.mkdir(parents=True, exist_ok=True)
    ensure_demo_dataset(data, images=images, seed=seed)
    train_split = load_dataset(data, format="coco", split="train")
    print(compute_stats(train_split).format())
    print(f"demo: one annotated training image drawn to {save_drawn_record(train_split, 0, out / 'sample.png')}")

    checkpoint_dir = out / "checkpoints"
    previous = sorted(checkpoint_dir.glob("*.pt")) if checkpoint_dir.is_dir() else []
    if previous:  # the demo's own directory: a new demo starts afresh (training refuses to mix runs)
        print(f"demo: removing the previous demo's {len(previous)} checkpoints from {checkpoint_dir}")
        for path in previous:
            path.unlink()
    demo_paths = [
        f"data.train={{sources: [{{path: '{data}', format: coco, split: train}}]}}",
        f"data.val={{sources: [{{path: '{data}', format: coco, split: val}}]}}",
        f"train.checkpoint.dir={checkpoint_dir}",
        f"tracking.registered_model={DEMO_REGISTERED_MODEL}",
    ]
    config = load_config(config_path, [*demo_paths, *overrides])
    outcome = train_from_config(config, track=track)
    best = outcome.checkpoint_dir / "best.pt"
    checkpoint = best if best.is_file() else outcome.last_checkpoint
    if checkpoint is None:
        raise InvalidInputError(f"training wrote no checkpoint to {outcome.checkpoint_dir}")
    print(f"demo: evaluating {checkpoint}")
    metrics, report = evaluate_checkpoint_report(checkpoint, config=config, split="val")
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    print(report.summary())
    save_report(report, out / "report")
    print(f"demo: confusion matrix, error breakdown and worst images written to {out / 'report'}")
    tracking_uri = resolve_tracking_uri(config.tracking.tracking_uri)
    if outcome.run_id is not None:
        log_evaluation_to_run(metrics, outcome.run_id, checkpoint=checkpoint, split="val", tracking_uri=tracking_uri)
        log_diagnostic_report(report, outcome.run_id, artifact_dir="evaluate/val", log_metrics=False,
                              tracking_uri=tracking_uri)
    return DemoResult(run_id=outcome.run_id, tracking_uri=tracking_uri, checkpoint=checkpoint, metrics=metrics,
                      served_model_uri=outcome.served_model_uri)
