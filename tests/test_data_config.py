"""DataConfig / TokenLabelConfig validate themselves and round-trip through dicts."""
import dataclasses

import pytest

from pipelines.config import ConfigError, build
from trainer.data_config import DataConfig, TokenLabelConfig


def test_defaults_follow_the_recipe_and_round_trip():
    d = DataConfig(shards="a-{0..3}.tar", input_size=224)
    assert d.shards == ("a-{0..3}.tar",) and d.input_size == (224, 224)
    assert (d.rand_augment, d.reprob, d.mixup, d.cutmix, d.label_smoothing) == ("rand-m9-mstd0.5-inc1", 0.25, 0.8, 1.0, 0.1)
    assert build(DataConfig, dataclasses.asdict(d)) == d
    t = TokenLabelConfig()
    assert (t.mode, t.tau, t.smoothing, t.token_mix, t.beta) == ("gumbel", 1.0, 0.1, "follow", 1.0)
    assert build(TokenLabelConfig, dataclasses.asdict(t)) == t


@pytest.mark.parametrize("kw, match", [
    (dict(batch_size=0), "batch_size"), (dict(workers=-1), "workers"), (dict(view_choice="row"), "view_choice"),
    (dict(rand_augment="m9"), "rand_augment"), (dict(reprob=1.5), "reprob"), (dict(mixup=-1), "mixup"),
    (dict(input_size=(0, 3)), "input_size"), (dict(remode="x"), "remode"), (dict(std=(1, 0, 1)), "std"),
])
def test_bad_data_settings_name_the_setting(kw, match):
    with pytest.raises(ValueError, match=match):
        DataConfig(**kw)


@pytest.mark.parametrize("kw, match", [
    (dict(mode="hard"), "mode"), (dict(token_mix="paste"), "token_mix"), (dict(tau=0), "tau"),
    (dict(smoothing=2), "smoothing"), (dict(beta=-1), "beta"),
])
def test_bad_token_settings_name_the_setting(kw, match):
    with pytest.raises(ValueError, match=match):
        TokenLabelConfig(**kw)


def test_unknown_keys_are_errors():
    with pytest.raises(ConfigError, match="unknown key batchsize"):
        build(DataConfig, {"batchsize": 3})
    with pytest.raises(ConfigError, match="unknown key temperature"):
        build(TokenLabelConfig, {"temperature": 3})


def test_default_rand_augment_never_asks_pillow_for_zero_bit_posterize():
    # Pillow >= 13 raises on posterize(0), which timm's PosterizeIncreasing asks for at magnitude 10:
    # both our RandAugment paths (student photometric ops, stage-1 timm transform) must clamp it.
    import pickle
    import random

    import numpy as np
    from PIL import Image
    from timm.data import create_transform

    from labelstore import ViewSpec
    from trainer.photometric import PHOTOMETRIC_OPS, apply_photometric_pil, level_args
    from trainer.student_augment import StudentAugment, keep_posterize_bits_positive

    cfg = DataConfig(shards="x-{0..1}.tar")
    student = StudentAugment(cfg.rand_augment, ViewSpec())
    post = PHOTOMETRIC_OPS.index("PosterizeIncreasing")
    assert level_args(np.array(post), np.array(10.0), np.array(False)) == 1
    stage1 = keep_posterize_bits_positive(create_transform(32, is_training=True, auto_augment=cfg.rand_augment))
    ra = next(t for t in stage1.transforms if hasattr(t, "ops"))
    posterize = [op for op in ra.ops if op.name.startswith("Posterize")]
    assert posterize and all(op.level_fn(10.0, op.hparams) == (1,) for op in posterize)
    for op in posterize:  # magnitude 10 every time, applied every time
        op.prob, op.magnitude, op.magnitude_std = 1.0, 10.0, 0.0
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8))
    random.seed(0); np.random.seed(0)
    for _ in range(100):
        stage1(img)
    apply_photometric_pil(img, np.array([post], np.int8), np.array([1.0], np.float32))
    pickle.loads(pickle.dumps(student))  # still picklable for DataLoader workers
