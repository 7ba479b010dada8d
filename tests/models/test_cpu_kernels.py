"""The CPU attention softmax (models.cpu_kernels) against torch.softmax and TransformerLens."""

import pytest
import torch

from subroutine_circuits.models.cpu_kernels import _Functional, fast_cpu_attention, softmax_lastdim


def test_softmax_lastdim_matches_torch_forward_and_backward():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 3, 7, 7, generator=g, dtype=torch.float64)
    x = x.masked_fill(torch.rand(x.shape, generator=g) < 0.3, float("-inf"))
    x[..., 0] = 0.0  # every row keeps one finite entry
    a = x.clone().requires_grad_()
    b = x.clone().requires_grad_()
    w = torch.randn(x.shape, generator=g, dtype=torch.float64)
    (softmax_lastdim(a) * w).sum().backward()
    (torch.softmax(b, -1) * w).sum().backward()
    assert torch.allclose(softmax_lastdim(x), torch.softmax(x, -1), atol=1e-12)
    assert torch.allclose(a.grad, b.grad, atol=1e-12)
    y = x[..., :1].expand(5, 3, 7, 4).clone().requires_grad_()
    assert torch.autograd.gradcheck(softmax_lastdim, (y,))


def test_all_masked_rows_give_nan_like_torch():
    x = torch.full((2, 4), float("-inf"))
    assert torch.isnan(softmax_lastdim(x)).all() and torch.isnan(torch.softmax(x, -1)).all()


def test_other_dims_and_dtypes_fall_back_to_torch():
    f = _Functional()
    x = torch.randn(3, 4, 5)
    assert torch.equal(f.softmax(x, dim=1), torch.softmax(x, 1))
    want = torch.softmax(x, -1, torch.float64)
    assert torch.equal(f.softmax(x, dim=-1, dtype=torch.float64), want)
    assert f.gelu is torch.nn.functional.gelu


def _count_fast_softmax(monkeypatch) -> list[int]:
    """Count calls of the fast softmax (whichever attention calls it)."""
    from subroutine_circuits.models import cpu_kernels

    calls = [0]
    real = cpu_kernels.softmax_lastdim

    def counted(x):
        calls[0] += 1
        return real(x)

    monkeypatch.setattr(cpu_kernels, "softmax_lastdim", counted)
    return calls


def test_transformer_lens_forward_and_grads_unchanged(tiny_model, tiny_tokens, monkeypatch):
    """Inside the block the model's attention (3.x's or NativeTransformer's) takes the fast
    softmax, re-entrantly, and outputs and gradients equal the plain ones; outside it does not."""
    calls = _count_fast_softmax(monkeypatch)
    ref = tiny_model(tiny_tokens)
    ref.sum().backward()
    assert calls[0] == 0
    grads = [p.grad.clone() for p in tiny_model.parameters()]
    tiny_model.zero_grad()
    with fast_cpu_attention():
        with fast_cpu_attention():  # re-entrant
            pass
        got = tiny_model(tiny_tokens)
        got.sum().backward()
    assert calls[0] == tiny_model.cfg.n_layers
    tiny_model(tiny_tokens)
    assert calls[0] == tiny_model.cfg.n_layers  # switched off again
    assert torch.allclose(got, ref, atol=1e-5)
    for p, gr in zip(tiny_model.parameters(), grads):
        assert torch.allclose(p.grad, gr, atol=1e-4)


def test_restored_after_an_error(tiny_model, tiny_tokens, monkeypatch):
    calls = _count_fast_softmax(monkeypatch)
    with pytest.raises(RuntimeError), fast_cpu_attention():
        raise RuntimeError("boom")
    with fast_cpu_attention(enabled=False):
        tiny_model(tiny_tokens)
    tiny_model(tiny_tokens)
    assert calls[0] == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_attention_pattern_without_autograd_is_the_two_pass_pattern_bit_for_bit(dtype):
    """The fused no-grad pattern (mask evaluation) equals softmax + NaN zeroing exactly, with
    and without fully masked rows and causal -inf entries."""
    from subroutine_circuits.models.cpu_kernels import (
        attention_pattern,
        fast_cpu_attention,
        softmax_lastdim,
    )

    g = torch.Generator().manual_seed(0)
    x = (torch.randn(6, 3, 9, 9, generator=g) * 4).to(dtype)
    x = x.masked_fill(~torch.ones(9, 9, dtype=torch.bool).tril(), float("-inf"))
    empty = x.clone()
    empty[1, 2, 4] = float("-inf")  # a row with every key masked: NaN, then 0
    empty[3, :, :, 0] = float("-inf")  # first query of each head of problem 3: no key left
    for scores in (x, empty):
        p = softmax_lastdim(scores)
        expected = torch.where(torch.isnan(p), torch.zeros_like(p), p)
        with fast_cpu_attention(), torch.no_grad():
            got = attention_pattern(scores)
        assert torch.equal(got, expected)
        assert not torch.isnan(got).any()
    assert (attention_pattern(empty)[1, 2, 4] == 0).all()  # the autograd path zeroes too
