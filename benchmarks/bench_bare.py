"""Bare-PyTorch floor of the sft, rm and ppo benches (one process, one bench, one size).

The same models, data, batch shapes, optimizer and precision as the framework benches, done
by a plain loop with nothing else in it: batches are tokenized before the clock starts, no
logging, no metrics, no callbacks, no data loader. Its time is what the HF model code itself
costs on this machine, which both frameworks run; so ``TRL time / bare time`` is the largest
speed-up any kit could show over TRL without doing less arithmetic (the report's "ceiling"),
and ``our time / bare time`` is lit_rlhf's own overhead.

    python benchmarks/bench_bare.py --bench sft --size 1m --artifacts benchmarks/.cache/artifacts \
        --out r.json
"""

from __future__ import annotations

import json
import random
import sys
import time
from contextlib import nullcontext
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

BARE_BENCHES = ("sft", "rm", "ppo")


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def _optimizer(params, lr: float, steps: int):
    """HF Trainer's defaults, which the kit's benches also use: AdamW, linear decay to 0."""
    import torch

    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), weight_decay=0.0, fused=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, 1.0 - s / steps))
    return opt, sched


def _update(loss, params, opt, sched, clip: float | None) -> None:
    """Backward, optional gradient-norm clip, optimizer and scheduler step, zero grads."""
    import torch

    loss.backward()
    if clip is not None:
        torch.nn.utils.clip_grad_norm_(params, clip)
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)


def _sequences(tok, recs, keys: tuple[str, ...]) -> list[list[int]]:
    """prompt + response + EOS per record and response key (every one is seq_len tokens)."""
    return [
        _ids(tok, r["prompt"]) + _ids(tok, r[k]) + [tok.eos_token_id] for r in recs for k in keys
    ]


def lm_steps(args, tok, autocast, n: int) -> tuple[list[float], dict]:
    """SFT: token-mean cross-entropy on completion tokens, clip 1.0, AdamW."""
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    s = common.SFT
    recs = _records(Path(args.artifacts) / "demos.jsonl")
    random.Random(0).shuffle(recs)
    model = AutoModelForCausalLM.from_pretrained(Path(args.artifacts) / args.size / "policy")
    model.train()
    batches = []
    for i in range(n):
        chunk = recs[i * s["batch_size"] : (i + 1) * s["batch_size"]]
        ids = torch.tensor(_sequences(tok, chunk, ("completion",)))
        prompt = torch.tensor([len(_ids(tok, r["prompt"])) for r in chunk])
        # Target t + 1 counts when token t + 1 belongs to the completion.
        target_mask = torch.arange(ids.shape[1] - 1)[None] + 1 >= prompt[:, None]
        batches.append((ids, target_mask))
    opt, sched = _optimizer(model.parameters(), s["lr"], n)
    times = []
    for ids, target_mask in batches:
        t = time.perf_counter()
        with autocast():
            logits = model(input_ids=ids).logits[:, :-1].float()
        nll = F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="none")
        loss = (nll * target_mask.flatten()).sum() / target_mask.sum()
        _update(loss, model.parameters(), opt, sched, clip=1.0)
        times.append(time.perf_counter() - t)
    tokens = [ids.numel() for ids, _ in batches]
    return times, {"tokens": tokens, "seq_len": int(batches[0][0].shape[1])}


def rm_steps(args, tok, autocast, n: int) -> tuple[list[float], dict]:
    """RM: chosen and rejected in one forward, -log sigmoid(r_c - r_r), clip 1.0, AdamW."""
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForSequenceClassification

    s = common.RM
    recs = _records(Path(args.artifacts) / "pairs.jsonl")
    random.Random(0).shuffle(recs)
    model = AutoModelForSequenceClassification.from_pretrained(
        Path(args.artifacts) / args.size / "rm"
    )
    model.train()
    k = s["pairs_per_batch"]
    batches = [
        torch.tensor(_sequences(tok, recs[i * k : (i + 1) * k], ("chosen", "rejected")))
        for i in range(n)
    ]
    opt, sched = _optimizer(model.parameters(), s["lr"], n)
    times = []
    for ids in batches:
        t = time.perf_counter()
        # Every sequence is full length: the score is read at the last position.
        with autocast():
            hidden = model.transformer(input_ids=ids).last_hidden_state[:, -1]
            r = model.score(hidden).float().squeeze(-1)
        loss = -F.logsigmoid(r[0::2] - r[1::2]).mean()  # _sequences interleaves c, r
        _update(loss, model.parameters(), opt, sched, clip=1.0)
        times.append(time.perf_counter() - t)
    return times, {"pairs": [x.shape[0] // 2 for x in batches], "seq_len": batches[0].shape[1]}


def _response_logprobs(model, ids, r: int):
    """(B, R) log-probs of the last R tokens (LM head only on the positions that need it)."""
    import torch

    logits = model(input_ids=ids, logits_to_keep=r + 1).logits[:, :-1].float()
    return torch.gather(logits.log_softmax(-1), 2, ids[:, -r:, None]).squeeze(-1)


def _values(model, ids, q: int):
    """(B, R) value head at the positions before each response token."""
    hidden = model.transformer(input_ids=ids).last_hidden_state[:, q - 1 : -1]
    return model.score(hidden).float().squeeze(-1)


def ppo_iterations(args, tok, autocast, n: int) -> tuple[list[float], dict]:
    """PPO: sample, score (reference, value, reward), GAE, then epochs of clipped losses."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    s = common.PPO
    art = Path(args.artifacts) / args.size
    policy, ref = (AutoModelForCausalLM.from_pretrained(art / "policy") for _ in range(2))
    value, reward = (AutoModelForSequenceClassification.from_pretrained(art / "rm") for _ in "vr")
    ref.eval()
    reward.eval()
    b, q, r = s["batch_size"], s["prompt_len"], s["response_len"]
    prompts = [
        _ids(tok, rec["prompt"])[:q] for rec in _records(Path(args.artifacts) / "prompts.jsonl")
    ]
    queries = [torch.tensor(prompts[i * b : (i + 1) * b]) for i in range(n)]
    params = [*policy.parameters(), *value.parameters()]
    opt, sched = _optimizer(params, s["lr"], n * s["ppo_epochs"])
    split = {"generation": [], "scoring": [], "optimization": []}
    for query in queries:
        t0 = time.perf_counter()
        with torch.no_grad(), autocast():
            out = policy.generate(
                input_ids=query,
                attention_mask=torch.ones_like(query),
                do_sample=True,
                top_k=0,
                top_p=1.0,
                temperature=s["temperature"],
                max_new_tokens=r,
                return_dict_in_generate=True,
                output_logits=True,
            )
            ids = out.sequences
            logits = torch.stack(out.logits, 1).float()
            old_logp = torch.gather(logits.log_softmax(-1), 2, ids[:, q:, None]).squeeze(-1)
        t1 = time.perf_counter()
        with torch.no_grad(), autocast():
            ref_logp = _response_logprobs(ref, ids, r)
            old_values = _values(value, ids, q)
            scores = reward.score(reward.transformer(input_ids=ids).last_hidden_state[:, -1])
            rewards = -s["kl_coef"] * (old_logp - ref_logp)
            rewards[:, -1] += scores.float().squeeze(-1)
            adv, last = torch.zeros_like(rewards), torch.zeros(b)
            for t in reversed(range(r)):  # GAE, gamma = lambda = 1
                nxt = old_values[:, t + 1] if t + 1 < r else torch.zeros(b)
                last = rewards[:, t] + nxt - old_values[:, t] + last
                adv[:, t] = last
            returns = adv + old_values
            adv = (adv - adv.mean()) / (adv.std() + 1e-8)
        t2 = time.perf_counter()
        for _ in range(s["ppo_epochs"]):  # one minibatch = the whole batch
            with autocast():
                logp = _response_logprobs(policy, ids, r)
                v = _values(value, ids, q)
            ratio = torch.exp(logp - old_logp)
            pg = torch.max(-adv * ratio, -adv * ratio.clamp(0.8, 1.2)).mean()
            v_clip = old_values + (v - old_values).clamp(-0.2, 0.2)
            vf = 0.5 * torch.max((v - returns) ** 2, (v_clip - returns) ** 2).mean()
            _update(pg + 0.1 * vf, params, opt, sched, clip=None)  # TRL's PPO: no clipping
        t3 = time.perf_counter()
        for k, (a, z) in zip(split, ((t0, t1), (t1, t2), (t2, t3))):
            split[k].append(z - a)
    totals = [sum(x) for x in zip(*split.values())]
    return totals, {"split": split, "response_shape": list(ids[:, q:].shape)}


def main() -> None:
    args = common.child_args(__doc__)
    if args.bench not in BARE_BENCHES:
        raise SystemExit(f"--bench: bench_bare.py runs {BARE_BENCHES}, not {args.bench!r}")
    common.setup_threads()
    rss_start = common.rss_now_mib()
    import torch
    import transformers
    from transformers import AutoTokenizer

    transformers.utils.logging.set_verbosity_error()
    rss_import = common.rss_now_mib()
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(Path(args.artifacts) / "tokenizer")
    bf16 = args.precision == "bf16"

    def autocast():
        return torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else nullcontext()

    n = args.warmup + args.iters
    run = {"sft": lm_steps, "rm": rm_steps, "ppo": ppo_iterations}[args.bench]
    times, info = run(args, tok, autocast, n)
    times = common.steady(times, args.warmup)
    result = {
        "framework": "bare",
        "bench": args.bench,
        "size": args.size,
        "precision": args.precision,
        "rss_start_mib": rss_start,
        "rss_after_import_mib": rss_import,
        "rss_after_setup_mib": rss_import,
        "checks": {"threads_in_run": torch.get_num_threads()},
    }
    if args.bench == "ppo":
        result["iter_s"] = times
        result["split_s"] = {k: common.steady(v, args.warmup) for k, v in info["split"].items()}
        result["split_s"]["other"] = [0.0] * len(times)
        result["checks"]["response_shape"] = info["response_shape"]
    else:
        seq = info["seq_len"]
        result["step_s"] = times
        if args.bench == "sft":
            tokens = common.steady(info["tokens"], args.warmup)
            result["tokens_per_s"] = sum(tokens) / sum(times)
            per_step = common.real_step_flops(args.size, [seq] * (tokens[0] // seq), lm_head=True)
        else:
            pairs = common.steady(info["pairs"], args.warmup)
            result["pairs_per_s"] = sum(pairs) / sum(times)
            result["seqs_per_s"] = 2 * result["pairs_per_s"]
            per_step = common.real_step_flops(args.size, [seq] * (2 * pairs[0]), lm_head=False)
        result["flops_per_s"] = per_step * len(times) / sum(times)
        result["checks"]["seq_len"] = seq
    common.write_result(args.out, result)


if __name__ == "__main__":
    main()
