"""Every batched photometric op against timm's own Pillow op (timm.data.auto_augment) on real photos.

The mean |Δ| of each op is printed (run with -s to see the table) and bounded; the LUT ops are exact.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from timm.data import auto_augment as aa

from trainer.photometric import PHOTOMETRIC_OPS as OP_NAMES
from trainer.photometric_torch import apply_photometric

skdata = pytest.importorskip("skimage.data")

# (op, timm's argument values to try, bound on mean |Δ| in grey levels, bound on max |Δ|)
CASES = [
    ("AutoContrast", [0.0], 0.0, 0),
    ("Equalize", [0.0], 0.0, 0),
    ("Invert", [0.0], 0.0, 0),
    ("PosterizeIncreasing", [1, 2, 4, 8], 0.0, 0),
    ("SolarizeIncreasing", [0, 26, 128, 256], 0.0, 0),
    ("SolarizeAdd", [0, 50, 110], 0.0, 0),
    ("ColorIncreasing", [0.1, 0.55, 1.45, 1.9], 0.05, 1),
    ("ContrastIncreasing", [0.1, 0.55, 1.45, 1.9], 0.05, 1),
    ("BrightnessIncreasing", [0.1, 0.55, 1.45, 1.9], 0.05, 1),
    ("SharpnessIncreasing", [0.1, 0.55, 1.45, 1.9], 0.1, 2),
]


def photos() -> list[np.ndarray]:
    """Three real photos cut to one size (a batch), plus a low-contrast one for AutoContrast/Equalize."""
    ims = [skdata.astronaut(), skdata.coffee(), skdata.chelsea()]
    h, w = 256, 288
    out = [np.ascontiguousarray(im[:h, :w]) for im in ims]
    out.append((out[1] // 3 + 60).astype(np.uint8))  # narrow histogram: autocontrast/equalize do real work
    return out


def pillow_op(name: str, img: np.ndarray, arg: float) -> np.ndarray:
    op = aa.NAME_TO_OP[name]
    pil = Image.fromarray(img)
    if name in ("AutoContrast", "Equalize", "Invert"):
        return np.asarray(op(pil))
    if name.startswith("Posterize"):
        return np.asarray(op(pil, int(arg)))
    if name.startswith("Solarize") and name != "SolarizeAdd":
        return np.asarray(op(pil, int(arg)))
    if name == "SolarizeAdd":
        return np.asarray(op(pil, int(arg)))
    return np.asarray(op(pil, float(arg)))


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name,args,mean_bound,max_bound", CASES, ids=[c[0] for c in CASES])
def test_op_matches_timm_pillow(name, args, mean_bound, max_bound, device):
    ims = photos()
    batch = torch.from_numpy(np.stack(ims)).permute(0, 3, 1, 2).contiguous().to(device)
    k = OP_NAMES.index(name)
    for arg in args:
        ops = np.full((len(ims), 1), k, np.int8)
        got = apply_photometric(batch, ops, np.full((len(ims), 1), arg, np.float32))
        want = np.stack([pillow_op(name, im, arg) for im in ims])
        diff = np.abs(got.permute(0, 2, 3, 1).cpu().numpy().astype(int) - want.astype(int))
        print(f"{device} {name:<22} arg {arg:>6}: mean |Δ| {diff.mean():.4f}, max |Δ| {diff.max()}")
        assert diff.mean() <= mean_bound and diff.max() <= max_bound, (name, arg, diff.mean(), diff.max())
        if name not in ("PosterizeIncreasing",) or arg < 8:
            if not (name.startswith("Solarize") and arg in (0, 256)) and not (name == "SolarizeAdd" and arg == 0):
                assert (got != batch).any(), f"{name}({arg}) changed nothing: the test would prove nothing"


def test_slots_apply_in_order_per_sample_and_skip_minus_one():
    ims = photos()
    batch = torch.from_numpy(np.stack(ims)).permute(0, 3, 1, 2).contiguous()
    inv, sol, col = (OP_NAMES.index(n) for n in ("Invert", "SolarizeIncreasing", "ColorIncreasing"))
    ops = np.array([[inv, sol], [sol, inv], [-1, col], [-1, -1]], np.int8)
    args = np.array([[0, 100], [100, 0], [0, 0.3], [0, 0]], np.float32)
    got = apply_photometric(batch, torch.from_numpy(ops), torch.from_numpy(args))
    for i, im in enumerate(ims):
        want = Image.fromarray(im)
        for k, a in zip(ops[i], args[i]):
            if k >= 0:
                want = Image.fromarray(pillow_op(OP_NAMES[k], np.asarray(want), a))
        diff = np.abs(got[i].permute(1, 2, 0).numpy().astype(int) - np.asarray(want).astype(int))
        assert diff.max() <= 1, (i, diff.max())
    assert torch.equal(got[3], batch[3])
    assert not torch.equal(got[0], got[1])  # invert∘solarize ≠ solarize∘invert: the order is kept


def test_batched_slots_equal_each_sample_alone():
    """Grouping a slot's samples by op (one gather per slot) gives each sample exactly what applying its own
    slots alone gives, whatever mix of ops, skipped slots and arguments; the input batch is left as it was."""
    rng = np.random.default_rng(3)
    ims = photos()
    batch = torch.from_numpy(np.stack([ims[i % len(ims)] for i in range(12)])).permute(0, 3, 1, 2).contiguous()
    before = batch.clone()
    ops = rng.integers(-1, len(OP_NAMES), size=(12, 3)).astype(np.int8)
    ops[0] = -1
    args = rng.uniform(0.1, 1.9, size=(12, 3)).astype(np.float32)
    args[ops == OP_NAMES.index("PosterizeIncreasing")] = 4
    args[ops == OP_NAMES.index("SolarizeIncreasing")] = 128
    args[ops == OP_NAMES.index("SolarizeAdd")] = 60
    got = apply_photometric(batch, ops, args)
    for i in range(12):
        assert torch.equal(got[i], apply_photometric(batch[i:i + 1], ops[i:i + 1], args[i:i + 1])[0]), i
    assert torch.equal(batch, before) and torch.equal(got[0], batch[0])
    same = np.full((12, 1), OP_NAMES.index("Invert"), np.int8)  # one op for the whole batch: no gather
    assert torch.equal(apply_photometric(batch, same, np.zeros((12, 1), np.float32)), 255 - batch)


def test_bad_slot_arrays_are_refused():
    x = torch.zeros((2, 3, 8, 8), dtype=torch.uint8)
    with pytest.raises(ValueError, match="photo_ops"):
        apply_photometric(x, np.zeros((3, 2), np.int8), np.zeros((3, 2), np.float32))
    with pytest.raises(ValueError, match="must lie in"):
        apply_photometric(x, np.full((2, 1), 10, np.int8), np.zeros((2, 1), np.float32))


def test_op_names_are_timms_photometric_inc1_ops_in_timms_order():
    from timm.data.auto_augment import _RAND_INCREASING_TRANSFORMS

    geometric = {"Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel"}
    assert OP_NAMES == tuple(op for op in _RAND_INCREASING_TRANSFORMS if op not in geometric)


@pytest.mark.parametrize("name", ["Invert", "PosterizeIncreasing", "SolarizeIncreasing", "SolarizeAdd",
                                  "BrightnessIncreasing"])
def test_host_made_luts_equal_the_device_ops_on_every_level(name):
    from trainer.photometric_torch import OPS, _apply_lut, _host_levels

    kind = OP_NAMES.index(name)
    # Every level in every channel, and arguments on and between the rounding and threshold edges.
    args = np.array([0.0, 0.5, 1.0, 1.5, 2.5, 3.49, 4.0, 7.5, 8.0, 26.0, 127.5, 128.0, 255.9, 256.0, 0.1, 0.55,
                     1.45, 1.9, 1.0000001, 0.9999999], np.float32)
    x = torch.arange(256, dtype=torch.uint8).repeat(len(args), 3, 1, 1)  # (n, 3, 1, 256)
    want = OPS[kind](x, torch.from_numpy(args))
    lut = torch.from_numpy(_host_levels(kind, args))[:, None].expand(-1, 3, -1)
    assert torch.equal(_apply_lut(x, lut), want)
