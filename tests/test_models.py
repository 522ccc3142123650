"""Model/tokenizer loading, dropout override, reward-bias folding and padding-invariant scores."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForSequenceClassification, GPT2Config, LlamaConfig

from lit_rlhf.models import heads
from lit_rlhf.models.loading import (
    PAD_TOKEN,
    ModelLoadError,
    load_causal_lm,
    load_sequence_classifier,
    load_tokenizer,
    set_config_dropout,
)
from lit_rlhf.models.tiny import tiny_config

TEXTS = ["hi", "a somewhat longer review text", "ok then", "x"]


def _save(model, tokenizer, path):
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def _tiny_classifier(arch, tok, seed=0):
    cfg = tiny_config(arch, 0, hidden_size=32, num_layers=2, num_heads=2, tokenizer=tok)
    cfg.num_labels = 1
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForSequenceClassification.from_config(cfg)
        # A non-trivial final norm, so folding into its bias is really exercised.
        for p in model.parameters():
            p.data.add_(0.05 * torch.randn_like(p))
    return model.eval()


def _batch(tok, texts, side):
    tok.padding_side = side
    enc = tok(texts, padding=True, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


# -- loading ------------------------------------------------------------------------------


def test_load_causal_lm_and_tokenizer_roundtrip(tmp_path, tok, tiny_gpt2):
    model = tiny_gpt2().eval()
    path = _save(model, tok, tmp_path / "lm")

    tok2 = load_tokenizer(path, padding_side="left")
    assert tok2.pad_token_id == tok.pad_token_id != tok2.eos_token_id
    assert tok2.padding_side == "left"
    assert len(tok2) == len(tok)  # nothing added: pad already distinct

    loaded = load_causal_lm(path, dtype="float32", tokenizer=tok2).eval()
    assert next(loaded.parameters()).dtype == torch.float32
    ids = torch.tensor([tok("hello world")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)
    assert loaded.config.pad_token_id == tok.pad_token_id
    assert loaded.generation_config.pad_token_id == tok.pad_token_id


def test_load_causal_lm_dtype(tmp_path, tok, tiny_gpt2):
    path = _save(tiny_gpt2(), tok, tmp_path / "lm")
    assert next(load_causal_lm(path, dtype="bf16").parameters()).dtype == torch.bfloat16
    with pytest.raises(ModelLoadError, match="unknown dtype"):
        load_causal_lm(path, dtype="float8")


@pytest.mark.parametrize("pad", ["missing", "eos"])
@pytest.mark.parametrize("which", ["byte", "kit"])
def test_pad_token_added_and_embeddings_resized(tmp_path, tok, byte_tok, pad, which):
    from lit_rlhf.models.tiny import build_tiny_causal_lm

    # ByT5 has no "<|pad|>" (a new id: embeddings grow); the kit's tokenizer may already hold it.
    tok = byte_tok if which == "byte" else tok
    model = build_tiny_causal_lm("gpt2", tokenizer=tok, hidden_size=32, num_layers=1, num_heads=2)
    n_vocab = model.get_input_embeddings().num_embeddings
    had_pad_token = PAD_TOKEN in tok.get_vocab()
    if pad == "eos":
        tok.pad_token = tok.eos_token
        assert tok.pad_token_id == tok.eos_token_id
    else:
        tok.pad_token = None
        assert tok.pad_token_id is None
    path = _save(model, tok, tmp_path / "lm")

    tok2 = load_tokenizer(path)
    assert tok2.pad_token == PAD_TOKEN
    assert tok2.pad_token_id not in (None, tok2.eos_token_id)
    assert len(tok2) == n_vocab + (not had_pad_token)
    if which == "byte":
        assert tok2.pad_token_id == n_vocab  # appended

    loaded = load_causal_lm(path, tokenizer=tok2)
    assert loaded.get_input_embeddings().num_embeddings == len(tok2)
    assert loaded.get_output_embeddings().weight.shape[0] == len(tok2)
    assert loaded.config.pad_token_id == tok2.pad_token_id
    assert loaded.config.eos_token_id == tok2.eos_token_id
    # The pad id is usable end to end.
    with torch.no_grad():
        loaded(torch.tensor([[tok2.pad_token_id, tok2.eos_token_id]]))


def test_dropout_override(tmp_path, tok, tiny_gpt2, tiny_llama):
    for name, factory in (("gpt2", tiny_gpt2), ("llama", tiny_llama)):
        path = _save(factory(dropout=0.3), tok, tmp_path / name)
        model = load_causal_lm(path, dropout=0.0)
        probs = {
            k: v for k, v in vars(model.config).items() if k.endswith("pdrop") or "dropout" in k
        }
        assert probs, f"{name}: no dropout fields found"
        for key, value in probs.items():
            if isinstance(value, float):
                assert value == 0.0, f"{name}: config.{key} = {value}"
        drops = [m for m in model.modules() if isinstance(m, torch.nn.Dropout)]
        assert all(m.p == 0.0 for m in drops)
        # train() must then be deterministic.
        model.train()
        ids = torch.tensor([tok("dropout off")["input_ids"]])
        torch.testing.assert_close(model(ids).logits, model(ids).logits, rtol=0, atol=0)
    # Without the override the saved dropout is kept.
    kept = load_causal_lm(str(tmp_path / "gpt2"))
    assert kept.config.resid_pdrop == pytest.approx(0.3)


def test_set_config_dropout_fields():
    cfg = GPT2Config(resid_pdrop=0.1, embd_pdrop=0.2, attn_pdrop=0.3, summary_first_dropout=0.4)
    changed = set_config_dropout(cfg, 0.0)
    assert {"resid_pdrop", "embd_pdrop", "attn_pdrop", "summary_first_dropout"} <= set(changed)
    assert cfg.resid_pdrop == cfg.embd_pdrop == cfg.attn_pdrop == cfg.summary_first_dropout == 0.0
    assert cfg.layer_norm_epsilon > 0  # a float that is not a dropout stays
    lcfg = LlamaConfig(attention_dropout=0.25)
    assert "attention_dropout" in set_config_dropout(lcfg, 0.0)
    assert lcfg.attention_dropout == 0.0
    assert lcfg.rms_norm_eps > 0


def test_wrong_path_names_the_path(tmp_path):
    missing = str(tmp_path / "no_such_model")
    for loader in (load_causal_lm, load_tokenizer, load_sequence_classifier):
        with pytest.raises(ModelLoadError) as err:
            loader(missing)
        assert missing in str(err.value)
        assert "does not exist" in str(err.value)


def test_load_sequence_classifier_needs_from_causal_lm(tmp_path, tok, tiny_gpt2):
    path = _save(tiny_gpt2(), tok, tmp_path / "lm")
    with pytest.raises(ModelLoadError) as err:
        load_sequence_classifier(path)
    msg = str(err.value)
    assert path in msg and "sequence-classification" in msg and "GPT2LMHeadModel" in msg

    rm = load_sequence_classifier(path, from_causal_lm=True, dropout=0.0, tokenizer=tok)
    assert heads.score_head(rm).out_features == 1
    rm_path = str(tmp_path / "rm")
    rm.save_pretrained(rm_path)
    again = load_sequence_classifier(rm_path)  # now a classifier folder: no flag needed
    assert type(again).__name__ == "GPT2ForSequenceClassification"


# -- reward bias folding ------------------------------------------------------------------


def test_fold_reward_bias_gpt2_plain_transformers(tmp_path, tok):
    model = _tiny_classifier("gpt2", tok)
    ids, mask = _batch(tok, TEXTS, "right")
    assert (mask == 0).any()  # really padded
    with torch.no_grad():
        before = heads.sequence_scores(model, ids, mask)
        bias = -1.37
        assert heads.fold_reward_bias(model, bias) == "final_norm"
        assert getattr(model.config, heads.BIAS_ATTR, None) is None
        path = str(tmp_path / "rm")
        model.save_pretrained(path)
        plain = AutoModelForSequenceClassification.from_pretrained(path).eval()
        logits = plain(input_ids=ids, attention_mask=mask).logits.squeeze(-1)
    torch.testing.assert_close(logits, before + bias, rtol=0, atol=1e-5)
    assert plain.config.lit_rlhf_reward_bias_folded == pytest.approx(bias)


def test_fold_reward_bias_llama_goes_to_config(tmp_path, tok):
    model = _tiny_classifier("llama", tok)
    ids, mask = _batch(tok, TEXTS, "right")
    with torch.no_grad():
        before = heads.sequence_scores(model, ids, mask)
        assert heads.fold_reward_bias(model, 0.5) == "config"
        assert heads.fold_reward_bias(model, 0.25) == "config"  # accumulates
        path = str(tmp_path / "rm")
        model.save_pretrained(path)
        reloaded = AutoModelForSequenceClassification.from_pretrained(path).eval()
        after = heads.sequence_scores(reloaded, ids, mask)
        values = heads.token_values(reloaded, ids, mask)
    assert getattr(reloaded.config, heads.BIAS_ATTR) == pytest.approx(0.75)
    torch.testing.assert_close(after, before + 0.75, rtol=0, atol=1e-5)
    last = mask.sum(-1) - 1
    torch.testing.assert_close(values[torch.arange(len(TEXTS)), last], after, rtol=0, atol=1e-5)


def test_fold_reward_bias_head_with_bias(tok):
    model = _tiny_classifier("gpt2", tok)
    old = model.score
    model.score = torch.nn.Linear(old.in_features, 1, bias=True)
    with torch.no_grad():
        model.score.weight.copy_(old.weight)
        model.score.bias.zero_()
    ids, mask = _batch(tok, TEXTS, "right")
    with torch.no_grad():
        before = heads.sequence_scores(model, ids, mask)
        assert heads.fold_reward_bias(model, 2.0) == "head"
        after = heads.sequence_scores(model, ids, mask)
    torch.testing.assert_close(after, before + 2.0, rtol=0, atol=1e-5)


def test_score_head_rejects_causal_lm(tiny_gpt2):
    with pytest.raises(ValueError, match="SequenceClassification"):
        heads.score_head(tiny_gpt2())


# -- padding / batch invariance -----------------------------------------------------------


def _naive_scores(model, tok, texts):
    """Each text alone, unpadded."""
    out = []
    for text in texts:
        ids = torch.tensor([tok(text)["input_ids"]])
        out.append(heads.sequence_scores(model, ids, torch.ones_like(ids))[0])
    return torch.stack(out)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_sequence_scores_padding_and_batch_invariant(tok, arch):
    model = _tiny_classifier(arch, tok)
    with torch.no_grad():
        alone = _naive_scores(model, tok, TEXTS)
        right = heads.sequence_scores(model, *_batch(tok, TEXTS, "right"))
        left = heads.sequence_scores(model, *_batch(tok, TEXTS, "left"))
        # A different batch composition (subset with a different longest length).
        sub = heads.sequence_scores(model, *_batch(tok, TEXTS[2:], "left"))
        vals_r = heads.token_values(model, *_batch(tok, TEXTS, "right"))
    torch.testing.assert_close(right, alone, rtol=0, atol=1e-5)
    torch.testing.assert_close(left, alone, rtol=0, atol=1e-5)
    torch.testing.assert_close(sub, alone[2:], rtol=0, atol=1e-5)
    assert right.dtype == torch.float32 and right.shape == (len(TEXTS),)
    # Values on real tokens of a right-padded batch equal the unpadded per-token values.
    for i, text in enumerate(TEXTS):
        ids = torch.tensor([tok(text)["input_ids"]])
        with torch.no_grad():
            v = heads.token_values(model, ids, torch.ones_like(ids))[0]
        torch.testing.assert_close(vals_r[i, : ids.shape[1]], v, rtol=0, atol=1e-5)
