"""Trainer options: gradient accumulation, bf16 autocast, fp16 on CPU, EMA weights."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from detr.checkpoints.format import load_checkpoint
from detr.checkpoints.load import load_model
from detr.config import load_config
from detr.engine import trainer as trainer_module
from detr.engine.callbacks import Callback
from detr.errors import DetrError
from detr.run import evaluate_checkpoint, train_from_config
from tests.engine.conftest import SMALL_NUM_TRAIN as NUM_TRAIN


def micro_config(data_dir: Path, checkpoint_dir: Path, **extra):
    """A micro DETR without batch-dependent layers: frozen BatchNorm, no dropout, one image size."""
    fixed_size = "{name: resize, args: {size: 64, max_size: 80}}"
    overrides = {
        "data.train": f"{{sources: [{{path: {data_dir}, format: coco, split: train}}]}}",
        "data.val": f"{{sources: [{{path: {data_dir}, format: coco, split: val}}]}}",
        "data.transforms.train": f"[{{name: random_horizontal_flip, args: {{p: 0.5}}}}, {fixed_size}, "
                                 "{name: normalize}]",
        "data.transforms.val": f"[{fixed_size}, {{name: normalize}}]",
        "model.backbone.name": "resnet18",
        "model.backbone.trainable_layers": 0,  # a frozen backbone: small optimizer state and checkpoints
        "model.backbone.frozen_batchnorm": "true",
        "model.hidden_dim": 32,
        "model.nheads": 4,
        "model.enc_layers": 1,
        "model.dec_layers": 2,
        "model.dim_feedforward": 64,
        "model.num_queries": 6,
        "model.dropout": 0.0,
        "train.batch_size": 4,
        "train.epochs": 1,
        "train.seed": 5,
        "train.device": "cpu",
        "train.checkpoint.dir": str(checkpoint_dir),
        "train.checkpoint.keep_last": 10,
        **extra,
    }
    return load_config(None, [f"{k}={v}" for k, v in overrides.items()])


def weights_at(checkpoint_dir: Path, step: int) -> dict[str, torch.Tensor]:
    return load_checkpoint(checkpoint_dir / f"step-{step:08d}.pt")["model"]


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a if a[k].is_floating_point())


class StepRecorder(Callback):
    """Keeps each step's losses and copies of chosen parameters after the step."""

    def __init__(self, names: tuple[str, ...] = ()) -> None:
        self.names = names
        self.losses: list[dict[str, float]] = []
        self.params: list[dict[str, torch.Tensor]] = []

    def on_step_end(self, trainer, state, losses) -> None:
        self.losses.append(dict(losses))
        named = dict(trainer.model.named_parameters())
        self.params.append({name: named[name].detach().clone() for name in self.names})


class BoxCounter(Callback):
    """Counts the target boxes of every micro-batch the model sees in training."""

    def __init__(self) -> None:
        self.counts: list[int] = []

    def on_train_start(self, trainer, state) -> None:
        trainer.criterion.register_forward_pre_hook(
            lambda module, args, kwargs: self.counts.append(sum(len(t["labels"]) for t in args[1])),
            with_kwargs=True)


DEFORMABLE_MICRO = {"model.arch": "deformable_detr", "model.deformable.n_levels": 2,
                    "model.deformable.n_points": 2, "model.deformable.with_box_refine": "true"}


class GradientRecorder(Callback):
    """Copies every parameter's gradient just before each optimizer step (after clipping)."""

    def __init__(self) -> None:
        self.steps: list[dict[str, torch.Tensor]] = []

    def on_train_start(self, trainer, state) -> None:
        step = trainer.optimizer.step

        def recording_step(*args, **kwargs):
            self.steps.append({name: p.grad.detach().clone() for name, p in trainer.model.named_parameters()
                               if p.grad is not None})
            return step(*args, **kwargs)

        trainer.optimizer.step = recording_step


@pytest.mark.filterwarnings("ignore:Seems like `optimizer.step\\(\\)` has been overridden")
@pytest.mark.parametrize("arch", ["detr", "deformable_detr"])
def test_two_accumulated_micro_batches_give_the_gradient_of_one_batch_of_both(small_synth_dir, tmp_path, arch):
    """accum 2 x batch 2 == batch 4, to float rounding, with micro-batches holding different box counts.

    DETR's cross-entropy (a weighted mean over predictions) and every box loss (divided by the box
    count) depend on the batch: averaging two micro-batches' own losses would weigh a box of the
    sparse micro-batch more. The criterion normalizes each micro-batch by the whole step instead.
    Gradients are compared, not weights: AdamW's first steps are about lr * sign(gradient), which
    turns rounding noise into full steps for parameters whose exact gradient is zero (a bias before
    GroupNorm, the key bias of attention).
    """
    extra = DEFORMABLE_MICRO if arch == "deformable_detr" else {}
    whole, accumulated = GradientRecorder(), GradientRecorder()
    train_from_config(micro_config(small_synth_dir, tmp_path / "whole", **extra), callbacks=[whole],
                      track=False, progress=False)
    counter = BoxCounter()
    outcome = train_from_config(
        micro_config(small_synth_dir, tmp_path / "accumulated", **{"train.batch_size": 2, "train.grad_accum_steps": 2},
                     **extra),
        callbacks=[counter, accumulated], track=False, progress=False)
    assert outcome.steps == NUM_TRAIN // 4 == len(whole.steps) == len(accumulated.steps)
    # The case this test is about: the two micro-batches of a step hold different numbers of boxes.
    assert counter.counts[0] != counter.counts[1] or counter.counts[2] != counter.counts[3], counter.counts
    for step, (expected, got) in enumerate(zip(whole.steps, accumulated.steps)):
        assert expected.keys() == got.keys()
        scale = max(float(g.abs().max()) for g in expected.values())
        gap = max(float((got[name] - expected[name]).abs().max()) for name in expected)
        assert gap <= 1e-5 * scale, (step, gap, scale)


def test_bf16_autocast_on_cpu_trains_with_finite_losses(small_synth_dir, tmp_path):
    recorder = StepRecorder()
    output_dtypes: list[torch.dtype] = []

    class WatchOutputs(Callback):
        def on_train_start(self, trainer, state) -> None:
            trainer.model.class_embed.register_forward_hook(lambda m, i, out: output_dtypes.append(out.dtype))

    outcome = train_from_config(micro_config(small_synth_dir, tmp_path, **{"train.amp": "bf16"}),
                                callbacks=[recorder, WatchOutputs()], track=False, progress=False)
    assert outcome.steps == 2 and len(recorder.losses) == 2
    assert all(math.isfinite(value) for losses in recorder.losses for value in losses.values()), recorder.losses
    assert output_dtypes and set(output_dtypes) == {torch.bfloat16}  # autocast was on, train and eval
    stored = load_checkpoint(outcome.last_checkpoint)["model"]
    assert all(v.dtype == torch.float32 for v in stored.values() if v.is_floating_point())  # fp32 master weights


def test_fp16_on_cpu_is_refused_with_the_alternatives(small_synth_dir, tmp_path):
    with pytest.raises(DetrError, match=r"train\.amp=fp16 needs a CUDA device; on CPU use train\.amp=bf16 or none"):
        train_from_config(micro_config(small_synth_dir, tmp_path, **{"train.amp": "fp16"}), track=False, progress=False)
    assert not list(tmp_path.glob("*.pt"))


def test_ema_weights_are_checkpointed_evaluated_and_loaded(small_synth_dir, tmp_path, monkeypatch):
    decay = 0.5  # far from 1 so the average is visibly not the last weights after 2 steps
    watched = ("class_embed.weight", "transformer.decoder.layers.0.linear1.weight")
    recorder = StepRecorder(watched)
    evaluated: list[dict[str, torch.Tensor]] = []
    original = trainer_module.evaluate_model

    def recording_evaluate(model, *args, **kwargs):
        evaluated.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        return original(model, *args, **kwargs)

    monkeypatch.setattr(trainer_module, "evaluate_model", recording_evaluate)
    outcome = train_from_config(micro_config(small_synth_dir, tmp_path, **{"train.ema.enabled": "true",
                                                                       "train.ema.decay": decay}),
                                callbacks=[recorder], track=False, progress=False)
    data = load_checkpoint(outcome.last_checkpoint)
    assert data["ema"] is not None
    ema = {k.removeprefix("module."): v for k, v in data["ema"].items() if k.startswith("module.")}
    assert ema.keys() == data["model"].keys()

    # The average by hand: the first update copies the weights, then e = decay * e + (1 - decay) * w.
    for name in watched:
        expected = recorder.params[0][name]
        for step in recorder.params[1:]:
            expected = decay * expected + (1 - decay) * step[name]
        torch.testing.assert_close(ema[name], expected, rtol=1e-6, atol=1e-7)
        assert torch.equal(data["model"][name], recorder.params[-1][name])
        assert not torch.allclose(ema[name], data["model"][name])

    # The end-of-epoch evaluation ran on the EMA weights, not the trained ones.
    assert len(evaluated) == 1
    assert all(torch.equal(evaluated[0][k], ema[k]) for k in ema)

    # load_model picks the EMA weights unless told otherwise.
    with_ema, _, _ = load_model(outcome.last_checkpoint)
    without, _, _ = load_model(outcome.last_checkpoint, use_ema=False)
    assert all(torch.equal(with_ema.state_dict()[k], ema[k]) for k in ema)
    assert all(torch.equal(without.state_dict()[k], data["model"][k]) for k in ema)

    # So evaluating the checkpoint reproduces what training reported.
    reported = evaluate_checkpoint(outcome.last_checkpoint, device="cpu", progress=False)
    for key, value in outcome.metrics.items():
        assert reported[key] == pytest.approx(value, abs=1e-6, nan_ok=True), key


@pytest.mark.parametrize("native_bf16", [True, False])
def test_auto_amp_is_bf16_only_where_the_cpu_computes_it(small_synth_dir, tmp_path, monkeypatch, native_bf16):
    """train.amp=auto trains in bfloat16 on a CPU with AMX or AVX512-BF16 and in float32 on one
    without (where bfloat16 operators would be slow emulations)."""
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: native_bf16)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    output_dtypes: list[torch.dtype] = []

    class WatchOutputs(Callback):
        def on_train_start(self, trainer, state) -> None:
            trainer.model.class_embed.register_forward_hook(lambda m, i, out: output_dtypes.append(out.dtype))

    train_from_config(micro_config(small_synth_dir, tmp_path, **{"train.amp": "auto"}),
                      callbacks=[WatchOutputs()], track=False, progress=False)
    assert output_dtypes and set(output_dtypes) == {torch.bfloat16 if native_bf16 else torch.float32}


def test_resolve_amp(monkeypatch):
    from detr.engine.amp import resolve_amp

    for amp in ("none", "bf16", "fp16"):
        assert resolve_amp(amp, torch.device("cpu")) == amp
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: not including_emulation)
    assert resolve_amp("auto", torch.device("cuda")) == "bf16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    assert resolve_amp("auto", torch.device("cuda")) == "none"  # emulated bfloat16 (before sm_80) is slow
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    assert resolve_amp("auto", torch.device("cpu")) == "bf16"
    with pytest.raises(ValueError, match="amp must be one of none, bf16, fp16, auto, got 'half'"):
        resolve_amp("half", torch.device("cpu"))
