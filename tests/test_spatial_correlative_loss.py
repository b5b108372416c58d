"""SpatialCorrelativeLoss / StructureLoss: FSeSim and LSeSim variants, VGG16 loading, config."""

import pytest
import torch
import torch.nn as nn

import fastinpaint.functional as FI
from fastinpaint.losses import SpatialCorrelativeLoss, StructureLoss, VGG16Features
from fastinpaint.losses.spatial_correlative import VGG16_LAYERS


class TinyExtractor(nn.Module):
    """Two feature layers: (B, 8, H, W) and (B, 40, H/2, W/2)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 40, 3, stride=2, padding=1)

    def forward(self, x):
        fa = torch.relu(self.a(x))
        return [fa, torch.relu(self.b(fa))]


def test_fixed_variant_gradients_reach_the_prediction_only():
    ext = TinyExtractor()
    loss_fn = SpatialCorrelativeLoss(ext, mode="cos", patch_size=5, num_queries=32)
    target = torch.rand(2, 3, 16, 16) * 2 - 1
    pred = (target + 0.3 * torch.randn_like(target)).requires_grad_()
    loss = loss_fn(pred, target)
    assert loss.ndim == 0 and torch.isfinite(loss) and loss.item() > 0
    loss.backward()
    assert pred.grad is not None and pred.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in ext.parameters())
    # identical images: no structural distance
    assert loss_fn(target, target).abs().item() < 1e-5
    l1 = SpatialCorrelativeLoss(ext, mode="l1", patch_size=5, num_queries=32)
    assert l1(target, target).abs().item() < 1e-6


def test_layer_weights_and_same_queries_per_layer():
    ext = TinyExtractor()
    gen_seed = 5
    loss_fn = SpatialCorrelativeLoss(ext, patch_size=4, num_queries=20, layer_weights=[0.25, 2.0],
                                     generator=torch.Generator().manual_seed(gen_seed))
    target, pred = torch.rand(1, 3, 12, 12), torch.rand(1, 3, 12, 12)
    got = loss_fn(pred, target)
    g = torch.Generator().manual_seed(gen_seed)
    fs, ft = ext(target), ext(pred)
    expected = 0.0
    for w, a, b in zip([0.25, 2.0], fs, ft):
        index = FI.sample_query_index(a.shape[2], a.shape[3], 20, generator=g)
        expected = expected + w * FI.spatial_correlative_distance(a, b, index, patch_size=4, mode="cos")
    torch.testing.assert_close(got, expected)
    with pytest.raises(ValueError, match="layer_weights has 3 entries for 2 layers"):
        SpatialCorrelativeLoss(ext, layer_weights=[1, 1, 1])(pred, target)


def test_learned_variant_heads_and_infonce_training():
    torch.manual_seed(0)
    ext = TinyExtractor()
    loss_fn = SpatialCorrelativeLoss(ext, channels=[8, 40], learned=True, patch_size=4, num_queries=24)
    assert [h[0].out_channels for h in loss_fn.heads] == [32, 32]  # max(32, C // 4)
    assert loss_fn.heads[1][0].in_channels == 40 and isinstance(loss_fn.heads[0][1], nn.ReLU)
    image = torch.rand(2, 3, 16, 16) * 2 - 1
    opt = torch.optim.Adam(loss_fn.head_parameters(), lr=1e-2)
    first = None
    for _ in range(15):
        opt.zero_grad()
        nce = loss_fn.head_loss(image, augmented=image * 0.8 + 0.1)
        nce.backward()
        assert all(p.grad is None for p in ext.parameters())
        opt.step()
        first = nce.item() if first is None else first
    assert nce.item() < first  # the heads learn to tell the queries apart
    pred = image.clone().requires_grad_()
    loss_fn(pred, image * 0.5).backward()
    assert pred.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="learned=True needs channels"):
        SpatialCorrelativeLoss(ext, learned=True)
    with pytest.raises(RuntimeError, match="head_loss needs learned=True"):
        SpatialCorrelativeLoss(ext).head_loss(image)


def test_info_mode_forward():
    loss_fn = SpatialCorrelativeLoss(TinyExtractor(), mode="info", patch_size=4, num_queries=16)
    x = torch.rand(1, 3, 12, 12, requires_grad=True)
    loss = loss_fn(x, torch.rand(1, 3, 12, 12))
    assert torch.isfinite(loss)
    loss.backward()


def _fake_vgg_checkpoint(path):
    """A checkpoint with torchvision's vgg16 key names and shapes (random values)."""
    state, cin, i = {}, 3, 0
    for v in [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]:
        if v == "M":
            i += 1
            continue
        state[f"features.{i}.weight"] = torch.randn(v, cin, 3, 3) * 0.05
        state[f"features.{i}.bias"] = torch.zeros(v)
        cin, i = v, i + 2
    state["classifier.0.weight"] = torch.zeros(1)
    torch.save(state, path)


def test_vgg16_missing_weights_names_the_file(tmp_path):
    missing = tmp_path / "vgg16-397923af.pth"
    with pytest.raises(FileNotFoundError, match="vgg16-397923af.pth.*never downloads"):
        VGG16Features(weights_path=str(missing))
    with pytest.raises(FileNotFoundError, match=str(missing)):
        SpatialCorrelativeLoss(vgg_weights=str(missing))


def test_vgg16_loads_a_torchvision_style_checkpoint(tmp_path):
    path = tmp_path / "vgg16.pth"
    _fake_vgg_checkpoint(path)
    vgg = VGG16Features(("relu4_1", "relu3_1"), weights_path=str(path))
    assert len(vgg.features) == VGG16_LAYERS["relu4_1"] + 1
    feats = vgg(torch.rand(1, 3, 32, 32) * 2 - 1)
    assert [tuple(f.shape) for f in feats] == [(1, 512, 4, 4), (1, 256, 8, 8)]
    assert vgg.channels == [512, 256] and not any(p.requires_grad for p in vgg.parameters())
    with pytest.raises(ValueError, match="layers must be names"):
        VGG16Features(("conv9",), weights_path=str(path))
    loss = StructureLoss.from_config({"variant": "learned", "patch_size": 3, "num_queries": 8,
                                      "layers": ["relu3_1"], "vgg_weights": str(path), "seed": 1})
    assert loss.learned and loss.heads[0][0].out_channels == 64
    x = torch.rand(1, 3, 32, 32, requires_grad=True)
    loss(x, torch.rand(1, 3, 32, 32)).backward()
    assert x.grad is not None


def test_structure_loss_from_config():
    ext = TinyExtractor()
    loss = StructureLoss.from_config({"mode": "l1", "patch_size": 4, "num_queries": 10, "seed": 3}, extractor=ext)
    assert not loss.learned and loss.mode == "l1" and loss.weight == 10.0 and loss.head_lr == 1e-4
    a, b = torch.rand(1, 3, 10, 10), torch.rand(1, 3, 10, 10)
    again = StructureLoss.from_config({"mode": "l1", "patch_size": 4, "num_queries": 10, "seed": 3}, extractor=ext)
    torch.testing.assert_close(loss(a, b), again(a, b))  # seeded query draws
    with pytest.raises(ValueError, match="unknown structure-loss config keys"):
        StructureLoss.from_config({"patchsize": 4}, extractor=ext)
    with pytest.raises(ValueError, match="variant must be"):
        StructureLoss.from_config({"variant": "both"}, extractor=ext)
    with pytest.raises(ValueError, match="mode must be"):
        StructureLoss.from_config({"mode": "l2"}, extractor=ext)


def test_extractor_returning_one_tensor_is_one_layer():
    """A single (B, C, H, W) tensor is taken as a one-layer list, in FSeSim and LSeSim alike."""
    conv = nn.Conv2d(3, 8, 3, padding=1)
    target, pred = torch.rand(2, 3, 12, 12), torch.rand(2, 3, 12, 12)
    single = SpatialCorrelativeLoss(conv, patch_size=4, num_queries=16, generator=torch.Generator().manual_seed(1))
    listed = SpatialCorrelativeLoss(lambda x: [conv(x)], patch_size=4, num_queries=16,
                                    generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(single(pred, target), listed(pred, target))
    learned = SpatialCorrelativeLoss(conv, channels=[8], learned=True, patch_size=4, num_queries=16)
    assert torch.isfinite(learned.head_loss(target)) and torch.isfinite(learned(pred, target))


@pytest.mark.parametrize("returns,says", [
    (lambda x: 3.0, r"returned an object of type float"),
    (lambda x: None, r"returned an object of type NoneType"),
    (lambda x: [], r"returned no feature map"),
    (lambda x: [x[0]], r"returned a tensor of shape \(3, 12, 12\) as feature map 0"),
    (lambda x: [x, x[:1]], r"returned a tensor of shape \(1, 3, 12, 12\) as feature map 1"),
    (lambda x: (x, "relu3"), r"returned an object of type str as feature map 1"),
])
def test_extractor_output_is_checked_with_a_clear_error(returns, says):
    x = torch.rand(2, 3, 12, 12)
    loss = SpatialCorrelativeLoss(returns, patch_size=4, num_queries=16)
    with pytest.raises((TypeError, ValueError), match=says) as info:
        loss(x, x)
    message = str(info.value)
    assert "the extractor <lambda>" in message and "list or tuple of (B, C, H, W) feature maps" in message
    learned = SpatialCorrelativeLoss(returns, channels=[3], learned=True, patch_size=4, num_queries=16)
    with pytest.raises((TypeError, ValueError), match=says):
        learned.head_loss(x)
