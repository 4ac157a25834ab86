"""TokenHeadWrapper: token logits for ViT-style and CNN timm models; the real EfficientNet-Lite0 labeler."""
import numpy as np
import pytest
import torch
import timm
import torch.nn.functional as F

from labeler.models import (
    CheckpointError, TokenHeadWrapper, create_token_model, load_efficientnet_lite0_weights, token_grid,
)

TINY_VIT = dict(img_size=64, depth=1, embed_dim=32, num_heads=2)


def test_vit_fresh_head_uses_patch_grid_not_sqrt():
    torch.manual_seed(0)
    m = create_token_model("vit_tiny_patch16_224", num_classes=10, img_size=(48, 80), depth=1, reg_tokens=2).eval()
    assert isinstance(m, TokenHeadWrapper) and m.token_head_mode == "fresh"
    assert m.num_prefix_tokens == 3 and token_grid(m, (48, 80)) == (3, 5)
    cls_logits, token_logits = m.forward_tokens(torch.randn(2, 3, 48, 80))
    assert cls_logits.shape == (2, 10) and token_logits.shape == (2, 15, 10)
    feats = m.model.forward_features(torch.zeros(1, 3, 48, 80))
    torch.testing.assert_close(m.forward_tokens(torch.zeros(1, 3, 48, 80))[1], m.token_head(feats[:, 3:]))


def test_vit_dynamic_size_and_fixed_size_error():
    m = create_token_model("vit_tiny_patch16_224", num_classes=4, dynamic_img_size=True, **{**TINY_VIT})
    assert token_grid(m, (64, 96)) == (4, 6) and m.forward_tokens(torch.randn(1, 3, 64, 96))[1].shape == (1, 24, 4)
    fixed = create_token_model("vit_tiny_patch16_224", num_classes=4, **TINY_VIT)
    with pytest.raises(ValueError, match="dynamic_img_size"):
        token_grid(fixed, (64, 96))


def test_vit_classifier_mode_shares_the_head():
    m = create_token_model("vit_tiny_patch16_224", num_classes=4, token_head="classifier", **TINY_VIT).eval()
    x = torch.randn(1, 3, 64, 64)
    feats = m.model.forward_features(x)
    torch.testing.assert_close(m.forward_tokens(x)[1], m.model.head(feats[:, 1:]))
    assert not hasattr(m, "token_head")


def test_convnext_cam_applies_the_classifier_at_every_position():
    torch.manual_seed(0)
    m = create_token_model("convnext_atto", num_classes=6).eval()
    assert m.token_head_mode == "classifier" and m.num_prefix_tokens == 0
    assert [token_grid(m, hw) for hw in [(64, 64), (96, 160), (224, 224)]] == [(2, 2), (3, 5), (7, 7)]
    x = torch.randn(2, 3, 96, 160)
    with torch.no_grad():
        cls_logits, token_logits = m.forward_tokens(x)
        feats = m.model.forward_features(x)  # (2, C, 3, 5)
        # token (row 1, col 4) is the classifier (head norm + fc) applied to that one position
        one = m.model.forward_head(feats[:, :, 1:2, 4:5])
    assert cls_logits.shape == (2, 6) and token_logits.shape == (2, 15, 6)
    torch.testing.assert_close(token_logits[:, 1 * 5 + 4], one)


def test_convnext_fresh_head_for_students_trains():
    torch.manual_seed(0)
    m = create_token_model("convnext_atto", num_classes=6, token_head="fresh").train()
    cls_logits, token_logits = m.forward_tokens(torch.randn(2, 3, 64, 64))
    (cls_logits.sum() + token_logits.sum()).backward()
    assert m.token_head.weight.grad is not None and token_logits.shape == (2, 4, 6)
    # probing the grid must not disturb training state or statistics
    assert token_grid(m, (100, 100)) == (3, 3) and m.training and m.model.training


def test_cnn_grid_probe_leaves_batchnorm_statistics_alone():
    m = create_token_model("resnet18", num_classes=3).train()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    assert token_grid(m, (65, 65)) == (3, 3)
    assert all(torch.equal(v, before[k]) for k, v in m.state_dict().items())


def test_efficientnet_cam_tokens_average_to_class_logits():
    # global average pool then a linear classifier: the mean of per-position logits is the class logit
    m = create_token_model("tf_efficientnet_lite0", num_classes=8).eval()
    with torch.no_grad():
        cls_logits, token_logits = m.forward_tokens(torch.randn(1, 3, 96, 96))
    torch.testing.assert_close(token_logits.mean(1), cls_logits, atol=1e-4, rtol=1e-4)


def test_bad_token_head_mode_and_headless_model():
    with pytest.raises(ValueError, match="token_head"):
        create_token_model("convnext_atto", num_classes=3, token_head="cam")
    with pytest.raises(ValueError, match="no classifier"):
        TokenHeadWrapper(timm.create_model("convnext_atto", num_classes=0))


def test_in_order_loader_refuses_a_different_architecture():
    with pytest.raises(CheckpointError, match="tensors"):
        load_efficientnet_lite0_weights(create_token_model("convnext_atto", num_classes=1000))
    with pytest.raises(CheckpointError, match="classifier.weight"):
        load_efficientnet_lite0_weights(create_token_model("tf_efficientnet_lite0", num_classes=10))


def test_real_efficientnet_lite0_labels_a_cat():
    skimage_data = pytest.importorskip("skimage.data")
    m = create_token_model("tf_efficientnet_lite0", num_classes=1000).eval()
    sha = load_efficientnet_lite0_weights(m)
    assert len(sha) == 64
    img = torch.tensor(np.asarray(skimage_data.chelsea())).permute(2, 0, 1)[None].float() / 255
    x = (F.interpolate(img, size=(224, 224), mode="bilinear", antialias=True) - 0.5) / 0.5
    with torch.no_grad():
        cls_logits, token_logits = m.forward_tokens(x)
    assert 281 <= cls_logits.argmax().item() <= 285  # ImageNet cats
    assert token_logits.shape == (1, 49, 1000) and token_grid(m, (224, 224)) == (7, 7)
    # most positions of a close-up cat photo vote for a cat class
    assert ((token_logits.argmax(-1) >= 281) & (token_logits.argmax(-1) <= 285)).float().mean() > 0.5


def test_channels_last_feature_maps_are_refused_not_misread():
    m = create_token_model("swin_tiny_patch4_window7_224", num_classes=3, depths=(1, 1, 1, 1), embed_dim=24,
                           num_heads=(1, 1, 1, 1))
    with pytest.raises(TypeError, match="NCHW"):
        token_grid(m, (224, 224))
    with pytest.raises(TypeError, match="NCHW"):
        m.forward_tokens(torch.randn(1, 3, 224, 224))
