"""FAN-Hybrid behaviour: shapes at several sizes, train/eval, drop-path, AMP, channels_last,
gradient checkpointing, torch.compile, timm integration."""
import shutil

import pytest
import timm
import torch

from timm.optim import create_optimizer_v2

from labeler.models import FanHybrid, FanSize, TokenForward, create_token_model, token_grid

NAME = "fan_test_p4_hybrid_token"
# Only a platform without dynamo (or, to compile on CPU, without a C++ compiler for inductor) skips the
# compile tests; any error of tracing or compiling itself fails them.
NO_DYNAMO = not torch._dynamo.is_dynamo_supported()
NO_CXX = not any(shutil.which(c) for c in ("g++", "c++", "clang++"))


@pytest.fixture()
def model():
    torch.manual_seed(0)
    return create_token_model(NAME, num_classes=10).eval()


@pytest.mark.parametrize("hw, grid", [((64, 64), (4, 4)), ((96, 80), (6, 5)), ((50, 71), (3, 4))])
def test_output_shapes_follow_the_grid(model, hw, grid):
    assert token_grid(model, hw) == grid
    with torch.no_grad():
        cls_logits, token_logits = model.forward_tokens(torch.randn(2, 3, *hw))
    assert cls_logits.shape == (2, 10) and token_logits.shape == (2, grid[0] * grid[1], 10)


def test_full_size_grids_and_prefix_tokens():
    with torch.device("meta"):
        m = timm.create_model("fan_tiny_8_p4_hybrid_token")
    assert (token_grid(m, (224, 224)), token_grid(m, (256, 256)), m.num_prefix_tokens) == ((14, 14), (16, 16), 1)
    assert m.patch_embed.grid_size == (14, 14) and m.num_classes == 1000
    with pytest.raises(ValueError, match="smaller"):
        token_grid(m, (8, 224))


def test_tokens_are_row_major(model):
    """A change confined to the top-right 16x16 patch moves token (row 0, col 3) the most."""
    x = torch.randn(1, 3, 64, 128)  # grid 4 x 8
    y = x.clone()
    y[..., 0:16, 48:64] += 3.0
    with torch.no_grad():
        delta = (model.forward_tokens(x)[1] - model.forward_tokens(y)[1]).abs().sum(-1)[0]
    assert delta.argmax().item() == 0 * 8 + 3


def test_plain_twin_returns_class_logits_only():
    m = timm.create_model("fan_test_p4_hybrid", num_classes=5).eval()
    out = m(torch.randn(1, 3, 64, 64))
    assert isinstance(out, torch.Tensor) and out.shape == (1, 5) and m.aux_head is None
    with pytest.raises(TypeError, match="_token"):
        m.forward_tokens(torch.randn(1, 3, 64, 64))


def test_timm_create_model_passes_arguments():
    m = timm.create_model(NAME, num_classes=7, drop_path_rate=0.2)
    assert isinstance(m, FanHybrid) and m.num_classes == 7 and m.aux_head.out_features == 7
    assert all(blk.drop_path.drop_prob == 0.2 for blk in m.blocks)
    assert m.pretrained_cfg["input_size"] == (3, 64, 64)


def test_reset_classifier_resets_both_heads(model):
    model.reset_classifier(3)
    cls_logits, token_logits = model.forward_tokens(torch.randn(1, 3, 64, 64))
    assert cls_logits.shape == (1, 3) and token_logits.shape == (1, 16, 3) and model.num_classes == 3


def test_unknown_and_plain_names_are_rejected():
    with pytest.raises(ValueError, match="unknown model"):
        create_token_model("fan_nonexistent_token", num_classes=10)
    with pytest.raises(ValueError, match="_token"):
        create_token_model("fan_test_p4_hybrid", num_classes=10)


def test_train_step_with_drop_path_updates_every_parameter():
    torch.manual_seed(0)
    m = create_token_model(NAME, num_classes=10, drop_path_rate=0.1).train()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    x, y = torch.randn(4, 3, 64, 64), torch.randint(0, 10, (4,))
    before = {k: v.clone() for k, v in m.named_parameters()}
    cls_logits, token_logits = m.forward_tokens(x)
    loss = torch.nn.functional.cross_entropy(cls_logits, y) + \
        torch.nn.functional.cross_entropy(token_logits.flatten(0, 1), y.repeat_interleave(16))
    loss.backward()
    assert all(p.grad is not None for p in m.parameters())
    opt.step()
    assert all(not torch.equal(p, before[k]) for k, p in m.named_parameters())


def test_drop_path_is_random_in_train_and_off_in_eval():
    torch.manual_seed(0)
    m = create_token_model(NAME, num_classes=10, drop_path_rate=0.5).train()
    x = torch.randn(4, 3, 64, 64)
    with torch.no_grad():
        assert not torch.equal(m.forward_tokens(x)[1], m.forward_tokens(x)[1])
        m.eval()
        assert torch.equal(m.forward_tokens(x)[1], m.forward_tokens(x)[1])


def test_train_mode_updates_batchnorm_statistics(model):
    bn = model.blocks[0].mlp.mlp_v.dwconv.bn
    before = bn.running_mean.clone()
    model.train()(torch.randn(2, 3, 64, 64))
    assert not torch.equal(before, bn.running_mean)


def test_gradient_checkpointing_gives_same_outputs_and_grads(model):
    x = torch.randn(2, 3, 64, 64)
    model.train()
    out = model.forward_tokens(x)
    (out[0].sum() + out[1].sum()).backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad()
    model.set_grad_checkpointing(True)
    out2 = model.forward_tokens(x)
    (out2[0].sum() + out2[1].sum()).backward()
    torch.testing.assert_close(out2[0], out[0])
    for k, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[k], atol=1e-5, rtol=1e-4, msg=lambda m: f"{k}: {m}")


def test_channels_last_matches_contiguous(model):
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = model.forward_tokens(x)
        model.to(memory_format=torch.channels_last)
        out = model.forward_tokens(x.contiguous(memory_format=torch.channels_last))
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_runs_and_stays_close(model, dtype):
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = model.forward_tokens(x)
        with torch.autocast("cpu", dtype=dtype):
            out = model.forward_tokens(x)
    for a, b in zip(out, ref):
        assert torch.isfinite(a).all()
        assert (a.float() - b).abs().max() < 0.25  # half-precision logits stay near float32


@pytest.mark.slow  # ~50 s of compilation on a 2-core CPU
@pytest.mark.timeout(600)
@pytest.mark.skipif(NO_DYNAMO or NO_CXX, reason="torch.compile needs dynamo and a C++ compiler on PATH (CPU backend)")
def test_torch_compile_smoke(model):
    compiled = torch.compile(TokenForward(model))  # as the trainer compiles it
    with torch.no_grad():
        out = compiled(torch.randn(1, 3, 64, 64))
        compiled_cls = torch.compile(model)(torch.zeros(1, 3, 64, 64))  # timm's forward: class logits
    with torch.no_grad():
        ref = model.forward_tokens(torch.zeros(1, 3, 64, 64))
        got = compiled(torch.zeros(1, 3, 64, 64))
        ref_cls = model(torch.zeros(1, 3, 64, 64))
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(compiled_cls, ref_cls, atol=1e-4, rtol=1e-4)
    assert out[1].shape == (1, 16, 10) and token_grid(compiled, (64, 64)) == (4, 4)


def test_optimizer_excludes_class_token_and_gate_temperatures_from_weight_decay(model):
    names = {id(p): n for n, p in model.named_parameters()}
    groups = create_optimizer_v2(model, "adamw", lr=1e-3, weight_decay=0.05).param_groups
    no_decay = {names[id(p)] for g in groups if g["weight_decay"] == 0.0 for p in g["params"]}
    decay = {names[id(p)] for g in groups if g["weight_decay"] > 0.0 for p in g["params"]}
    assert {"cls_token", "blocks.0.mlp.temperature", "blocks.1.mlp.temperature"} <= no_decay
    assert "blocks.0.attn.q.weight" in decay and "aux_head.weight" in decay


@pytest.mark.parametrize("bad", [dict(embed_dim=65, depth=2, num_heads=4), dict(embed_dim=64, depth=0, num_heads=4),
                                 dict(embed_dim=64, depth=2, num_heads=4, img_size=100)])
def test_fan_size_validates(bad):
    with pytest.raises(ValueError, match="FanSize"):
        FanSize(**bad)


@pytest.mark.skipif(NO_DYNAMO, reason="torch._dynamo does not support this platform / Python")
def test_dynamo_traces_without_graph_breaks(model):
    """Fast check that torch.compile can capture the whole model (no C++ compiler needed)."""
    explanations = [torch._dynamo.explain(fn)(torch.randn(1, 3, 64, 64)) for fn in (model, model.forward_tokens)]
    for explanation in explanations:
        assert explanation.graph_break_count == 0, explanation.break_reasons


@pytest.mark.parametrize("bias", [True, False])
def test_the_stencil_depthwise_conv_is_the_depthwise_convolution(bias):
    from labeler.models.fan_layers import depthwise_conv3x3

    torch.manual_seed(0)
    conv = torch.nn.Conv2d(6, 6, 3, padding=1, groups=6, bias=bias)
    x = torch.randn(2, 5, 7, 6)  # (B, H, W, C): non-square, the border included
    want = conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
    torch.testing.assert_close(depthwise_conv3x3(x, conv.weight, conv.bias), want, atol=1e-6, rtol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the weights cast to the activation's dtype, as autocast does
        assert depthwise_conv3x3(x.bfloat16(), conv.weight, conv.bias).dtype == torch.bfloat16


def _graph_ops(fn, *args) -> list[str]:
    """The aten/torch ops of the graph torch.compile captures for fn(*args) (no compiler: the graph is only read)."""
    ops: list[str] = []

    def record(gm, inputs):
        ops.extend(str(node.target) for node in gm.graph.nodes if node.op == "call_function")
        return gm.forward

    torch._dynamo.reset()
    torch.compile(fn, backend=record)(*args)
    return ops


@pytest.mark.skipif(NO_DYNAMO, reason="torch._dynamo does not support this platform / Python")
def test_compiled_depthwise_branches_are_stencils_unless_set_to_conv(model):
    from labeler.models.fan_layers import set_depthwise_impl

    x = torch.randn(1, 3, 64, 64)
    convs = lambda ops: sum("conv2d" in op for op in ops)  # noqa: E731
    stencil = convs(_graph_ops(model.forward_tokens, x))
    set_depthwise_impl(model, "conv")
    conv = convs(_graph_ops(model.forward_tokens, x))
    blocks = len(model.blocks)
    assert conv - stencil == 2 * blocks  # two depthwise convolutions per FAN block, now stencils
    with pytest.raises(ValueError, match="depthwise impl must be one of"):
        set_depthwise_impl(model, "cudnn")
    torch._dynamo.reset()


@pytest.mark.skipif(NO_DYNAMO or NO_CXX, reason="torch.compile needs dynamo and a C++ compiler on PATH (CPU backend)")
def test_the_compiled_stencil_branch_trains_like_the_eager_convolutions():
    from labeler.models.fan_layers import DepthwiseConvBranch

    torch.manual_seed(0)
    eager = DepthwiseConvBranch(8).train()
    compiled_branch = DepthwiseConvBranch(8).train()
    compiled_branch.load_state_dict(eager.state_dict())
    x = torch.randn(2, 12, 8)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    want = eager(xa, (3, 4))
    want.square().sum().backward()
    torch._dynamo.reset()
    out = torch.compile(compiled_branch)(xb, (3, 4))
    out.square().sum().backward()
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(xb.grad, xa.grad, atol=1e-5, rtol=1e-4)
    for (name, a), b in zip(eager.named_parameters(), compiled_branch.parameters()):
        torch.testing.assert_close(b.grad, a.grad, atol=1e-5, rtol=1e-4, msg=name)
    torch.testing.assert_close(compiled_branch.bn.running_mean, eager.bn.running_mean)  # batch statistics too
    torch._dynamo.reset()
