import math

import pytest
import torch

from lit_rlhf.ops.logprobs import entropy_from_logits, selective_log_softmax, token_logprobs


def _logits(shape=(3, 5, 11), dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * 4).to(dtype)


def _naive(logits, index, temperature=1.0):
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    return logp.gather(-1, index.unsqueeze(-1)).squeeze(-1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("chunk_rows", [1, 4, 2048])
def test_selective_log_softmax_matches_naive(dtype, chunk_rows):
    logits = _logits(dtype=dtype)
    index = torch.randint(0, 11, (3, 5), generator=torch.Generator().manual_seed(1))
    out = selective_log_softmax(logits, index, chunk_rows=chunk_rows)
    assert out.shape == (3, 5)
    assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    torch.testing.assert_close(out.float(), _naive(logits, index), atol=1e-5, rtol=0)


def test_selective_log_softmax_temperature_and_gradient():
    logits = _logits(dtype=torch.float64).requires_grad_()
    index = torch.randint(0, 11, (3, 5), generator=torch.Generator().manual_seed(2))
    out = selective_log_softmax(logits, index, temperature=0.7, chunk_rows=2)
    weights = torch.randn(3, 5, dtype=torch.float64)
    (grad,) = torch.autograd.grad((out * weights).sum(), logits)
    ref_logits = logits.detach().clone().requires_grad_()
    ref = torch.log_softmax(ref_logits / 0.7, -1).gather(-1, index.unsqueeze(-1)).squeeze(-1)
    (ref_grad,) = torch.autograd.grad((ref * weights).sum(), ref_logits)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(grad, ref_grad)


def test_selective_log_softmax_leaves_input_untouched_and_checks_shape():
    logits = _logits(dtype=torch.bfloat16)
    before = logits.clone()
    selective_log_softmax(logits, torch.zeros(3, 5, dtype=torch.long), temperature=2.0)
    assert torch.equal(logits, before)
    with pytest.raises(ValueError, match="index shape"):
        selective_log_softmax(logits, torch.zeros(3, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="temperature"):
        selective_log_softmax(logits, torch.zeros(3, 5, dtype=torch.long), temperature=0.0)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_token_logprobs_matches_loop(temperature):
    logits = _logits(shape=(2, 6, 9))
    ids = torch.randint(0, 9, (2, 6), generator=torch.Generator().manual_seed(3))
    out = token_logprobs(logits, ids, temperature=temperature)
    assert out.shape == (2, 5)
    for b in range(2):
        for t in range(5):
            logp = torch.log_softmax(logits[b, t] / temperature, -1)
            assert out[b, t].item() == pytest.approx(logp[ids[b, t + 1]].item(), abs=1e-5)


def test_token_logprobs_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="input_ids"):
        token_logprobs(torch.zeros(2, 6, 9), torch.zeros(2, 5, dtype=torch.long))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_entropy_matches_naive(dtype):
    logits = _logits(dtype=dtype)
    for temperature in (1.0, 1.5):
        out = entropy_from_logits(logits, temperature=temperature, chunk_rows=3)
        p = torch.softmax(logits.float() / temperature, -1)
        ref = -(p * torch.log(p)).sum(-1)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


def test_entropy_edge_cases():
    uniform = torch.zeros(2, 3, 8)
    torch.testing.assert_close(entropy_from_logits(uniform), torch.full((2, 3), math.log(8)))
    banned = torch.zeros(1, 1, 4)
    banned[..., 2:] = float("-inf")  # two tokens impossible: entropy log 2, not NaN
    assert entropy_from_logits(banned).item() == pytest.approx(math.log(2))
