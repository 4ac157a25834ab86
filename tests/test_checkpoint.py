"""load_checkpoint: every file format users bring, legacy keys, clear errors, sha256 provenance."""
import argparse
import hashlib

import pytest
import torch
from safetensors.torch import save_file

from labeler.models import CheckpointError, create_token_model, load_checkpoint

NAME = "fan_test_p4_hybrid_token"


def _model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return create_token_model(NAME, num_classes=10).eval()


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sb = b.state_dict()
    return all(torch.equal(v, sb[k]) for k, v in a.state_dict().items())


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def src():
    return _model(0)


@pytest.fixture(scope="module")
def ema():
    return _model(1)


def test_timm_dict_with_args_namespace_prefers_ema(tmp_path, src, ema):
    path = tmp_path / "checkpoint.pth.tar"
    torch.save({"epoch": 3, "arch": NAME, "args": argparse.Namespace(lr=2e-3, model=NAME),
                "state_dict": src.state_dict(), "state_dict_ema": ema.state_dict()}, path)
    dst = _model(2)
    assert load_checkpoint(dst, path) == _sha(path)
    assert _same_weights(dst, ema)
    load_checkpoint(dst, path, prefer_ema=False)
    assert _same_weights(dst, src)


def test_model_and_model_ema_keys(tmp_path, src, ema):
    path = tmp_path / "ck.pt"
    torch.save({"model": src.state_dict(), "model_ema": ema.state_dict()}, path)
    dst = _model(2)
    load_checkpoint(dst, path)
    assert _same_weights(dst, ema)
    load_checkpoint(dst, path, prefer_ema=False)
    assert _same_weights(dst, src)


def test_plain_state_dict_with_ddp_prefix(tmp_path, src):
    path = tmp_path / "plain.pth"
    torch.save({f"module.{k}": v for k, v in src.state_dict().items()}, path)
    dst = _model(2)
    load_checkpoint(dst, path)
    assert _same_weights(dst, src)


def test_safetensors_and_identical_outputs(tmp_path, src):
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))
    dst = _model(2)
    assert load_checkpoint(dst, path) == _sha(path)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        for a, b in zip(src(x), dst(x)):
            assert torch.equal(a, b)


def test_legacy_pos_embeder_and_fused_class_attention_qkv(tmp_path, src):
    legacy = {}
    sd = src.state_dict()
    for k, v in sd.items():
        if k.startswith("cls_attn_blocks.") and (".attn.k." in k or ".attn.v." in k):
            continue
        if k.startswith("cls_attn_blocks.") and ".attn.q." in k:
            legacy[k.replace(".attn.q.", ".attn.qkv.")] = torch.cat(
                [v, sd[k.replace(".q.", ".k.")], sd[k.replace(".q.", ".v.")]], dim=0)
            continue
        legacy[k.replace("pos_embed.", "pos_embeder.")] = v
    assert any(k.startswith("pos_embeder.") for k in legacy) and any(".attn.qkv." in k for k in legacy)
    path = tmp_path / "legacy.pth.tar"
    torch.save({"state_dict_ema": legacy, "args": argparse.Namespace(model=NAME)}, path)
    dst = _model(2)
    load_checkpoint(dst, path)
    assert _same_weights(dst, src)


def test_mismatch_lists_every_problem_and_names_file(tmp_path, src):
    sd = dict(src.state_dict())
    sd.pop("norm.weight")
    sd["extra.weight"] = torch.zeros(3)
    sd["head.weight"] = torch.zeros(7, 64)
    path = tmp_path / "broken.pth"
    torch.save(sd, path)
    dst = _model(2)
    before = {k: v.clone() for k, v in dst.state_dict().items()}
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(dst, path)
    msg = str(err.value)
    assert str(path) in msg and "norm.weight" in msg and "extra.weight" in msg and "head.weight" in msg
    assert "(7, 64)" in msg
    assert all(torch.equal(v, before[k]) for k, v in dst.state_dict().items())  # nothing half-loaded


def test_unsafe_pickle_refused_unless_allowed(tmp_path, src):
    path = tmp_path / "odd.pth"
    torch.save({"state_dict": src.state_dict(), "extra": hashlib.sha256}, path)  # arbitrary global
    with pytest.raises(CheckpointError, match="allow_unsafe_pickle"):
        load_checkpoint(_model(2), path)
    dst = _model(2)
    load_checkpoint(dst, path, allow_unsafe_pickle=True)
    assert _same_weights(dst, src)


@pytest.mark.parametrize("content", [b"", b"not a checkpoint"])
def test_unreadable_files_name_the_file(tmp_path, content):
    path = tmp_path / "junk.pth"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match="junk.pth"):
        load_checkpoint(_model(2), path)
    with pytest.raises(CheckpointError, match="missing.pth"):
        load_checkpoint(_model(2), tmp_path / "missing.pth")


def test_dict_without_state_dict_is_rejected(tmp_path):
    path = tmp_path / "meta.pth"
    torch.save({"epoch": 1, "optimizer": {"lr": 0.1}}, path)
    with pytest.raises(CheckpointError, match="no state dict"):
        load_checkpoint(_model(2), path)


def test_wrapper_accepts_inner_classifier_checkpoint(tmp_path):
    torch.manual_seed(0)
    vit = create_token_model("vit_tiny_patch16_224", num_classes=10, img_size=32, depth=1)
    path = tmp_path / "vit.pth"
    torch.save({"state_dict": vit.model.state_dict()}, path)
    torch.manual_seed(1)
    dst = create_token_model("vit_tiny_patch16_224", num_classes=10, img_size=32, depth=1)
    load_checkpoint(dst, path)
    assert _same_weights(dst.model, vit.model)
    torch.save(vit.state_dict(), path)  # the wrapper's own state dict, token head included
    load_checkpoint(dst, path)
    assert _same_weights(dst, vit)


def test_compiled_model_state_dicts_round_trip(tmp_path, src):
    # torch.compile prefixes keys with `_orig_mod.`; nothing is compiled until the first call
    path = tmp_path / "compiled.pth"
    torch.save({"state_dict": torch.compile(src).state_dict()}, path)
    assert next(iter(torch.load(path)["state_dict"])).startswith("_orig_mod.")
    plain, compiled = _model(2), torch.compile(_model(3))
    load_checkpoint(plain, path)
    load_checkpoint(compiled, path)
    assert _same_weights(plain, src) and _same_weights(compiled._orig_mod, src)
