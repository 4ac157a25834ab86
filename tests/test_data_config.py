"""DataConfig / TokenLabelConfig validate themselves and round-trip through dicts."""
import pytest

from trainer.data_config import DataConfig, TokenLabelConfig


def test_defaults_follow_the_recipe_and_round_trip():
    d = DataConfig(shards="a-{0..3}.tar", input_size=224)
    assert d.shards == ("a-{0..3}.tar",) and d.input_size == (224, 224)
    assert (d.rand_augment, d.reprob, d.mixup, d.cutmix, d.label_smoothing) == ("rand-m9-mstd0.5-inc1-mmax9", 0.25, 0.8, 1.0, 0.1)
    assert DataConfig.from_dict(d.to_dict()) == d
    t = TokenLabelConfig()
    assert (t.mode, t.tau, t.smoothing, t.token_mix, t.beta) == ("gumbel", 1.0, 0.1, "follow", 1.0)
    assert TokenLabelConfig.from_dict(t.to_dict()) == t


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
    with pytest.raises(ValueError, match="batchsize"):
        DataConfig.from_dict({"batchsize": 3})
    with pytest.raises(ValueError, match="temperature"):
        TokenLabelConfig.from_dict({"temperature": 3})


def test_default_rand_augment_never_asks_pillow_for_zero_bit_posterize():
    # Pillow >= 13 raises on posterize(0); the default string must cap the magnitude below 10.
    import numpy as np
    from PIL import Image
    from timm.data import rand_augment_transform

    from trainer.student_augment import PHOTOMETRIC_OPS_INCREASING

    ra = rand_augment_transform(DataConfig(shards="x-{0..1}.tar").rand_augment, {},
                                transforms=["PosterizeIncreasing"])
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8))
    import random
    random.seed(0); np.random.seed(0)
    for _ in range(400):
        ra(img)
    assert "PosterizeIncreasing" in PHOTOMETRIC_OPS_INCREASING
