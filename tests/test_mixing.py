"""Token-label-aware Mixup/CutMix: patch-aligned boxes, token labels follow the pixels, timm class targets."""
import numpy as np
import pytest
import torch
from timm.data.mixup import mixup_target

from trainer.data_config import DataConfig, TokenLabelConfig
from trainer.mixing import MixParams, draw_mix, mix_class_targets, mix_images, mix_token_targets
from trainer.target_builder import TargetBuilder

GRID, PATCH, C = (4, 4), 8, 5


def _batch(b=4):
    """Image i is filled with the value i; its token targets are one-hot of class i."""
    images = torch.arange(b, dtype=torch.float32).view(b, 1, 1, 1).expand(b, 3, 32, 32).contiguous()
    tokens = torch.nn.functional.one_hot(torch.arange(b), C).float()[:, None].expand(b, 16, C).contiguous()
    return images, tokens


def test_cutmix_box_patch_aligned_and_tokens_follow_pixels():
    cfg = DataConfig(mixup=0.0, cutmix=1.0)
    seen_box = False
    for seed in range(20):
        mix = draw_mix(cfg, GRID, np.random.default_rng(seed))
        assert mix.kind == "cutmix"
        t, b, l, r = mix.box
        assert 0 <= t <= b <= 4 and 0 <= l <= r <= 4
        assert mix.lam == pytest.approx(1 - (b - t) * (r - l) / 16)
        images, tokens = _batch()
        mi = mix_images(images, mix, GRID)
        mt = mix_token_targets(tokens, mix, GRID, "follow")
        # each patch is one source image; that source's class is the patch's token label
        src = mi[:, 0].view(4, 4, PATCH, 4, PATCH)
        assert (src == src[:, :, :1, :, :1]).all()
        patch_src = src[:, :, 0, :, 0].reshape(4, 16).long()
        assert torch.equal(mt.argmax(-1), patch_src)
        seen_box |= (b - t) * (r - l) > 0
        assert torch.equal(mix_token_targets(tokens, mix, GRID, "none"), tokens)
    assert seen_box


def test_mixup_blends_images_tokens_and_classes():
    mix = MixParams("mixup", 0.7)
    images, tokens = _batch()
    torch.testing.assert_close(mix_images(images, mix, GRID), 0.7 * images + 0.3 * images.flip(0))
    torch.testing.assert_close(mix_token_targets(tokens, mix, GRID, "follow"), 0.7 * tokens + 0.3 * tokens.flip(0))
    labels = torch.tensor([0, 1, 2, 3])
    torch.testing.assert_close(mix_class_targets(labels, C, mix, 0.1), mixup_target(labels, C, 0.7, 0.1))


def test_draw_mix_seeded_and_leaves_global_state():
    cfg = DataConfig()
    state = np.random.get_state()[1].copy()
    a = [draw_mix(cfg, GRID, np.random.default_rng(s)) for s in range(50)]
    b = [draw_mix(cfg, GRID, np.random.default_rng(s)) for s in range(50)]
    assert a == b and {m.kind for m in a} == {"mixup", "cutmix"}
    assert (np.random.get_state()[1] == state).all()
    assert draw_mix(DataConfig(mix_prob=0.0), GRID, np.random.default_rng(0)) == MixParams()
    assert draw_mix(DataConfig(mixup=0, cutmix=0), GRID, np.random.default_rng(0)) == MixParams()


def test_cutmix_needs_whole_patches():
    with pytest.raises(ValueError, match="tile the token grid"):
        mix_images(torch.zeros(2, 3, 30, 32), MixParams("cutmix", 0.5, (0, 2, 0, 2)), GRID)


def test_target_builder_end_to_end_cpu():
    b, t, k = 4, 16, 3
    rng = np.random.default_rng(0)
    batch = {
        "image": torch.from_numpy(rng.integers(0, 256, (b, 32, 32, 3), dtype=np.uint8)).permute(0, 3, 1, 2),
        "label": torch.tensor([0, 1, 2, 3]),
        "token_logit": torch.from_numpy(rng.normal(size=(b, t, k)).astype(np.float16)),
        "token_class": torch.from_numpy(np.tile(np.array([0, 1, 2], np.int16), (b, t, 1))),
        "token_tail": torch.from_numpy(rng.normal(size=(b, t)).astype(np.float16)),
    }
    data = DataConfig(seed=3)
    tb = TargetBuilder(num_classes=C, data=data, tokens=TokenLabelConfig(), store_grid=(4, 4), student_grid=(2, 2))
    images, cls_t, tok_t = tb(batch, step=5)
    assert images.shape == (b, 3, 32, 32) and images.dtype == torch.float32
    assert cls_t.shape == (b, C) and tok_t.shape == (b, 4, C)
    torch.testing.assert_close(cls_t.sum(-1), torch.ones(b))
    torch.testing.assert_close(tok_t.sum(-1), torch.ones(b, 4))
    again = tb(batch, step=5)
    assert all(torch.equal(x, y) for x, y in zip((images, cls_t, tok_t), again))  # (seed, step) fixes every draw
    ev = TargetBuilder(num_classes=C, data=data, tokens=None, train=False)
    images, cls_t, tok_t = ev(batch, step=0)
    assert tok_t is None and torch.equal(cls_t.argmax(-1), batch["label"]) and cls_t.max() == 1.0
    mean = torch.tensor(data.mean).view(1, 3, 1, 1)
    std = torch.tensor(data.std).view(1, 3, 1, 1)
    torch.testing.assert_close(images, (batch["image"].float() / 255 - mean) / std)


@pytest.mark.parametrize("mix", [MixParams("mixup", 0.3), MixParams("cutmix", 0.75, (1, 3, 0, 2))])
def test_inplace_equals_copy(mix):
    images, tokens = _batch()
    want = mix_images(images, mix, GRID), mix_token_targets(tokens, mix, GRID, "follow")
    got = mix_images(images.clone(), mix, GRID, inplace=True), mix_token_targets(tokens.clone(), mix, GRID, "follow",
                                                                                  inplace=True)
    assert torch.equal(want[0], got[0]) and torch.equal(want[1], got[1])
    assert torch.equal(images, _batch()[0])  # the copying form leaves its input alone


def test_target_builder_cutmix_with_resampled_grid():
    """Every step with CutMix on a student grid other than the stored one: boxes follow on the student grid."""
    b = 4
    token_class = torch.full((b, 16, 2), 4, dtype=torch.int16)
    token_class[:, :, 0] = torch.arange(b, dtype=torch.int16).view(b, 1)  # every token of sample i: class i on top
    batch = {"image": torch.zeros(b, 3, 32, 32, dtype=torch.uint8), "label": torch.arange(b),
             "token_logit": torch.tensor([9.0, 0.0], dtype=torch.float16).expand(b, 16, 2).contiguous(),
             "token_class": token_class, "token_tail": torch.full((b, 16), -30.0, dtype=torch.float16)}
    data = DataConfig(mixup=0.0, cutmix=1.0, reprob=0.0, label_smoothing=0.0)
    tb = TargetBuilder(num_classes=C, data=data, tokens=TokenLabelConfig(mode="argmax", smoothing=0.0),
                       store_grid=(4, 4), student_grid=(2, 2))
    areas = []
    for step in range(6):
        _, cls_t, tok_t = tb(batch, step)
        t, bo, l, r = tb.last_mix.box
        areas.append((bo - t) * (r - l))
        inside = torch.zeros(2, 2, dtype=torch.bool)
        inside[t:bo, l:r] = True
        src = torch.where(inside.view(1, 4), torch.arange(b).flip(0).view(b, 1), torch.arange(b).view(b, 1))
        assert torch.equal(tok_t.argmax(-1), src)
        torch.testing.assert_close(cls_t[:, :b].diagonal(), torch.full((b,), tb.last_mix.lam))
    assert max(areas) > 0
