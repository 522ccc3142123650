"""RewardModule: K-wise loss path vs a naive pair loop, score placement, export round trip."""

from __future__ import annotations

import json
import random

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForSequenceClassification

from lit_rlhf.data.comparisons import ComparisonCollator, ComparisonsDataModule, encode_comparisons
from lit_rlhf.models.heads import BIAS_ATTR, backbone_hidden, fold_reward_bias, sequence_scores
from lit_rlhf.models.loading import load_sequence_classifier
from lit_rlhf.models.tiny import tiny_config
from lit_rlhf.modules.reward import RewardModule, demonstration_bias, score_pairs

SMALL = dict(hidden_size=32, num_layers=2, num_heads=2)

RECORDS = [
    # ties (1 == 1), K = 5
    {
        "prompt": "Review B:",
        "completions": ["x", "yy", "zzz z", "w", "vv v"],
        "ranks": [1, 1, 0, 3, 2],
    },
    {"prompt": "Review A:", "completions": ["good film", "bad", "meh ok"], "ranks": [0, 2, 1]},
    # K = 2: the pairwise (chosen, rejected) case
    {"prompt": "Review C:", "completions": ["fine", "awful thing"], "ranks": [0, 1]},
    {"prompt": "", "completions": ["a", "b", "c", "d"], "ranks": [2, 2, 0, 0]},
]
DEMOS = [("Review D:", "a good one"), ("Review E:", "fine film"), ("", "ok"), ("Q:", "nice")]


def classifier(tok, arch="gpt2", seed=0):
    cfg = tiny_config(arch, 0, tokenizer=tok, **SMALL)
    cfg.num_labels = 1
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForSequenceClassification.from_config(cfg)
        # Non-trivial norms/head so placement and folding bugs show up in the numbers.
        for p in model.parameters():
            p.data.add_(0.05 * torch.randn_like(p))
    return model


def encode_one(tok, prompt, completion):
    ids = (
        tok(prompt, add_special_tokens=False)["input_ids"]
        + tok(completion, add_special_tokens=False)["input_ids"]
        + [tok.eos_token_id]
    )
    return torch.tensor([ids])


def score_alone(model, tok, prompt, completion):
    ids = encode_one(tok, prompt, completion)
    with torch.no_grad():
        return float(sequence_scores(model, ids, torch.ones_like(ids)))


def naive_loss(model, tok, records, margin=0.0):
    per_prompt = []
    for rec in records:
        r = [score_alone(model, tok, rec["prompt"], c) for c in rec["completions"]]
        terms = [
            -F.logsigmoid(torch.tensor(r[w] - r[lo] - margin, dtype=torch.float64))
            for w in range(len(r))
            for lo in range(len(r))
            if rec["ranks"][w] < rec["ranks"][lo]
        ]
        if terms:
            per_prompt.append(sum(terms) / len(terms))
    return float(sum(per_prompt) / len(per_prompt))


def silent(module):
    module.log = lambda *args, **kwargs: None
    return module


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("margin", [0.0, 0.3])
def test_training_step_loss_equals_naive_pair_loop(tok, arch, margin):
    model = classifier(tok, arch).eval()
    module = silent(RewardModule(model, margin=margin))
    examples, _, _ = encode_comparisons(tok, RECORDS, max_length=64)
    batch = ComparisonCollator(tok.pad_token_id)(examples)
    assert batch["input_ids"].shape[0] == 5 + 3 + 2 + 4  # one row per response, one forward
    with torch.no_grad():
        loss = module.training_step(batch, 0)
    assert loss.item() == pytest.approx(naive_loss(model, tok, RECORDS, margin), abs=1e-5)


def test_k2_is_the_pairwise_loss(tok):
    model = classifier(tok).eval()
    recs = [
        {"prompt": f"P{i}:", "completions": [f"c{i}", f"rr{i}"], "ranks": [0, 1]} for i in range(3)
    ]
    batch = ComparisonCollator(tok.pad_token_id)(encode_comparisons(tok, recs, 64)[0])
    with torch.no_grad():
        loss = silent(RewardModule(model)).training_step(batch, 0)
    pairwise = [
        -F.logsigmoid(
            torch.tensor(
                score_alone(model, tok, r["prompt"], r["completions"][0])
                - score_alone(model, tok, r["prompt"], r["completions"][1])
            )
        )
        for r in recs
    ]
    assert loss.item() == pytest.approx(float(sum(pairwise) / 3), abs=1e-5)


def test_loss_gradient_reaches_backbone_and_head(tok):
    module = silent(RewardModule(classifier(tok)))
    batch = ComparisonCollator(tok.pad_token_id)(encode_comparisons(tok, RECORDS, 64)[0])
    module.training_step(batch, 0).backward()
    grads = {n: p.grad for n, p in module.model.named_parameters()}
    assert grads["score.weight"].abs().sum() > 0
    assert grads["transformer.h.0.attn.c_attn.weight"].abs().sum() > 0


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_score_invariant_to_padding_side_and_batch_composition(tok, arch):
    model = classifier(tok, arch).eval()
    prompts = ["Review A:", "A much longer prompt here, yes:", "", "Q:"]
    comps = ["good", "bad film, really bad", "ok", "x"]
    alone = torch.tensor([score_alone(model, tok, p, c) for p, c in zip(prompts, comps)])
    batched = score_pairs(model, tok, prompts, comps, batch_size=4)
    one_by_one = score_pairs(model, tok, prompts, comps, batch_size=1)
    torch.testing.assert_close(batched, alone, rtol=0, atol=1e-5)
    torch.testing.assert_close(one_by_one, alone, rtol=0, atol=1e-5)
    # Left padding of the same sequences.
    seqs = [encode_one(tok, p, c)[0] for p, c in zip(prompts, comps)]
    longest = max(len(s) for s in seqs)
    ids = torch.full((4, longest), tok.pad_token_id)
    mask = torch.zeros((4, longest), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, longest - len(s) :] = s
        mask[i, longest - len(s) :] = 1
    with torch.no_grad():
        left = sequence_scores(model, ids, mask)
    torch.testing.assert_close(left, alone, rtol=0, atol=1e-5)


def test_score_is_read_at_eos_by_mask_not_pad_id(tok):
    model = classifier(tok).eval()
    ids = encode_one(tok, "Review A:", "good film")
    assert ids[0, -1] == tok.eos_token_id
    with torch.no_grad():
        hidden = backbone_hidden(model, ids, torch.ones_like(ids))[0]
        at_eos = float(model.score(hidden[-1]))
        before_eos = float(model.score(hidden[-2]))
    assert abs(at_eos - before_eos) > 1e-4
    # Right padded in a batch with a longer row; pad with EOS's id to show no pad-id search.
    other = encode_one(tok, "Another, longer prompt:", "with a long reply")
    for pad in (tok.pad_token_id, tok.eos_token_id):
        batch = ComparisonCollator(pad)(
            [{"input_ids": [ids[0].tolist(), other[0].tolist()], "ranks": [0, 1]}]
        )
        with torch.no_grad():
            scores = sequence_scores(model, batch["input_ids"], batch["attention_mask"])
        assert float(scores[0]) == pytest.approx(at_eos, abs=1e-5)


def test_demonstration_bias_centres_demos(tok):
    model = classifier(tok).eval()
    prompts, comps = [d[0] for d in DEMOS], [d[1] for d in DEMOS]
    before = score_pairs(model, tok, prompts, comps)
    bias = demonstration_bias(model, tok, prompts, comps, batch_size=3)
    assert bias == pytest.approx(-float(before.mean()), abs=1e-6)
    assert fold_reward_bias(model, bias) == "final_norm"
    after = score_pairs(model, tok, prompts, comps)
    assert float(after.mean()) == pytest.approx(0.0, abs=1e-5)
    torch.testing.assert_close(after - before, torch.full_like(before, bias), rtol=0, atol=1e-5)


def test_export_roundtrip_gpt2_plain_transformers(tmp_path, tok):
    module = RewardModule(classifier(tok))
    model = module.export_model().eval()
    prompts, comps = [d[0] for d in DEMOS], [d[1] for d in DEMOS]
    bias = demonstration_bias(model, tok, prompts, comps)
    assert abs(bias) > 1e-3
    fold_reward_bias(model, bias)
    examples, _, _ = encode_comparisons(tok, RECORDS, 64)
    batch = ComparisonCollator(tok.pad_token_id)(examples)  # right padded
    with torch.no_grad():
        ours = module(batch["input_ids"], batch["attention_mask"])
    model.save_pretrained(tmp_path / "rm")
    plain = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm").eval()
    assert getattr(plain.config, BIAS_ATTR, 0.0) in (0.0, None)  # folded into the weights
    with torch.no_grad():
        logits = plain(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(logits[:, 0], ours, rtol=0, atol=1e-5)
    demo_scores = plain_demo_scores(plain, tok, prompts, comps)
    assert float(demo_scores.mean()) == pytest.approx(0.0, abs=1e-5)


def plain_demo_scores(model, tok, prompts, comps):
    with torch.no_grad():
        return torch.cat(
            [model(input_ids=encode_one(tok, p, c)).logits[:, 0] for p, c in zip(prompts, comps)]
        )


def test_export_roundtrip_llama_bias_in_config(tmp_path, tok):
    module = RewardModule(classifier(tok, "llama"))
    model = module.export_model().eval()
    prompts, comps = [d[0] for d in DEMOS], [d[1] for d in DEMOS]
    bias = demonstration_bias(model, tok, prompts, comps)
    assert fold_reward_bias(model, bias) == "config"
    batch = ComparisonCollator(tok.pad_token_id)(encode_comparisons(tok, RECORDS, 64)[0])
    with torch.no_grad():
        ours = module(batch["input_ids"], batch["attention_mask"])
    model.save_pretrained(tmp_path / "rm")
    tok.save_pretrained(tmp_path / "rm")
    loaded = load_sequence_classifier(str(tmp_path / "rm"), "float32", 0.0, tok).eval()
    assert getattr(loaded.config, BIAS_ATTR) == pytest.approx(bias)
    with torch.no_grad():
        again = sequence_scores(loaded, batch["input_ids"], batch["attention_mask"])
        plain = loaded(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    torch.testing.assert_close(again, ours, rtol=0, atol=1e-5)
    # Plain transformers gives the unshifted score: the user adds the config's bias.
    torch.testing.assert_close(plain.logits[:, 0] + bias, ours, rtol=0, atol=1e-5)
    assert float(score_pairs(loaded, tok, prompts, comps).mean()) == pytest.approx(0.0, abs=1e-5)


# -- training ------------------------------------------------------------------------------

WORDS = ["film", "plot", "story", "cast", "scene", "music", "end", "acting"]


def synthetic_records(n, seed):
    """Responses with more 'good' are better; K varies between 2 and 4; some ties."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        k = rng.randint(2, 4)
        goods = rng.sample(range(4), k)
        comps = [" ".join(["good"] * g + [rng.choice(WORDS)]) for g in goods]
        out.append(
            {"prompt": f"Review {i}:", "completions": comps, "ranks": [3 - g for g in goods]}
        )
    return out


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def test_training_loss_falls_and_val_acc_rises(tmp_path, tok):
    train = write_jsonl(tmp_path / "train.jsonl", synthetic_records(64, 0))
    val_recs = synthetic_records(16, 1)
    for r in val_recs:
        r["gold"] = [-float(x) for x in r["ranks"]]
    val = write_jsonl(tmp_path / "val.jsonl", val_recs)
    dm = ComparisonsDataModule(train, val, max_length=48, batch_size=8).connect(tok)
    L.seed_everything(0, verbose=False)
    module = RewardModule(classifier(tok), lr=3e-3, schedule="cosine", min_lr_ratio=0.1)
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=4,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    before = trainer.validate(module, datamodule=dm, verbose=False)[0]
    trainer.fit(module, datamodule=dm)
    after = trainer.validate(module, datamodule=dm, verbose=False)[0]
    assert after["val/loss"] < before["val/loss"] - 0.1
    assert after["val/acc"] > before["val/acc"] + 0.2 and after["val/acc"] > 0.8
    # Gold ordering == label ordering here, so both accuracies agree.
    assert after["val/acc_gold"] == pytest.approx(after["val/acc"], abs=1e-6)
    # val/acc is exactly correct / untied pairs, independent of the eval batching.
    scores = score_pairs(
        module.model,
        tok,
        [r["prompt"] for r in val_recs for _ in r["completions"]],
        [c for r in val_recs for c in r["completions"]],
        max_length=48,
    ).tolist()
    ok = n = pos = 0
    per_prompt = []
    for r in val_recs:
        k = len(r["ranks"])
        s, pos = scores[pos : pos + k], pos + k
        terms = []
        for i in range(k):
            for j in range(k):
                if r["ranks"][i] < r["ranks"][j]:
                    n, ok = n + 1, ok + (s[i] > s[j])
                    terms.append(-F.logsigmoid(torch.tensor(s[i] - s[j])).item())
        if terms:
            per_prompt.append(sum(terms) / len(terms))
    assert after["val/acc"] == pytest.approx(ok / n, abs=1e-6)
    # val/loss is the mean over validation prompts of each prompt's mean pair loss.
    assert after["val/loss"] == pytest.approx(sum(per_prompt) / len(per_prompt), abs=1e-5)
    path = tmp_path / "rm.ckpt"
    trainer.save_checkpoint(path)
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["hyper_parameters"]["lr"] == 3e-3
