"""Losses of both stages (paper Eq. 2 and Eq. 5) against hand-computed values."""
import math

import pytest
import torch
import torch.nn.functional as F

from trainer.losses import labeler_loss, soft_target_cross_entropy, student_loss


def test_soft_ce_equals_hard_ce_for_one_hot_targets():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 5, generator=g)
    y = torch.tensor([0, 4, 2, 2, 1, 3])
    assert torch.allclose(soft_target_cross_entropy(logits, F.one_hot(y, 5).float()), F.cross_entropy(logits, y))


def test_soft_ce_by_hand_for_a_soft_target():
    logits = torch.tensor([[0.0, math.log(3.0)]])  # softmax = (1/4, 3/4)
    target = torch.tensor([[0.5, 0.5]])
    expected = -(0.5 * math.log(0.25) + 0.5 * math.log(0.75))
    assert soft_target_cross_entropy(logits, target).item() == pytest.approx(expected, rel=1e-6)


def test_soft_ce_runs_in_float32_under_bf16_logits():
    logits = torch.randn(4, 1000).bfloat16()
    target = torch.full((4, 1000), 1.0 / 1000)
    out = soft_target_cross_entropy(logits, target)
    assert out.dtype == torch.float32
    assert out.item() == pytest.approx(F.cross_entropy(logits.float(), target).item(), rel=1e-5)


def test_soft_ce_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="differ in shape"):
        soft_target_cross_entropy(torch.zeros(2, 3), torch.zeros(2, 4))


def test_labeler_loss_averages_token_logits_not_token_losses():
    # Two tokens with opposite logits: their mean logit is flat, so the token term is log(C),
    # whereas the mean of per-token CEs would be larger. Eq. 2 averages the logits.
    cls_logits = torch.zeros(1, 2)
    token_logits = torch.tensor([[[5.0, -5.0], [-5.0, 5.0]]])
    target = torch.tensor([[1.0, 0.0]])
    terms = labeler_loss(cls_logits, token_logits, target, alpha=0.5)
    assert terms.token.item() == pytest.approx(math.log(2.0), rel=1e-6)
    assert terms.cls.item() == pytest.approx(math.log(2.0), rel=1e-6)
    assert terms.total.item() == pytest.approx(1.5 * math.log(2.0), rel=1e-6)


def test_student_loss_is_cls_plus_beta_times_mean_token_ce():
    g = torch.Generator().manual_seed(1)
    cls_logits, token_logits = torch.randn(3, 7, generator=g), torch.randn(3, 4, 7, generator=g)
    cls_target = torch.softmax(torch.randn(3, 7, generator=g), -1)
    token_target = torch.softmax(torch.randn(3, 4, 7, generator=g), -1)
    terms = student_loss(cls_logits, token_logits, cls_target, token_target, beta=2.0)
    per_token = [soft_target_cross_entropy(token_logits[b, t:t + 1], token_target[b, t:t + 1])
                 for b in range(3) for t in range(4)]
    token_mean = torch.stack(per_token).mean()
    assert terms.token.item() == pytest.approx(token_mean.item(), rel=1e-5)
    assert terms.total.item() == pytest.approx(terms.cls.item() + 2.0 * token_mean.item(), rel=1e-5)


def test_student_loss_without_token_target_is_class_only_and_backpropagates():
    cls_logits = torch.randn(2, 3, requires_grad=True)
    target = F.one_hot(torch.tensor([0, 2]), 3).float()
    terms = student_loss(cls_logits, None, target, None)
    assert terms.token.item() == 0.0 and terms.total.item() == pytest.approx(terms.cls.item())
    terms.total.backward()
    assert cls_logits.grad is not None


def test_student_loss_needs_token_logits_when_given_token_target():
    with pytest.raises(ValueError, match="token logits"):
        student_loss(torch.zeros(1, 2), None, torch.ones(1, 2) / 2, torch.ones(1, 3, 2) / 2)


def _loss_inputs(seed: int, token_target: bool):
    g = torch.Generator().manual_seed(seed)
    b, t, c = 3, 5, 7
    cls_logits = torch.randn(b, c, generator=g).bfloat16().requires_grad_()
    token_logits = torch.randn(b, t, c, generator=g).bfloat16().requires_grad_()
    cls_target = torch.softmax(torch.randn(b, c, generator=g), -1)
    tokens = torch.softmax(3 * torch.randn(b, t, c, generator=g), -1) if token_target else None
    return cls_logits, token_logits, cls_target, tokens


@pytest.mark.parametrize("stage, token_target", [("student", True), ("student", False), ("labeler", False)])
def test_the_compiled_loss_equals_the_eager_one_in_value_and_gradient(stage, token_target):
    """model.compile compiles the loss too (trainer.loop.compile_loss): same terms, same gradients."""
    from functools import partial

    from trainer.loop import compile_loss

    fn = partial(student_loss, beta=0.5) if stage == "student" else \
        (lambda c, t, y, _tokens: labeler_loss(c, t, y, alpha=0.5))
    results = []
    for loss_fn in (fn, compile_loss(fn)):
        inputs = _loss_inputs(0, token_target)
        terms = loss_fn(*inputs)
        terms.total.backward()
        results.append((terms, inputs[0].grad, inputs[1].grad))
    (eager, eager_cls_grad, eager_tok_grad), (comp, comp_cls_grad, comp_tok_grad) = results
    for a, b in ((eager.total, comp.total), (eager.cls, comp.cls), (eager.token, comp.token)):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6), (a, b)
    assert torch.allclose(eager_cls_grad.float(), comp_cls_grad.float(), rtol=1e-2, atol=1e-4)
    if stage == "student" and not token_target:
        assert comp_tok_grad is None and eager_tok_grad is None
    else:
        assert torch.allclose(eager_tok_grad.float(), comp_tok_grad.float(), rtol=1e-2, atol=1e-4)


def test_loss_wrappers_share_one_compile():
    """The bench's step-only loss and the loop's are separate compile_loss wrappers of one function: the second
    must reuse the first's graph, or a compile would land inside a timed run."""
    from functools import partial

    from torch._dynamo.utils import counters

    from trainer.loop import compile_loss

    torch._dynamo.reset()
    counters.clear()
    for _ in range(2):
        compile_loss(partial(student_loss, beta=1.0))(*_loss_inputs(1, True)).total.backward()
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
