"""Several processes equal one: SFT, RM and PPO(-ptx) under ``ddp_fork`` and FSDP2 on CPU.

The multi-process runs happen in subprocesses (``tests/dist_scripts/run_stage.py``, 2 gloo
ranks; FSDP2 relaunches that script per rank, which must never happen inside pytest). Each
run trains on the same global batches as a one-process run; the tests compare the final
weights, the per-step losses, the logged (rank-reduced) metrics and the HF export, and check
that accumulation micro-steps skip the gradient reduction and that uneven response lengths
across ranks cannot deadlock sharded generation.

Tolerances (float32; measured 2026-11 on this 2-core machine; max |difference|):

============  ===================  ===================  ====================================
stage         weights ddp_fork     weights fsdp         note
============  ===================  ===================  ====================================
sft           2.7e-6               3.3e-6               losses agree to 1e-6
rm            9.4e-5               9.3e-5               ln_f.bias: a zero-gradient direction
ppo (+ptx)    2.3e-7               2.3e-7               policy; value model 6e-8
============  ===================  ===================  ====================================

On one H100 (NCCL, 1 rank vs plain GPU, ``tests/dist_scripts/gpu_check.sh``) FSDP2 gave
2.9e-7 (PPO), 3.2e-6 (SFT) and 1.4e-4 (RM).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "dist_scripts" / "run_stage.py"
#: Max |weight difference| allowed vs the one-process run. One Adam step moves a weight by
#: up to lr = 3e-3, so a missing or wrong gradient reduction shows up far above these. The RM
#: is looser: its loss is blind to a shift of all scores, so e.g. ``ln_f.bias`` along the head
#: gets a gradient of pure rounding noise (~1e-9), which Adam (eps 1e-8) turns into real steps.
WEIGHT_ATOL = {"sft": 2e-5, "rm": 2e-4, "ppo": 2e-5}
#: The one-process run must have moved each trained model by more than this (so that a
#: comparison within the tolerances above means something).
MIN_MOVED = 2e-3
LOSS_ATOL = 1e-5
#: Env vars a distributed run leaves behind; the subprocesses must start clean.
_DIST_ENV = ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "RANK", "MASTER_ADDR", "MASTER_PORT")


def run_script(workdir: Path, *args: str, timeout: float = 240) -> tuple[int | None, str]:
    """Run the stage script; returns (exit code or None on timeout, output)."""
    env = {k: v for k, v in os.environ.items() if k not in _DIST_ENV and not k.startswith("PL_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    cmd = [sys.executable, str(SCRIPT), "--workdir", str(workdir), *args]
    # A session of its own, so a hung run's relaunched rank can be killed with it.
    proc = subprocess.Popen(
        cmd,
        cwd=workdir.parent,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
        return proc.returncode, out
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        return None, out


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """``results(stage, strategy, *flags)`` -> the run's result dict (each run made once)."""
    base = tmp_path_factory.mktemp("dist")
    cache: dict[tuple, dict] = {}

    def get(stage: str, strategy: str, *flags: str) -> dict:
        key = (stage, strategy, *flags)
        if key not in cache:
            workdir = base / "_".join(k.strip("-") for k in key)
            workdir.mkdir()
            rc, out = run_script(workdir, "--stage", stage, "--strategy", strategy, *flags)
            assert rc == 0, f"{key} failed (rc={rc}):\n{out[-4000:]}"
            result = torch.load(workdir / "result.pt", weights_only=False)
            result["export_dir"] = workdir / "export"
            cache[key] = result
        return cache[key]

    return get


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def _step_losses(result: dict) -> list[float]:
    """Loss per optimizer step over the global batch (micro-batch losses come pre-divided)."""
    losses = torch.tensor(result["losses"])  # (ranks, micro-batches)
    per_step = len(result["losses"][0]) // result["global_step"]
    return losses.reshape(losses.shape[0], -1, per_step).sum(-1).mean(0).tolist()


STAGES = ["sft", "rm", "ppo"]
STRATEGIES = ["ddp_fork", "fsdp"]


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("stage", STAGES)
def test_two_processes_train_like_one(results, stage, strategy):
    one, two = results(stage, "single"), results(stage, strategy)
    assert (one["world_size"], two["world_size"]) == (1, 2)
    assert one["global_step"] == two["global_step"] > 0
    tol = WEIGHT_ATOL[stage]
    for name, weights in one["weights"].items():
        moved = _max_diff(weights, one["initial"][name])
        trained = name in ("model", "policy", "value_model")
        assert moved > MIN_MOVED if trained else moved == 0, (name, moved)
        assert _max_diff(weights, two["weights"][name]) <= tol, name
    if stage != "ppo":
        assert _step_losses(two) == pytest.approx(_step_losses(one), abs=LOSS_ATOL)
    else:
        for key in ("objective/scores", "objective/kl", "ptx/loss", "value/loss", "policy/loss"):
            assert two["metrics"][key] == pytest.approx(one["metrics"][key], abs=1e-4), key


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("stage", STAGES)
def test_export_holds_the_full_trained_weights(results, stage, strategy):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    result = results(stage, strategy)
    auto = AutoModelForSequenceClassification if stage == "rm" else AutoModelForCausalLM
    exported = auto.from_pretrained(result["export_dir"]).state_dict()
    trained = result["weights"]["policy" if stage == "ppo" else "model"]
    common = exported.keys() & trained.keys()
    assert len(common) == len(trained)  # a sharded (partial) save would lose or shrink tensors
    assert _max_diff({k: exported[k] for k in common}, {k: trained[k] for k in common}) == 0


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("stage", STAGES)
def test_accumulation_micro_steps_skip_the_gradient_reduction(results, stage, strategy):
    # Two micro-batches per optimizer step on every stage: Lightning's accumulation (SFT, RM),
    # PPO's own micro-batches. The counter sees DDP all-reduces / FSDP2 reduce-scatters.
    reduced = results(stage, strategy)["reduced_per_backward"]
    assert len(reduced) == 2 * results(stage, strategy)["global_step"]
    assert reduced[0::2] == [0] * (len(reduced) // 2)
    assert all(n > 0 for n in reduced[1::2])
    assert set(results(stage, "single")["reduced_per_backward"]) == {0}


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_ppo_ranks_get_different_prompts_and_log_reduced_metrics(results, strategy):
    one, two = results("ppo", "single"), results("ppo", strategy)
    for rollout, everyone in enumerate(one["prompts"][0]):
        rank0, rank1 = (set(map(tuple, two["prompts"][r][rollout])) for r in (0, 1))
        assert not rank0 & rank1
        assert rank0 | rank1 == set(map(tuple, everyone))
    # The logged value is the mean of the ranks' own (different) values (sync_dist).
    local = torch.tensor(two["local_scores"])[:, -1]
    assert local[0] != local[1]
    assert two["metrics"]["objective/scores"] == pytest.approx(float(local.mean()), abs=1e-6)
    assert all(two["synced_gpus"]) and not any(one["synced_gpus"])


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_ppo_uneven_response_lengths_across_ranks_finish(tmp_path, strategy):
    # Rank 0 stops after 2 tokens, rank 1 generates 8: with synced_gpus on (automatic for
    # world_size > 1) the ranks keep stepping together; a deadlock would hit the timeout.
    rc, out = run_script(
        tmp_path, "--stage", "ppo", "--strategy", strategy, "--uneven", timeout=180
    )
    assert rc == 0, out[-4000:]
    result = torch.load(tmp_path / "result.pt", weights_only=False)
    lengths = torch.tensor(result["response_lengths"])  # (ranks, rollouts): longest response
    assert lengths[0].max() <= 2 < lengths[1].min()
    assert all(result["synced_gpus"]) and result["global_step"] == 4


@pytest.mark.slow
def test_fsdp_generation_without_synced_gpus_breaks(tmp_path):
    # The control of the test above: the same uneven run with synced_gpus forced off makes the
    # ranks' weight all-gathers disagree; the run errors out or hangs (killed at the timeout).
    rc, out = run_script(
        tmp_path, "--stage", "ppo", "--strategy", "fsdp", "--uneven", "--unsynced", timeout=90
    )
    assert rc != 0, out[-2000:]
    assert not (tmp_path / "result.pt").exists()


# ------------------------------------------------------------------ in-process, one rank


@pytest.fixture
def mesh(monkeypatch):
    """A one-rank gloo process group and device mesh (the conftest fixture tears it down)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    for key, value in (("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "0"), ("RANK", "0")):
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("WORLD_SIZE", "1")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    return init_device_mesh("cpu", (1, 1), mesh_dim_names=("data_parallel", "tensor_parallel"))


def _classifier(tok, seed=1):
    from transformers import AutoModelForSequenceClassification

    from lit_rlhf.models.tiny import tiny_config

    cfg = tiny_config("gpt2", 0, tokenizer=tok, hidden_size=32, num_layers=2, num_heads=2)
    cfg.num_labels = 1
    torch.manual_seed(seed)
    return AutoModelForSequenceClassification.from_config(cfg)


def test_sharded_models_score_like_plain_ones_and_export_full_copies(mesh, tok, tiny_gpt2):
    import copy

    from torch.distributed.fsdp import FSDPModule

    from lit_rlhf.models.heads import sequence_scores
    from lit_rlhf.modules.sharding import (
        full_state_dict,
        is_sharded,
        no_gradient_sync,
        shard_models,
        unsharded_copy,
    )

    lm, rm = tiny_gpt2(), _classifier(tok)
    plain_lm, plain_rm = copy.deepcopy(lm), copy.deepcopy(rm)
    assert full_state_dict(plain_lm) is None and unsharded_copy(plain_lm) is plain_lm
    assert shard_models([lm, rm], mesh, None, frozen=[rm]) == 4  # _no_split_modules: GPT2Block
    assert is_sharded(lm) and is_sharded(rm) and not isinstance(rm, FSDPModule)
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])
    mask = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])
    # The RM is read through its backbone and head separately: both must gather their weights.
    assert torch.allclose(sequence_scores(rm, ids, mask), sequence_scores(plain_rm, ids, mask))
    assert torch.allclose(lm(input_ids=ids).logits, plain_lm(input_ids=ids).logits, atol=1e-6)
    for sharded, plain in ((lm, plain_lm), (rm, plain_rm)):
        copied = unsharded_copy(sharded)
        assert type(copied) is type(plain) and not is_sharded(copied)
        assert _max_diff(copied.state_dict(), plain.state_dict()) == 0
    units = [m for m in lm.modules() if isinstance(m, FSDPModule)]
    with no_gradient_sync([lm]):
        assert not any(u._get_fsdp_state()._fsdp_param_group.reduce_grads for u in units)
    assert all(u._get_fsdp_state()._fsdp_param_group.reduce_grads for u in units)


def test_unknown_block_classes_are_a_clear_error(mesh, tiny_gpt2):
    from lit_rlhf.modules.sharding import shard_models

    with pytest.raises(ValueError, match="block_classes"):
        shard_models([tiny_gpt2()], mesh, ["Qwen2DecoderLayer"])


def test_fsdp2_strategy_shards_over_every_rank():
    from lit_rlhf.modules.sharding import FSDP2Strategy

    strategy = FSDP2Strategy(block_classes=["GPT2Block"])
    assert strategy.block_classes == ["GPT2Block"]
    assert strategy._tensor_parallel_size == 1 and strategy._data_parallel_size == "auto"
    with pytest.raises(ValueError, match="shards only"):
        FSDP2Strategy(tensor_parallel_size=2)


def _ppo_module(tok, tiny_gpt2, **kw):
    from lit_rlhf.modules.ppo import PPOModule

    return PPOModule(
        tiny_gpt2(), _classifier(tok), tiny_gpt2(), _classifier(tok, 2), tok.eos_token_id,
        tok.pad_token_id, **kw,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("world_size", "synced_gpus", "expected"),
    [(1, None, False), (1, True, False), (2, None, True), (2, True, True), (2, False, False)],
)
def test_synced_generation_is_on_with_several_ranks(
    tok, tiny_gpt2, world_size, synced_gpus, expected
):
    from lightning.pytorch.strategies import DDPStrategy

    module = _ppo_module(tok, tiny_gpt2, synced_gpus=synced_gpus)
    module._trainer = SimpleNamespace(world_size=world_size, strategy=DDPStrategy())
    # Unsharded DDP may opt out (its generate has no collectives); sharded models never can.
    assert module.synced_generation is expected


def test_multirun_with_a_relaunching_strategy_is_refused(tmp_path, monkeypatch):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import open_dict, read_write

    from lit_rlhf.run import _check_multirun_strategy

    monkeypatch.setenv("LIT_RLHF_HOME", str(tmp_path))
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
            for strategy, refused in (("fsdp", True), ("deepspeed", True), ("ddp_fork", False)):
                cfg = compose("train", overrides=[f"strategy={strategy}"], return_hydra_config=True)
                with read_write(cfg.hydra), open_dict(cfg.hydra):
                    cfg.hydra.mode = RunMode.MULTIRUN
                HydraConfig().set_config(cfg)
                if refused:
                    with pytest.raises(SystemExit, match="relaunches"):
                        _check_multirun_strategy(cfg)
                else:
                    _check_multirun_strategy(cfg)
    finally:
        GlobalHydra.instance().clear()
        HydraConfig.instance().cfg = None
