"""FAN-Hybrid against the reference facts: key lists, parameter counts, golden outputs (tests/data/)."""
import json
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file

import labeler.models  # noqa: F401  (registers fan_* in timm)

DATA = Path(__file__).parent / "data"
SIZES = ["fan_tiny_8_p4_hybrid", "fan_small_12_p4_hybrid", "fan_base_16_p4_hybrid", "fan_large_16_p4_hybrid"]
# docs/models.md table (1000 classes): plain, token.
PARAMS = {
    "fan_tiny_8_p4_hybrid": (7_467_240, 7_660_240),
    "fan_small_12_p4_hybrid": (26_117_944, 26_502_944),
    "fan_base_16_p4_hybrid": (50_475_048, 50_924_048),
    "fan_large_16_p4_hybrid": (76_855_140, 77_336_140),
}
TAGS = ["2x64x64", "1x96x80", "1x76x92"]


def read_keys_tsv(path: Path) -> tuple[list[tuple[str, list[int], str, str]], int]:
    rows, total = [], None
    for line in path.read_text().splitlines():
        if line.startswith("# total_params:"):
            total = int(line.split(":")[1])
        if line.startswith("#") or line.startswith("key\t"):
            continue
        key, shape, dtype, kind = line.split("\t")
        rows.append((key, json.loads(shape), dtype, kind))
    return rows, total


def model_rows(model: torch.nn.Module) -> list[tuple[str, list[int], str, str]]:
    params = {n for n, _ in model.named_parameters()}
    return [(k, list(v.shape), str(v.dtype).removeprefix("torch."), "param" if k in params else "buffer")
            for k, v in model.state_dict().items()]


@pytest.mark.parametrize("size", SIZES)
def test_token_model_keys_shapes_and_order_match_reference(size):
    expected, total = read_keys_tsv(DATA / f"{size}_token.keys.tsv")
    with torch.device("meta"):
        model = timm.create_model(f"{size}_token")
    rows = model_rows(model)
    assert [r[0] for r in rows] == [r[0] for r in expected]
    assert rows == expected
    assert sum(p.numel() for p in model.parameters()) == total == PARAMS[size][1]


@pytest.mark.parametrize("size", SIZES)
def test_plain_model_is_token_model_without_aux_head(size):
    expected, _ = read_keys_tsv(DATA / f"{size}_token.keys.tsv")
    with torch.device("meta"):
        model = timm.create_model(size)
    assert model_rows(model) == [r for r in expected if not r[0].startswith("aux_head.")]
    assert sum(p.numel() for p in model.parameters()) == PARAMS[size][0]


def test_pretrained_cfg_is_imagenet_224_bicubic():
    with torch.device("meta"):
        model = timm.create_model("fan_small_12_p4_hybrid_token")
    cfg = model.pretrained_cfg
    assert cfg["input_size"] == (3, 224, 224) and cfg["crop_pct"] == 1.0 and cfg["interpolation"] == "bicubic"
    assert tuple(cfg["mean"]) == timm.data.IMAGENET_DEFAULT_MEAN and tuple(cfg["std"]) == timm.data.IMAGENET_DEFAULT_STD


@pytest.fixture(scope="module")
def golden():
    return load_file(str(DATA / "fan_mini_golden.safetensors"))


@pytest.fixture(scope="module")
def mini(golden):
    """The golden mini model is our registered tiny test config with 10 classes."""
    model = timm.create_model("fan_test_p4_hybrid_token", num_classes=10).eval()
    expected, total = read_keys_tsv(DATA / "fan_mini_golden.keys.tsv")
    assert model_rows(model) == expected and sum(p.numel() for p in model.parameters()) == total
    model.load_state_dict({k: golden[k] for k in model.state_dict()}, strict=True)
    return model


@pytest.mark.parametrize("tag", TAGS)
def test_golden_outputs_standard_layernorm(mini, golden, tag):
    with torch.no_grad():
        cls_logits, token_logits = mini.forward_tokens(golden[f"input_{tag}"])
    torch.testing.assert_close(cls_logits, golden[f"stdln_cls_logits_{tag}"], atol=1e-4, rtol=0)
    torch.testing.assert_close(token_logits, golden[f"stdln_token_logits_{tag}"], atol=1e-4, rtol=0)
    h, w = golden[f"input_{tag}"].shape[-2:]
    gh, gw = labeler.models.token_grid(mini, (h, w))
    assert token_logits.shape[1] == gh * gw


def test_golden_grids_for_odd_sizes(mini):
    # From fan_mini_golden.md: 96x80 -> 6x5, 76x92 (floors in every stride) -> 4x5.
    assert [labeler.models.token_grid(mini, hw) for hw in [(64, 64), (96, 80), (76, 92), (224, 224), (256, 256)]] \
        == [(4, 4), (6, 5), (4, 5), (14, 14), (16, 16)]


def test_golden_intermediates(mini, golden):
    """Stage by stage, so a failure names the first module that departs from the reference."""
    x = golden["input_2x64x64"]

    def expect(stage, value):
        torch.testing.assert_close(value, golden[f"stdln_debug_{stage}_2x64x64"], atol=1e-4, rtol=0,
                                   msg=lambda m: f"{stage}: {m}")

    with torch.no_grad():
        trunk = mini.patch_embed.backbone
        stem = trunk.stem(x)
        expect("backbone_stem", stem)
        stage0 = trunk.stages[0](stem)
        expect("backbone_stage0", stage0)
        expect("backbone_stage1", trunk.stages[1](stage0))
        tokens, hw = mini.patch_embed(x)
        expect("patch_embed", tokens)
        pos = mini.pos_embed(2, *hw)
        expect("pos_encoding", pos)
        tokens = tokens + pos.flatten(2).transpose(1, 2)
        expect("tokens_with_pos", tokens)
        for i, blk in enumerate(mini.blocks):
            tokens = blk(tokens, hw)
            expect(f"block{i}", tokens)
        tokens = torch.cat([mini.cls_token.expand(2, -1, -1), tokens], dim=1)
        for i, blk in enumerate(mini.cls_attn_blocks):
            tokens = blk(tokens)
            expect(f"cls_attn_block{i}", tokens)
        expect("final_norm", mini.norm(tokens))
