import math

import pytest
import torch

from lit_rlhf.ops.masking import (
    first_true_index,
    last_true_index,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
    position_ids_from_mask,
    truncate_after_eos,
)


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 7, generator=g, dtype=torch.float64)
    mask = torch.rand(4, 7, generator=g) > 0.4
    mask[2] = False  # an empty row
    mask[0, 0] = True
    return x, mask


def _selected(x, mask):
    return [x[b, t].item() for b in range(x.shape[0]) for t in range(x.shape[1]) if mask[b, t]]


def test_masked_sum_and_mean_match_loops(batch):
    x, mask = batch
    vals = _selected(x, mask)
    assert masked_sum(x, mask).item() == pytest.approx(sum(vals))
    assert masked_mean(x, mask).item() == pytest.approx(sum(vals) / len(vals))
    row_sum = masked_sum(x, mask, dim=1)
    row_mean = masked_mean(x, mask, dim=1)
    for b in range(x.shape[0]):
        row = [x[b, t].item() for t in range(x.shape[1]) if mask[b, t]]
        assert row_sum[b].item() == pytest.approx(sum(row))
        assert row_mean[b].item() == pytest.approx(sum(row) / len(row) if row else 0.0)


def test_masked_mean_empty_mask_is_zero_and_padding_nan_ignored(batch):
    x, mask = batch
    assert masked_mean(x, torch.zeros_like(mask)).item() == 0.0
    poisoned = x.masked_fill(~mask, float("nan")).requires_grad_()
    out = masked_mean(poisoned, mask.long())  # 0/1 mask works too
    assert out.item() == pytest.approx(masked_mean(x, mask).item())
    out.backward()
    assert torch.isfinite(poisoned.grad).all()
    assert (poisoned.grad[~mask] == 0).all()


def test_masked_var_matches_torch(batch):
    x, mask = batch
    sel = torch.tensor(_selected(x, mask), dtype=torch.float64)
    assert masked_var(x, mask).item() == pytest.approx(sel.var(unbiased=True).item())
    assert masked_var(x, mask, unbiased=False).item() == pytest.approx(
        sel.var(unbiased=False).item()
    )
    one = torch.zeros_like(mask)
    one[0, 3] = True
    assert masked_var(x, one).item() == 0.0
    assert masked_var(x, torch.zeros_like(mask)).item() == 0.0


def test_masked_whiten(batch):
    x, mask = batch
    sel = torch.tensor(_selected(x, mask), dtype=torch.float64)
    mean, var = sel.mean(), sel.var(unbiased=True)
    w = masked_whiten(x, mask)
    expected = (x - mean) / torch.sqrt(var + 1e-8)
    torch.testing.assert_close(w[mask], expected[mask])
    assert (w[~mask] == 0).all()
    assert masked_mean(w, mask).item() == pytest.approx(0.0, abs=1e-9)
    assert masked_var(w, mask).item() == pytest.approx(1.0, rel=1e-6)
    w_keep = masked_whiten(x, mask, shift_mean=False)
    torch.testing.assert_close(w_keep[mask], (expected + mean)[mask])
    assert (w_keep[~mask] == 0).all()


def test_position_ids_left_and_right_padding():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    expected = torch.tensor([[0, 0, 0, 1, 2], [0, 1, 2, 2, 2], [0, 1, 2, 3, 4]])
    out = position_ids_from_mask(mask.bool())
    assert out.dtype == torch.long
    assert torch.equal(out, expected)
    assert torch.equal(position_ids_from_mask(mask), expected)


def test_first_and_last_true_index_match_loop(batch):
    _, mask = batch
    last, first = last_true_index(mask), first_true_index(mask)
    assert last.dtype == first.dtype == torch.long
    for b in range(mask.shape[0]):
        idx = [t for t in range(mask.shape[1]) if mask[b, t]]
        assert last[b].item() == (idx[-1] if idx else -1)
        assert first[b].item() == (idx[0] if idx else mask.shape[1])


def _naive_truncate(ids, eos_ids, pad):
    out_ids, out_mask, out_has = [], [], []
    for row in ids.tolist():
        seen = False
        r, m = [], []
        for tok in row:
            r.append(pad if seen else tok)
            m.append(not seen)
            if tok in eos_ids:
                seen = True
        out_ids.append(r)
        out_mask.append(m)
        out_has.append(any(tok in eos_ids for tok in row))
    return torch.tensor(out_ids), torch.tensor(out_mask), torch.tensor(out_has)


@pytest.mark.parametrize(
    "eos,pad", [(2, 0), (2, 2), ([2, 5], 0)], ids=["distinct", "pad-is-eos", "eos-list"]
)
def test_truncate_after_eos_matches_loop(eos, pad):
    ids = torch.tensor(
        [
            [7, 8, 2, 9, 2, 4],  # tokens after EOS, a second EOS
            [7, 8, 9, 4, 3, 6],  # no EOS
            [2, 7, 7, 7, 7, 7],  # EOS first
            [7, 5, 2, 2, 2, 2],  # already padded with EOS; 5 is an EOS in the list case
            [7, 8, 9, 4, 3, 2],  # EOS last
        ]
    )
    original = ids.clone()
    out, mask, has = truncate_after_eos(ids, eos, pad)
    eos_ids = eos if isinstance(eos, list) else [eos]
    ref_ids, ref_mask, ref_has = _naive_truncate(ids, eos_ids, pad)
    assert torch.equal(out, ref_ids)
    assert torch.equal(mask, ref_mask) and mask.dtype == torch.bool
    assert torch.equal(has, ref_has) and has.dtype == torch.bool
    assert torch.equal(ids, original)


def test_truncate_mask_independent_of_pad_id():
    ids = torch.tensor([[4, 4, 1, 4, 4]])
    _, mask_a, _ = truncate_after_eos(ids, eos_token_id=1, pad_token_id=4)
    _, mask_b, _ = truncate_after_eos(ids, eos_token_id=1, pad_token_id=1)
    assert mask_a.tolist() == mask_b.tolist() == [[True, True, True, False, False]]


def test_truncate_rejects_1d():
    with pytest.raises(ValueError, match="response_ids"):
        truncate_after_eos(torch.tensor([1, 2]), 2, 0)


def test_reductions_bf16_count_exact():
    x = torch.ones(1, 1000, dtype=torch.bfloat16)
    mask = torch.ones(1, 1000, dtype=torch.bool)
    assert math.isclose(masked_mean(x, mask).float().item(), 1.0, rel_tol=1e-2)
