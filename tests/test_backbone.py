"""levit.create_backbone with torchvision's detectors, default anchors and transforms."""

from __future__ import annotations

import pytest
import torch
from helpers import tiny_model

import levit


def _images():
    g = torch.Generator().manual_seed(0)
    return [torch.rand(3, 200, 260, generator=g), torch.rand(3, 180, 150, generator=g)]


def test_backbone_maps_strides_and_padding():
    bb = levit.create_backbone("levit_tiny").eval()
    assert bb.out_channels == 256 and bb.strides == [16, 32, 64, 128, 256]
    out = bb(torch.rand(2, 3, 100, 75))  # padded to 112 x 80 inside
    assert list(out) == ["0", "1", "2", "3", "pool"]
    assert [tuple(v.shape[-2:]) for v in out.values()] == [(7, 5), (4, 3), (2, 2), (1, 1), (1, 1)]
    assert all(v.shape[:2] == (2, 256) for v in out.values())
    plain = levit.create_backbone("levit_tiny", fpn=False)
    assert plain.out_channels == 64 and list(plain.eval()(torch.rand(1, 3, 64, 64))) == ["0"]
    assert not any(n.startswith("body.head") for n, _ in bb.named_parameters())


def test_backbone_loads_classification_weights(tmp_path):
    model = tiny_model(img_size=224)
    path = levit.save(model, tmp_path / "m.safetensors")
    bb = levit.create_backbone("levit_tiny", checkpoint=path).eval()
    x = torch.rand(1, 3, 64, 96)
    with torch.no_grad():
        want = model.forward_intermediates(x, intermediates_only=True)
        got = bb.body.forward_intermediates(x, intermediates_only=True)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    bb.train()  # BatchNorm statistics stay frozen in training, the rest trains
    assert all(not m.training for m in bb.body.modules() if isinstance(m, torch.nn.BatchNorm1d))
    assert bb.fpn.training


def test_faster_rcnn_trains_and_predicts_on_images_of_different_sizes():
    torch.manual_seed(0)
    from torchvision.models.detection import FasterRCNN  # imported here: a second of every worker's collection

    detector = FasterRCNN(levit.create_backbone("levit_tiny"), num_classes=3, min_size=128, max_size=192)
    targets = [
        {"boxes": torch.tensor([[10.0, 20.0, 100.0, 120.0]]), "labels": torch.tensor([1])},
        {"boxes": torch.tensor([[5.0, 5.0, 60.0, 90.0], [50.0, 40.0, 140.0, 170.0]]), "labels": torch.tensor([2, 1])},
    ]
    losses = detector.train()(_images(), targets)
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}
    sum(losses.values()).backward()
    grads = [p.grad for n, p in detector.backbone.body.named_parameters() if "stages.0" in n and p.requires_grad]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)  # the loss reaches the LeViT stages
    with torch.no_grad():
        out = detector.eval()(_images())
    assert len(out) == 2 and all(o["boxes"].shape[1] == 4 for o in out)
    # boxes are in the input images' own coordinates
    for o, img in zip(out, _images()):
        if len(o["boxes"]):
            assert o["boxes"][:, 2].max() <= img.shape[2] + 1e-3 and o["boxes"][:, 3].max() <= img.shape[1] + 1e-3


def test_retinanet_with_default_anchors_and_heads():
    # default anchor generator, heads and transform class; a smaller resize than 800 px keeps it fast
    from torchvision.models.detection import RetinaNet

    detector = RetinaNet(levit.create_backbone("levit_tiny"), num_classes=3, min_size=320, max_size=480).eval()
    with torch.no_grad():
        out = detector([torch.rand(3, 120, 90)])
    assert set(out[0]) == {"boxes", "scores", "labels"}


def test_backbone_rejects_bad_levels():
    with pytest.raises(ValueError, match="extra_levels"):
        levit.create_backbone("levit_tiny", extra_levels=-1)
