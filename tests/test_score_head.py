"""The MLP score head: install, save/load round trips (plain and sharded), bias folding, errors."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForSequenceClassification

from lit_rlhf.models import heads
from lit_rlhf.models.loading import ModelLoadError, load_sequence_classifier
from lit_rlhf.models.tiny import tiny_config

TEXTS = ["hi", "a somewhat longer review text", "ok then", "x"]


def _classifier(arch, tok, hidden=16, seed=0):
    cfg = tiny_config(arch, 0, hidden_size=32, num_layers=2, num_heads=2, tokenizer=tok)
    cfg.num_labels = 1
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForSequenceClassification.from_config(cfg)
        heads.install_score_head(model, "mlp", hidden)
    return model.eval()


def _batch(tok):
    enc = tok(TEXTS, return_tensors="pt", padding=True)
    return enc["input_ids"], enc["attention_mask"]


def test_install_replaces_the_head_and_records_it(tok):
    model = _classifier("gpt2", tok, hidden=16)
    head = heads.score_head(model)
    assert isinstance(head, heads.MLPScoreHead) and head.in_features == 32
    assert getattr(model.config, heads.HEAD_ATTR) == {"kind": "mlp", "hidden": 16}
    assert heads.has_score_head(model)
    # Same kind and width: kept as it is (training an RM further); otherwise refused.
    assert heads.install_score_head(model, "mlp", 16) is head
    with pytest.raises(ValueError, match="width 16"):
        heads.install_score_head(model, "mlp", 8)
    with pytest.raises(ValueError, match="'linear'"):
        heads.install_score_head(model, "linear")
    with pytest.raises(ValueError, match="unknown score head"):
        heads.install_score_head(model, "attention")


def test_linear_kind_keeps_the_models_own_head(tok):
    cfg = tiny_config("gpt2", 0, hidden_size=32, num_layers=2, num_heads=2, tokenizer=tok)
    cfg.num_labels = 1
    model = AutoModelForSequenceClassification.from_config(cfg)
    before = model.score
    assert heads.install_score_head(model, "linear") is before
    assert getattr(model.config, heads.HEAD_ATTR, None) is None


def test_mlp_head_can_score_a_product_of_features():
    """What a linear head cannot: rank by x0 * x1 (the world's cue sign times sentiment)."""
    torch.manual_seed(0)
    x = torch.randn(2048, 8)
    target = x[:, 0] * x[:, 1]

    def fit(head):
        opt = torch.optim.Adam(head.parameters(), lr=1e-2)
        for _ in range(300):
            loss = (head(x).squeeze(-1) - target).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        return torch.corrcoef(torch.stack([head(x).squeeze(-1), target]))[0, 1].item()

    assert fit(heads.MLPScoreHead(8, 64)) > 0.9
    assert abs(fit(torch.nn.Linear(8, 1))) < 0.2


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("shard", [False, True])
def test_export_round_trip_gives_the_same_scores(tmp_path, tok, arch, shard):
    model = _classifier(arch, tok)
    ids, mask = _batch(tok)
    with torch.no_grad():
        assert heads.fold_reward_bias(model, -0.7) == "head"  # into the output layer's bias
        before = heads.sequence_scores(model, ids, mask)
        values = heads.token_values(model, ids, mask)
    path = tmp_path / "rm"
    model.save_pretrained(path, max_shard_size="20KB" if shard else "5GB")
    assert (path / "model.safetensors.index.json").exists() == shard
    loaded = load_sequence_classifier(str(path), "float32", 0.0, tok).eval()
    assert isinstance(heads.score_head(loaded), heads.MLPScoreHead)
    with torch.no_grad():
        torch.testing.assert_close(heads.sequence_scores(loaded, ids, mask), before)
        torch.testing.assert_close(heads.token_values(loaded, ids, mask), values)
    assert getattr(loaded.config, heads.FOLDED_BIAS_ATTR) == pytest.approx(-0.7)


def test_bf16_model_scores_in_float32(tok):
    model = _classifier("gpt2", tok).to(torch.bfloat16)
    ids, mask = _batch(tok)
    with torch.no_grad():
        out = heads.sequence_scores(model, ids, mask)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


@pytest.mark.parametrize("spec", [{"kind": "transformer"}, {"kind": "mlp"}, "mlp"])
def test_bad_head_description_is_one_clear_error(tmp_path, tok, spec):
    model = _classifier("gpt2", tok)
    path = tmp_path / "rm"
    model.save_pretrained(path)
    config = json.loads((path / "config.json").read_text())
    config[heads.HEAD_ATTR] = spec
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="not a score head this kit knows"):
        load_sequence_classifier(str(path))


def test_missing_head_weights_are_an_error(tmp_path, tok):
    from safetensors.torch import load_file, save_file

    model = _classifier("gpt2", tok)
    path = tmp_path / "rm"
    model.save_pretrained(path)
    state = load_file(path / "model.safetensors")
    del state["score.out.weight"]
    save_file(state, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match=r"lack \['score.out.weight'\]"):
        load_sequence_classifier(str(path))
