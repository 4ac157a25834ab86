"""labeler.teacher: eval mode, normalisation, top-k + tail on device equal to labelstore's numpy codec."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from labeler.teacher import Teacher, topk_with_tail
from labelstore import encode_topk, topk_log_probs

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class Recorder(torch.nn.Module):
    """Returns fixed logits and records its input and mode, to check what the teacher feeds it."""

    def __init__(self, logits_cls, logits_tok):
        super().__init__()
        self.bn = torch.nn.BatchNorm1d(3)
        self.logits = (logits_cls, logits_tok)
        self.seen = None

    def forward(self, x):
        return self.forward_tokens(x)[0]

    def forward_tokens(self, x):
        self.seen = (x.clone(), self.training, torch.is_grad_enabled())
        n = x.shape[0]
        return self.logits[0][:n], self.logits[1][:n]


def test_topk_with_tail_matches_numpy_codec():
    logits = torch.randn(5, 7, 50, generator=torch.Generator().manual_seed(0)) * 4
    for k in (1, 5, 50):
        vals, ids, tail = topk_with_tail(logits, k)
        ref = encode_topk(logits.numpy(), k)
        np.testing.assert_array_equal(ids.numpy(), ref.cls)
        np.testing.assert_array_equal(vals.half().numpy(), ref.logit)
        np.testing.assert_allclose(tail.half().numpy().astype(np.float32), ref.tail_lse.astype(np.float32), rtol=1e-3)
    assert torch.isneginf(topk_with_tail(logits, 50)[2]).all()


def test_teacher_normalises_uses_eval_and_encodes():
    gen = torch.Generator().manual_seed(1)
    cls_logits, tok_logits = torch.randn(4, 20, generator=gen), torch.randn(4, 16, 20, generator=gen)
    model = Recorder(cls_logits, tok_logits).train()
    teacher = Teacher(model, MEAN, STD, topk=3, device="cpu", amp="none")
    views = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8, generator=gen)
    tokens, cls = teacher(views)
    x, training, grad = model.seen
    expected = (views.float() / 255 - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    torch.testing.assert_close(x, expected, rtol=1e-5, atol=1e-5)
    assert not training and not grad
    assert tokens.logit.shape == (4, 16, 3) and tokens.cls.dtype == np.int16 and tokens.tail_lse.shape == (4, 16)
    ref = encode_topk(tok_logits.numpy(), 3)
    np.testing.assert_array_equal(tokens.cls, ref.cls)
    np.testing.assert_allclose(topk_log_probs(tokens), topk_log_probs(ref), atol=2e-3)
    np.testing.assert_array_equal(cls.cls, encode_topk(cls_logits.numpy(), 3).cls)


def test_dense_mode_and_bad_settings():
    model = Recorder(torch.zeros(2, 5), torch.ones(2, 4, 5))
    tokens, cls = Teacher(model, MEAN, STD, topk=0)(np.zeros((2, 3, 4, 4), np.uint8))
    assert tokens.dense and tokens.logit.dtype == np.float16 and tokens.logit.shape == (2, 4, 5)
    with pytest.raises(ValueError, match="amp"):
        Teacher(model, MEAN, STD, topk=1, amp="fp8")
    with pytest.raises(ValueError, match="exceeds"):
        Teacher(model, MEAN, STD, topk=9)(np.zeros((2, 3, 4, 4), np.uint8))
    with pytest.raises(ValueError, match="uint8"):
        Teacher(model, MEAN, STD, topk=1)(np.zeros((2, 3, 4, 4), np.float32))


def test_fan_teacher_amp_bf16_close_to_fp32():
    import labeler.models as models

    torch.manual_seed(0)
    model = models.create_token_model("fan_test_p4_hybrid_token", num_classes=10)
    views = torch.randint(0, 256, (3, 3, 64, 64), dtype=torch.uint8)
    full = Teacher(model, MEAN, STD, topk=10, amp="none")
    tokens, cls = full(views)
    assert tokens.logit.shape == (3, 16, 10) and cls.logit.shape == (3, 10)
    again, _ = full(views)
    np.testing.assert_array_equal(again.logit, tokens.logit)  # eval mode: deterministic
    np.testing.assert_allclose(np.exp(topk_log_probs(tokens)).sum(-1), 1.0, atol=1e-2)  # K = C: no tail mass
    cls32, _ = full.forward(views)
    cls16, _ = Teacher(model, MEAN, STD, topk=10, amp="bf16").forward(views)
    assert cls16.dtype == torch.float32 and (cls16 - cls32).abs().max().item() < 0.5


def test_compile_setting_and_async_encode():
    from labeler.teacher import resolve_compile

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert (resolve_compile("auto", cpu), resolve_compile("auto", cuda)) == (False, True)
    assert resolve_compile(True, cpu) and not resolve_compile("false", cuda)
    with pytest.raises(ValueError, match="compile"):
        resolve_compile("sometimes", cpu)
    logits = torch.randn(6, 4, 40, generator=torch.Generator().manual_seed(3))
    teacher = Teacher(Recorder(logits[:, 0], logits), MEAN, STD, topk=5)
    assert not teacher.compiled
    got, ref = teacher.encode_async(logits).wait(), encode_topk(logits.numpy(), 5)
    np.testing.assert_array_equal(got.cls, ref.cls)
    np.testing.assert_array_equal(got.logit, ref.logit)
    assert got.cls.dtype == ref.cls.dtype and got.tail_lse.dtype == np.float16


def test_channels_last_setting_moves_weights_and_input_and_keeps_the_labels():
    import labeler.models as models
    from labeler.teacher import resolve_channels_last

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert (resolve_channels_last("auto", cpu), resolve_channels_last("auto", cuda)) == (False, True)
    assert resolve_channels_last("true", cpu) and not resolve_channels_last(False, cuda)
    with pytest.raises(ValueError, match="channels_last must be one of"):
        resolve_channels_last("nhwc", cpu)
    torch.manual_seed(0)
    model = models.create_token_model("fan_test_p4_hybrid_token", num_classes=10)
    views = torch.randint(0, 256, (3, 3, 64, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(4))
    plain_tokens, plain_cls = Teacher(model, MEAN, STD, topk=4, amp="none")(views)
    teacher = Teacher(model, MEAN, STD, topk=4, amp="none", channels_last=True)
    stem = teacher.model.patch_embed.backbone.stem[0].weight
    assert teacher.channels_last and stem.is_contiguous(memory_format=torch.channels_last) and not stem.is_contiguous()
    assert teacher.normalize(views).is_contiguous(memory_format=torch.channels_last)
    tokens, cls = teacher(views)
    np.testing.assert_array_equal(tokens.cls, plain_tokens.cls)
    np.testing.assert_allclose(tokens.logit.astype(np.float32), plain_tokens.logit.astype(np.float32), atol=2e-3)
    np.testing.assert_allclose(cls.tail_lse.astype(np.float32), plain_cls.tail_lse.astype(np.float32), atol=2e-3)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_compiled_teacher_encodes_as_the_eager_one():
    """compile: forward, input normalisation and top-k + tail compiled (the GPU default); same labels as eager."""
    import labeler.models as models

    torch.manual_seed(0)
    model = models.create_token_model("fan_test_p4_hybrid_token", num_classes=10)
    views = torch.randint(0, 256, (4, 3, 64, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(5))
    for amp in ("none", "bf16"):
        eager = Teacher(model, MEAN, STD, topk=4, amp=amp)
        compiled = Teacher(model, MEAN, STD, topk=4, amp=amp, compile=True)
        assert compiled.compiled and not eager.compiled
        want = [c.wait() for c in eager.encode_views_async(views)]
        got = [c.wait() for c in compiled.encode_views_async(views)]
        for g, w in zip(got, want):
            assert (g.cls[..., 0] == w.cls[..., 0]).mean() > 0.9, amp
            np.testing.assert_allclose(np.exp(topk_log_probs(g)), np.exp(topk_log_probs(w)), atol=0.02 if amp == "bf16" else 1e-3)
        cls_logits, _ = compiled.forward(views)  # the bare forward shares the compiled model with the batch's work
        assert cls_logits.dtype == torch.float32 and cls_logits.shape == (4, 10)
