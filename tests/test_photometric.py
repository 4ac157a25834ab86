"""The split RandAugment draw: view slots (geometric, rendered) + student re-draw (photometric) against timm's
own RandAugment sampling, timm's level-to-arg, and timm's Pillow ops."""
from __future__ import annotations

import random
from collections import Counter

import numpy as np
import pytest
from PIL import Image
from timm.data import rand_augment_transform
from timm.data.auto_augment import AugmentOp

from labelstore.views import GEO_FIELD, RA_OPS, ViewSpec, draw_view_params, view_slots
from trainer.photometric import PHOTOMETRIC_OPS, apply_photometric_pil, draw_photometric, level_args
from trainer.student_augment import StudentAugment

# chi-square 0.999 quantiles (scipy.stats.chi2.ppf(0.999, df)): a correct draw fails a check 1 time in 1000
CHI2_999 = {5: 20.515, 14: 36.123}
N = 6000


def _two_sample_chi2(a: Counter, b: Counter, cats: list) -> float:
    """Pearson chi-square of a 2 x len(cats) contingency table (are a and b the same distribution?)."""
    table = np.array([[a.get(c, 0) for c in cats], [b.get(c, 0) for c in cats]], np.float64)
    expected = table.sum(1, keepdims=True) * table.sum(0, keepdims=True) / table.sum()
    keep = expected.sum(0) > 0
    return float((((table - expected) ** 2)[:, keep] / expected[:, keep]).sum())


def _timm_draws(n: int) -> list[list[str]]:
    """The ops timm's own RandAugment applies to each of n images (its sampling, ops replaced by recorders)."""
    ra = rand_augment_transform("rand-m9-mstd0.5-inc1", {})
    applied: list[str] = []
    for op in ra.ops:
        op.aug_fn = (lambda name: (lambda img, *a, **k: applied.append(name) or img))(op.name)
    random.seed(1234)
    np.random.seed(1234)
    img, out = Image.new("RGB", (4, 4)), []
    for _ in range(n):
        applied.clear()
        ra(img)
        out.append(list(applied))
    return out


def _our_draws(n: int, seed: int = 0) -> list[list[str]]:
    """The ops one image gets here: applied geometric slots of its stored view + the student's photometric re-draw."""
    spec = ViewSpec(size=(8, 8))
    rng = np.random.default_rng(seed)
    out = []
    for row in range(n):
        p = draw_view_params(spec, seed, row, 0, (16, 16))
        geo = [RA_OPS[int(op)] for op, _, applied, _ in view_slots(p) if op >= 0 and applied
               and RA_OPS[int(op)] in GEO_FIELD]
        ops, _ = draw_photometric(p, spec, rng)
        out.append(geo + [PHOTOMETRIC_OPS[o] for o in ops if o >= 0])
    return out


def _kind_counts(draws):
    return Counter((sum(o in GEO_FIELD for o in d), sum(o not in GEO_FIELD for o in d)) for d in draws)


KIND_CATS = [(g, p) for g in range(3) for p in range(3) if g + p <= 2]


@pytest.fixture(scope="module")
def timm_and_ours():
    return _timm_draws(N), _our_draws(N)


def test_ops_per_image_match_timm(timm_and_ours):
    timm_d, ours = timm_and_ours
    stat = _two_sample_chi2(_kind_counts(timm_d), _kind_counts(ours), KIND_CATS)
    assert stat < CHI2_999[5], (_kind_counts(timm_d), _kind_counts(ours))
    no_geo = sum(1 for d in ours if not any(o in GEO_FIELD for o in d)) / N
    assert abs(no_geo - (1 - 1 / 6) ** 2) < 0.03  # 69 % of images without a geometric op, as timm


def test_op_frequencies_match_timm(timm_and_ours):
    timm_d, ours = timm_and_ours
    a, b = Counter(o for d in timm_d for o in d), Counter(o for d in ours for o in d)
    assert _two_sample_chi2(a, b, list(RA_OPS)) < CHI2_999[14], (a, b)


def test_doubled_slots_are_caught(timm_and_ours):
    """The check has power: two geometric slots in the view plus two photometric slots (4 in all) fails it."""
    timm_d, ours = timm_and_ours
    geo_spec = ViewSpec(size=(8, 8), ra_ops=tuple(GEO_FIELD))
    doubled = []
    for row, d in enumerate(ours):
        p = draw_view_params(geo_spec, 5, row, 0, (16, 16))
        geo = [RA_OPS[int(op)] for op, _, applied, _ in view_slots(p) if op >= 0 and applied]
        doubled.append(geo + [o for o in _our_draws(1, seed=row + 1)[0] if o not in GEO_FIELD])
    cats = sorted(set(_kind_counts(doubled)) | set(KIND_CATS))
    assert _two_sample_chi2(_kind_counts(timm_d), _kind_counts(doubled), cats) > 10 * CHI2_999[5]


def test_redraw_false_replays_the_stored_photometric_slots():
    spec = ViewSpec(ra_prob=1.0, ra_ops=("Equalize", "SolarizeAdd"))
    p = draw_view_params(spec, 3, 1, 0, (40, 40))
    ops, args = draw_photometric(p, spec, np.random.default_rng(0), redraw=False)
    slots = view_slots(p)
    for s in range(2):
        name = RA_OPS[int(slots[s, 0])]
        assert PHOTOMETRIC_OPS[ops[s]] == name
        if name == "SolarizeAdd":
            assert args[s] == min(128, int(slots[s, 1] / 10 * 110))
    assert ops[2] == -1 and args.dtype == np.float32 and ops.dtype == np.int8
    a = draw_photometric(p, spec, np.random.default_rng(7))
    assert all(np.array_equal(x, y) for x, y in zip(a, draw_photometric(p, spec, np.random.default_rng(7))))


@pytest.mark.parametrize("name", PHOTOMETRIC_OPS)
def test_level_args_and_pil_ops_are_timms(name):
    """Our (op, arg) reproduce timm's AugmentOp: same argument (either sign) and the same pixels."""
    import skimage.data
    img = Image.fromarray(skimage.data.astronaut()[::4, ::4].copy())
    idx = PHOTOMETRIC_OPS.index(name)
    for m in (0.0, 3.7, 9.0, 9.6):
        op = AugmentOp(name, prob=1.0, magnitude=m, hparams={})
        random.seed(0)
        timm_args = {op.level_fn(m, op.hparams)[0] if op.level_fn else 0 for _ in range(40)}
        ours = {float(level_args(np.array(idx), np.array(m), np.array(neg))) for neg in (False, True)}
        if name == "PosterizeIncreasing":
            timm_args = {max(1, a) for a in timm_args}  # timm asks Pillow for 0 bits at m = 10; we keep 1
        assert {round(float(a), 5) for a in timm_args} == {round(a, 5) for a in ours}, (m, timm_args, ours)
        arg = level_args(np.array(idx), np.array(m), np.array(False))
        want = op.aug_fn(img, *((int(arg) if name.startswith(("Posterize", "Solarize")) else float(arg),)
                                if op.level_fn else ()))
        got = apply_photometric_pil(img, np.array([idx, -1], np.int8), np.array([arg, 0], np.float32))
        assert np.array_equal(np.asarray(got), np.asarray(want))


def test_student_augment_checks_its_config_against_the_store():
    spec = ViewSpec()
    aug = StudentAugment("rand-m9-mstd0.5-inc1", spec)
    assert aug.ops == PHOTOMETRIC_OPS
    with pytest.raises(ValueError, match="does not match.*m: 7.0 here vs 9.0"):
        StudentAugment("rand-m7-mstd0.5-inc1", spec)
    with pytest.raises(ValueError, match="n: 3 here vs 2"):
        StudentAugment("rand-m9-n3-mstd0.5-inc1", spec)
    with pytest.raises(ValueError, match="unsupported part 'w0'"):
        StudentAugment("rand-m9-w0-mstd0.5-inc1", spec)
