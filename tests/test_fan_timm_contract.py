"""timm's model contract for FAN (as judged for XCiT/CaiT) and the shared `forward_tokens` call.

Fast checks on the 64-px test config; timm's own model tests are run against the registry by hand
(docs/models.md, "Conformance")."""
import pytest
import timm
import torch

from labeler.models import TokenForward, create_token_model

TEST = "fan_test_p4_hybrid"
X = torch.randn(2, 3, 64, 64)


@pytest.fixture(scope="module", params=[TEST, TEST + "_token"])
def model(request):
    torch.manual_seed(0)
    return timm.create_model(request.param, num_classes=10).eval()


def test_every_fan_name_has_its_own_cfg():
    names = timm.list_models("fan_*", name_matches_cfg=True)
    sizes = ["fan_tiny_8_p4_hybrid", "fan_small_12_p4_hybrid", "fan_base_16_p4_hybrid", "fan_large_16_p4_hybrid", TEST]
    assert sorted(names) == sorted(s + t for s in sizes for t in ("", "_token"))
    for name in names:
        cfg = timm.get_pretrained_cfg(name).to_dict()
        assert cfg["architecture"] == name and cfg["classifier"] == "head" and not cfg["url"]


def test_forward_returns_class_logits_tensor(model):
    with torch.no_grad():
        out = model(X)
    assert isinstance(out, torch.Tensor) and out.shape == (2, 10)
    assert model.head_hidden_size == model.num_features == 64 and model.num_prefix_tokens == 1
    assert model.patch_embed.grid_size == (4, 4)


def test_forward_is_forward_head_of_forward_features(model):
    with torch.no_grad():
        feats = model.forward_features(X)
        pre = model.forward_head(feats, pre_logits=True)
        torch.testing.assert_close(model.forward_head(feats), model(X))
    assert feats.shape == (2, 1 + 16, 64)
    torch.testing.assert_close(pre, feats[:, 0])  # the class token is the pooled feature


def test_token_model_forward_tokens_and_its_class_score():
    torch.manual_seed(0)
    m = timm.create_model(TEST + "_token", num_classes=10).eval()
    with torch.no_grad():
        cls_logits, token_logits = m.forward_tokens(X)
        out = m(X)
    assert cls_logits.shape == (2, 10) and token_logits.shape == (2, 16, 10)
    torch.testing.assert_close(cls_logits, m.head(m.forward_features(X)[:, 0]))
    # forward = class head + half the best per-patch score (timm's VOLO / token labelling rule)
    torch.testing.assert_close(out, cls_logits + 0.5 * token_logits.amax(1))


def test_every_parameter_gets_a_gradient_from_forward():
    m = timm.create_model(TEST + "_token", num_classes=5).train()
    m(X).mean().backward()
    assert [n for n, p in m.named_parameters() if p.grad is None] == []


@pytest.mark.parametrize("how", ["reset", "create"])
def test_no_classifier_gives_pooled_features(how):
    name = TEST + "_token"
    m = timm.create_model(name, num_classes=0 if how == "create" else 10).eval()
    if how == "reset":
        m.reset_classifier(0)
    with torch.no_grad():
        out = m(X)
        pre = m.forward_head(m.forward_features(X), pre_logits=True)
    assert m.num_classes == 0 and out.shape == pre.shape == (2, m.head_hidden_size)
    torch.testing.assert_close(out, pre)
    m.reset_classifier(7)
    assert m(X).shape == (2, 7) and m.forward_tokens(X)[1].shape == (2, 16, 7)


@pytest.mark.parametrize("fmt, shape", [("NCHW", (2, 64, 4, 4)), ("NLC", (2, 16, 64))])
def test_forward_intermediates_matches_forward_features(model, fmt, shape):
    with torch.no_grad():
        final, inter = model.forward_intermediates(X, indices=2, output_fmt=fmt)
        only = model.forward_intermediates(X, indices=[0], output_fmt=fmt, intermediates_only=True)
        torch.testing.assert_close(final, model.forward_features(X))
    assert [t.shape for t in inter] == [shape, shape] and len(only) == 1
    torch.testing.assert_close(only[0], inter[0])
    with pytest.raises(ValueError, match="output_fmt"):
        model.forward_intermediates(X, output_fmt="NHWC")


def test_features_only_and_pruning():
    f = timm.create_model(TEST + "_token", features_only=True, out_indices=(1,)).eval()
    assert f.feature_info.channels() == [64] and f.feature_info.reduction() == [16]
    (out,) = f(X)
    assert out.shape == (2, 64, 4, 4)
    m = timm.create_model(TEST, num_classes=10)
    assert m.prune_intermediate_layers([0]) == [0]
    assert len(m.blocks) == 1 and len(m.cls_attn_blocks) == 0 and m.num_classes == 0


# timm still tests its models under TorchScript; torch marks torch.jit.script deprecated, which is not ours to fix.
@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
def test_torchscript_forward_matches_eager(model):
    scripted = torch.jit.script(model)
    with torch.no_grad():
        torch.testing.assert_close(scripted(X), model(X))


def test_token_forward_and_wrapper_offer_the_same_two_calls():
    """FAN token twins, TokenHeadWrapper and TokenForward (what DDP / compile wrap) agree on the contract."""
    torch.manual_seed(0)
    wrapped = create_token_model("convnext_atto", num_classes=10).eval()
    fan = timm.create_model(TEST + "_token", num_classes=10).eval()
    with torch.no_grad():
        for m in (wrapped, fan):
            assert m(X).shape == (2, 10)
            cls_logits, token_logits = m.forward_tokens(X)
            adapted = TokenForward(m)
            for a, b in zip(adapted(X), (cls_logits, token_logits)):
                torch.testing.assert_close(a, b)
            assert adapted.token_grid((64, 64)) == m.token_grid((64, 64))
    torch.testing.assert_close(wrapped(X), wrapped.model(X))
    with pytest.raises(TypeError, match="forward_tokens"):
        TokenForward(torch.nn.Linear(2, 2))
