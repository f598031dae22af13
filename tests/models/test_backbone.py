"""ResNet backbone: levels, strides, masks, frozen BatchNorm, trainable stages, local weights, no download."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.ops import FrozenBatchNorm2d

from detr.config import ModelConfig, load_config
from detr.errors import CheckpointError, ConfigError
from detr.models.backbone import Backbone, FusedFrozenBatchNorm2d, conv_norm
from detr.models.build import build_criterion, build_model
from tests.models.conftest import random_targets, tiny_model_config


@pytest.mark.parametrize(
    ("name", "levels", "dilation", "strides", "channels"),
    [
        ("resnet18", 1, False, [32], [512]),
        ("resnet10", 3, False, [8, 16, 32], [128, 256, 512]),
        ("resnet34", 3, False, [8, 16, 32], [128, 256, 512]),
        ("resnet50", 3, False, [8, 16, 32], [512, 1024, 2048]),
        ("resnet101", 2, False, [16, 32], [1024, 2048]),
        ("resnet50", 1, True, [16], [2048]),
        ("resnet18", 2, True, [16, 16], [256, 512]),
    ],
)
def test_levels_strides_and_channels(name, levels, dilation, strides, channels):
    with torch.device("meta"):
        backbone = Backbone(name, num_levels=levels, dilation=dilation)
    assert backbone.strides == strides and backbone.num_channels == channels


def test_resnet10_is_resnet18_with_one_block_per_stage():
    """The first block of every ResNet-18 stage, the same module names: ResNet-18 weights minus each
    stage's second block load into it (``model.backbone.weights``)."""
    with torch.device("meta"):
        small, full = Backbone("resnet10", num_levels=3), Backbone("resnet18", num_levels=3)
    small_keys, full_keys = set(small.state_dict()), set(full.state_dict())
    assert small_keys < full_keys
    assert {k.split(".")[2] for k in full_keys - small_keys} == {"1"}  # body.layerN.1.*: the second blocks


def test_features_and_masks_per_level():
    backbone = Backbone("resnet18", num_levels=3, trainable_layers=0).eval()
    images = torch.randn(2, 3, 64, 128)
    mask = torch.zeros(2, 64, 128, dtype=torch.bool)
    mask[1, :, 64:] = True  # image 1 is 64x64, padded on the right
    mask[1, 32:, :] = True  # and 32 rows at the bottom
    out = backbone(images, mask)
    for (feature, level_mask), stride, c in zip(out, [8, 16, 32], [128, 256, 512]):
        assert feature.shape == (2, c, 64 // stride, 128 // stride)
        assert level_mask.shape == (2, 64 // stride, 128 // stride) and level_mask.dtype == torch.bool
        assert not level_mask[0].any()
        expected = torch.ones_like(level_mask[1])
        expected[: 32 // stride, : 64 // stride] = False
        assert torch.equal(level_mask[1], expected)


def _stages_with_trainable_params(backbone: Backbone) -> set[str]:
    return {name.split(".")[0] for name, p in backbone.body.named_parameters() if p.requires_grad}


@pytest.mark.parametrize(
    ("trainable", "stages"),
    [
        (0, set()),
        (1, {"layer4"}),
        (3, {"layer2", "layer3", "layer4"}),
        (5, {"conv1", "layer1", "layer2", "layer3", "layer4"}),
    ],
)
def test_trainable_layers_freeze_the_lower_stages(trainable, stages):
    with torch.device("meta"):
        backbone = Backbone("resnet50", num_levels=1, trainable_layers=trainable)
    assert _stages_with_trainable_params(backbone) == stages


def test_fused_frozen_batchnorm_equals_torchvisions_in_value_and_gradient():
    """The one-pass form against torchvision's scale-and-shift, in float64: the output and the input's
    gradient agree to float64 rounding, the state dict keys are the same, and its gradient is exact
    (gradcheck)."""
    torch.manual_seed(0)
    reference, fused = FrozenBatchNorm2d(6), FusedFrozenBatchNorm2d(6)
    reference.weight.normal_(), reference.bias.normal_(), reference.running_mean.normal_()
    reference.running_var.uniform_(0.1, 3.0)
    assert fused.state_dict().keys() == reference.state_dict().keys()
    fused.load_state_dict(reference.state_dict())
    reference, fused = reference.double(), fused.double()
    x = torch.randn(3, 6, 5, 7, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(3, 6, 5, 7, dtype=torch.float64)
    (expected_grad,) = torch.autograd.grad(reference(x), x, grad)
    (got_grad,) = torch.autograd.grad(fused(x), x, grad)
    torch.testing.assert_close(fused(x), reference(x), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got_grad, expected_grad, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(fused, (x[:1, :, :2, :3].detach().requires_grad_(),))


def test_frozen_batchnorm_is_used_and_never_changes():
    backbone = Backbone("resnet18", num_levels=1, trainable_layers=5, frozen_batchnorm=True)
    norms = [m for m in backbone.modules() if isinstance(m, (nn.BatchNorm2d, FrozenBatchNorm2d))]
    assert norms and all(isinstance(m, FrozenBatchNorm2d) for m in norms)
    # Frozen BN has buffers only: every trainable parameter is a convolution weight.
    assert all(n.endswith("weight") and p.dim() == 4 for n, p in backbone.named_parameters())
    before = {k: v.clone() for k, v in backbone.state_dict().items() if "bn" in k or "downsample.1" in k}
    backbone.train()
    opt = torch.optim.SGD([p for p in backbone.parameters() if p.requires_grad], lr=0.1)
    feature, _ = backbone(torch.randn(2, 3, 64, 64) * 5 + 3, torch.zeros(2, 64, 64, dtype=torch.bool))[0]
    feature.square().mean().backward()
    opt.step()
    after = backbone.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_plain_batchnorm_of_frozen_stages_stays_in_eval_mode():
    backbone = Backbone("resnet18", num_levels=1, trainable_layers=2, frozen_batchnorm=False)
    backbone.train()
    for name, module in backbone.body.named_modules():
        if isinstance(module, nn.BatchNorm2d):
            assert module.training == name.startswith(("layer3", "layer4")), name
    frozen_stats = backbone.body.layer1[0].bn1.running_mean.clone()
    backbone(torch.randn(2, 3, 64, 64) + 1, torch.zeros(2, 64, 64, dtype=torch.bool))
    assert torch.equal(backbone.body.layer1[0].bn1.running_mean, frozen_stats)
    assert not backbone.body.layer4[0].bn1.running_mean.eq(0).all()  # a training stage updates its stats


def test_local_weights_are_loaded(tmp_path):
    torch.manual_seed(1)
    reference = torchvision.models.resnet18(weights=None)
    path = tmp_path / "resnet18.pth"
    torch.save(reference.state_dict(), path)  # with fc.* and num_batches_tracked, as torchvision's files
    backbone = Backbone("resnet18", num_levels=3, weights=path)
    state = backbone.body.state_dict()
    for key, value in reference.state_dict().items():
        if key.startswith("fc.") or key.endswith("num_batches_tracked"):
            continue
        assert torch.equal(state[key], value), key
    wrapped = tmp_path / "wrapped.pth"
    torch.save({"state_dict": reference.state_dict(), "epoch": torch.tensor(3)}, wrapped)
    assert torch.equal(Backbone("resnet18", weights=wrapped).body.conv1.weight, reference.conv1.weight)


def test_weights_through_the_config(tmp_path):
    path = tmp_path / "r18.pth"
    reference = torchvision.models.resnet18(weights=None)
    torch.save(reference.state_dict(), path)
    config = ModelConfig.model_validate({"backbone": {"name": "resnet18", "weights": str(path)}, "hidden_dim": 64,
                                         "nheads": 4, "enc_layers": 1, "dec_layers": 1})
    model = build_model(config, 3)
    assert torch.equal(model.backbone[0].body.layer4[1].conv2.weight, reference.layer4[1].conv2.weight)


def test_missing_weights_file_names_it(tmp_path):
    missing = tmp_path / "nope" / "resnet50.pth"
    with pytest.raises(CheckpointError, match=r"nope/resnet50\.pth.*not found"):
        Backbone("resnet50", weights=missing)


def test_weights_of_another_architecture_are_rejected(tmp_path):
    path = tmp_path / "r34.pth"
    torch.save(torchvision.models.resnet34(weights=None).state_dict(), path)
    with pytest.raises(CheckpointError, match=r"r34\.pth does not fit.*missing keys|r34\.pth.*wrong shape"):
        Backbone("resnet18", weights=path)
    path50 = tmp_path / "r50.pth"
    torch.save(torchvision.models.resnet50(weights=None).state_dict(), path50)
    with pytest.raises(CheckpointError, match=r"r50\.pth"):
        Backbone("resnet18", weights=path50)


@pytest.mark.parametrize("content", [b"not a checkpoint", b""])
def test_unreadable_weights_file_is_a_checkpoint_error(tmp_path, content):
    path = tmp_path / "bad.pth"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=r"bad\.pth: cannot read"):
        Backbone("resnet18", weights=path)


def test_non_state_dict_is_rejected(tmp_path):
    path = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], path)
    with pytest.raises(CheckpointError, match="expected a torchvision ResNet state dict"):
        Backbone("resnet18", weights=path)


@pytest.mark.parametrize("name", ["resnet10", "resnet18", "resnet34", "resnet50"])
def test_dilated_layer4_at_even_positions_is_the_strided_network(name):
    """Dilation is the a-trous form of the stride: with the same weights, in eval mode, the stride-16
    map at every second position equals the stride-32 map. torchvision dilates resnet50 itself (the
    check of the test); resnet18/34 are dilated by the backbone."""
    torch.manual_seed(0)
    strided = Backbone(name, trainable_layers=0, frozen_batchnorm=False).eval()
    dilated = Backbone(name, trainable_layers=0, frozen_batchnorm=False, dilation=True).eval()
    for module in strided.modules():  # non-trivial statistics, so BatchNorm is not the identity
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    dilated.load_state_dict(strided.state_dict())
    strided, dilated = strided.double(), dilated.double()  # dilated and strided convs round differently
    images = torch.randn(1, 3, 128, 96, dtype=torch.float64)
    mask = torch.zeros(1, 128, 96, dtype=torch.bool)
    with torch.no_grad():
        [(coarse, _)] = strided(images, mask)
        [(fine, fine_mask)] = dilated(images, mask)
    assert coarse.shape[-2:] == (4, 3) and fine.shape[-2:] == (8, 6) and fine_mask.shape[-2:] == (8, 6)
    torch.testing.assert_close(fine[..., ::2, ::2], coarse, rtol=1e-10, atol=1e-10)
    assert not torch.allclose(fine[..., 1::2, 1::2], coarse, atol=1e-3)  # the new positions are new


def test_nothing_is_downloaded(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError(f"download attempted: {args}")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", forbidden)
    monkeypatch.setattr(torch.hub, "download_url_to_file", forbidden)
    monkeypatch.setattr(torchvision.models.WeightsEnum, "get_state_dict", forbidden)
    for name in ("resnet10", "resnet18", "resnet34", "resnet50", "resnet101"):
        for arch in ("detr", "deformable_detr"):
            config = load_config(None, [f"model.backbone.name={name}", f"model.arch={arch}"])
            with torch.device("meta"):
                build_model(config.model, 2)


@pytest.mark.parametrize("variant", ["detr_two_stage", "deformable_two_stage"])
def test_channels_last_is_the_same_model(variant):
    """``model.backbone.channels_last`` changes the memory layout only: with the same weights, the
    whole model's outputs and parameter gradients equal the default layout's (float64, trainable
    BatchNorm in training mode), the state dicts are interchangeable, and the ResNet's weights and
    features really are channels-last."""
    def build(channels_last: bool) -> nn.Module:
        torch.manual_seed(0)
        config = tiny_model_config(variant, backbone={"name": "resnet18", "trainable_layers": 5,
                                                      "frozen_batchnorm": False, "channels_last": channels_last})
        return build_model(config, 3).double().train(), config

    (plain, config), (nhwc, _) = build(False), build(True)
    nhwc.load_state_dict(plain.state_dict())
    body = nhwc.backbone[0]
    assert body.channels_last and not plain.backbone[0].channels_last
    assert body.body.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert not body.body.conv1.weight.is_contiguous()
    images = torch.randn(2, 3, 64, 96, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    features = body(images, torch.zeros(2, 64, 96, dtype=torch.bool))
    assert features[-1][0].is_contiguous(memory_format=torch.channels_last)

    criterion = build_criterion(config, 3).double()
    targets = random_targets([2, 3], 3)
    targets = [{k: v.double() if v.is_floating_point() else v for k, v in t.items()} for t in targets]
    results = []
    for model in (plain, nhwc):
        outputs = model(images)
        terms = criterion(outputs, targets)
        loss = sum(terms[k] * criterion.weight_dict[k] for k in terms if k in criterion.weight_dict)
        model.zero_grad()
        loss.backward()
        results.append((outputs, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    (out_plain, grads_plain), (out_nhwc, grads_nhwc) = results
    for key in ("pred_logits", "pred_boxes"):
        torch.testing.assert_close(out_nhwc[key], out_plain[key], rtol=1e-9, atol=1e-9)
    assert grads_nhwc.keys() == grads_plain.keys() and len(grads_plain) > 50
    for name, grad in grads_plain.items():
        torch.testing.assert_close(grads_nhwc[name], grad, rtol=1e-7, atol=1e-9, msg=name)
    # Interchangeable checkpoints: the channels-last weights load into a default-layout model.
    plain_again, _ = build(False)
    plain_again.load_state_dict(nhwc.state_dict())
    assert plain_again.backbone[0].body.conv1.weight.is_contiguous()


def _randomize_norms(module: nn.Module, generator: torch.Generator) -> None:
    """Statistics and affine parameters far from the identity, so that a wrong fold shows."""
    for norm in module.modules():
        if isinstance(norm, (nn.BatchNorm2d, FrozenBatchNorm2d)):
            for tensor in (norm.weight, norm.bias, norm.running_mean):
                tensor.data.copy_(torch.randn(tensor.shape, generator=generator))
            norm.running_var.copy_(torch.rand(norm.running_var.shape, generator=generator) * 2 + 0.1)


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
@pytest.mark.parametrize(("frozen_batchnorm", "trainable", "mode"),
                         [(True, 5, "train"), (False, 5, "eval"), (False, 2, "train")])
def test_folded_norms_are_torchvisions_resnet(name, frozen_batchnorm, trainable, mode):
    """Each conv with its frozen or eval-mode norm runs folded where that pays (``conv_norm``): in float64
    the features of layer2-4 and the gradients of every trainable parameter (BatchNorm affine ones
    included) equal torchvision's own ResNet with the same weights, and a BatchNorm in training mode
    (the top stages with ``trainable=2``) still normalizes by its batch and updates its statistics as
    torchvision's."""
    generator = torch.Generator().manual_seed(0)
    ours = Backbone(name, num_levels=3, trainable_layers=trainable, frozen_batchnorm=frozen_batchnorm).double()
    _randomize_norms(ours, generator)
    norm_layer = FrozenBatchNorm2d if frozen_batchnorm else nn.BatchNorm2d
    resnet = getattr(torchvision.models, name)(weights=None, norm_layer=norm_layer).double()
    resnet.load_state_dict(ours.body.state_dict(), strict=False)  # all but fc
    for param_name, param in resnet.named_parameters():
        param.requires_grad_(param_name.startswith(ours.trainable_prefixes))
    reference = IntermediateLayerGetter(resnet, return_layers={"layer2": "0", "layer3": "1", "layer4": "2"})
    ours.train(mode == "train")
    reference.train(mode == "train")
    for module_name, module in reference.named_modules():  # Backbone.train keeps frozen stages' stats
        if isinstance(module, nn.BatchNorm2d) and not module_name.startswith(ours.trainable_prefixes):
            module.eval()
    norm_calls = []
    for module in ours.modules():
        if isinstance(module, (nn.BatchNorm2d, FrozenBatchNorm2d)):
            module.register_forward_hook(lambda m, args, out: norm_calls.append(m))

    images = torch.randn(2, 3, 64, 96, dtype=torch.float64, generator=generator)
    features = [f for f, _ in ours(images, torch.zeros(2, 64, 96, dtype=torch.bool))]
    expected = list(reference(images).values())
    weights = [torch.randn(f.shape, dtype=torch.float64, generator=generator) for f in expected]
    ours_params = [p for p in ours.body.parameters() if p.requires_grad]
    ref_params = [p for p in reference.parameters() if p.requires_grad]
    assert [p.shape for p in ours_params] == [p.shape for p in ref_params] and ours_params
    ours_grads = torch.autograd.grad(sum((f * w).sum() for f, w in zip(features, weights)), ours_params)
    ref_grads = torch.autograd.grad(sum((f * w).sum() for f, w in zip(expected, weights)), ref_params)

    # 50 layers of random norms grow the values; the tolerances are float64 rounding relative to them.
    for got, want in list(zip(features, expected)) + list(zip(ours_grads, ref_grads)):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11 * want.abs().max().item())
    training_norms = {m for m in ours.modules() if isinstance(m, nn.BatchNorm2d) and m.training}
    assert training_norms <= set(norm_calls)  # never folded
    assert bool(training_norms) == (mode == "train" and not frozen_batchnorm)
    stem_and_layer1 = {m for name, m in ours.body.named_modules() if name.startswith(("bn1", "layer1"))}
    if trainable < 4:  # frozen stages fold (their weights need no gradient)
        assert not stem_and_layer1 & set(norm_calls)
    for (key, got), want in zip(ours.body.state_dict().items(), reference.state_dict().values()):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12, msg=key)  # running statistics too


def test_a_training_weight_is_folded_only_where_its_output_map_is_larger_than_it():
    """The fold of a weight that trains is recomputed every step, forward and backward (a pass over the
    weight); the norm's passes run over the output map. So a training conv folds when its output has
    at least as many elements as its weight; without gradients for the weights it always folds (and
    keeps the fold). The result is the two-step one either way (float64)."""
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 16, 3, padding=1, bias=False).double()  # weight: 2304 elements
    norm = FusedFrozenBatchNorm2d(16).double()
    norm.weight.normal_(), norm.bias.normal_(), norm.running_mean.normal_(), norm.running_var.uniform_(0.5, 2)
    calls = []
    norm.register_forward_hook(lambda m, args, out: calls.append(out.shape))
    small, large = torch.randn(1, 16, 8, 8, dtype=torch.float64), torch.randn(1, 16, 16, 16, dtype=torch.float64)

    def check(x: torch.Tensor, norm_runs: bool) -> None:
        calls.clear()
        got = conv_norm(x, conv, norm)
        assert bool(calls) == norm_runs
        calls.clear()
        torch.testing.assert_close(got, norm(conv(x)), rtol=1e-12, atol=1e-12)

    check(small, norm_runs=True)  # output 1024 < 2304: the norm's passes are cheaper
    check(large, norm_runs=False)  # output 4096 >= 2304
    with torch.no_grad():
        check(small, norm_runs=False)
    conv.weight.requires_grad_(False)  # a frozen stage
    check(small, norm_runs=False)


def test_folded_weights_are_kept_for_inference_until_a_weight_changes():
    """Without autograd the fold is computed once and reused; a weight or statistic changed in place or
    loaded from a state dict is folded anew (the output stays torchvision's), and with autograd on the
    kept fold is not used: gradients reach the weights."""
    generator = torch.Generator().manual_seed(0)
    ours = Backbone("resnet18", num_levels=1, trainable_layers=3).double().eval()
    _randomize_norms(ours, generator)
    reference = IntermediateLayerGetter(torchvision.models.resnet18(weights=None, norm_layer=FrozenBatchNorm2d),
                                        return_layers={"layer4": "0"}).double().eval()
    images = torch.randn(1, 3, 64, 64, dtype=torch.float64, generator=generator)
    mask = torch.zeros(1, 64, 64, dtype=torch.bool)

    def check() -> None:
        reference.load_state_dict(ours.body.state_dict())
        with torch.no_grad():
            expected = reference(images)["0"]
            torch.testing.assert_close(ours(images, mask)[0][0], expected, rtol=1e-9,
                                       atol=1e-11 * expected.abs().max().item())

    norm = ours.body.layer4[1].bn2
    check()
    first = norm.__dict__["_folded_conv"][1]
    check()
    assert norm.__dict__["_folded_conv"][1] is first  # reused, not folded again
    with torch.no_grad():
        ours.body.layer4[1].conv2.weight.mul_(-2.0)
        norm.running_var.mul_(3.0)
    check()
    assert norm.__dict__["_folded_conv"][1] is not first
    state = ours.state_dict()
    state["body.layer4.1.bn2.bias"] = torch.randn(state["body.layer4.1.bn2.bias"].shape, dtype=torch.float64,
                                                  generator=generator)
    ours.load_state_dict(state)
    check()
    feature = ours(images, mask)[0][0]  # autograd on: computed from the weights themselves
    (grad,) = torch.autograd.grad(feature.sum(), ours.body.layer4[1].conv2.weight)
    assert grad.abs().sum() > 0
    assert "_folded_conv" not in str(list(ours.state_dict()))
