"""Shared fixtures: a download-free tokenizer, tiny GPT-2/Llama factories, a clean environment."""

from __future__ import annotations

import copy
import functools
import os
from pathlib import Path

import pytest
import torch
import transformers

transformers.utils.logging.disable_progress_bar()
# Load reports ("score.weight MISSING") and resize notices are expected in these tests.
transformers.utils.logging.set_verbosity_error()
# One intra-op thread: tiny models gain nothing from more, and on a busy 2-core machine two
# spinning threads made a 24-step SFT fit cost 12.6 s of CPU instead of 1.8 s.
torch.set_num_threads(1)


@functools.lru_cache(maxsize=1)
def _base_tokenizer():
    """A small tokenizer with pad != eos that needs no files or network (built once)."""
    try:
        from lit_rlhf.models.tokenizer import tiny_test_tokenizer
    except ImportError:
        tiny_test_tokenizer = None
    if tiny_test_tokenizer is not None:
        try:
            return tiny_test_tokenizer()
        except Exception:  # an in-progress helper module must not break every test
            pass
    return transformers.ByT5Tokenizer()


@pytest.fixture
def tok():
    """A fresh copy per test (tests may add tokens or change the padding side)."""
    tokenizer = copy.deepcopy(_base_tokenizer())
    assert tokenizer.pad_token_id is not None
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    return tokenizer


@pytest.fixture
def byte_tok():
    """A byte-level tokenizer (one token per UTF-8 byte) for tests that count tokens exactly."""
    return transformers.ByT5Tokenizer()


def _tiny_factory(arch: str, tokenizer):
    from lit_rlhf.models.tiny import build_tiny_causal_lm

    def make(**overrides):
        kwargs = dict(hidden_size=32, num_layers=2, num_heads=2, seed=0)
        kwargs.update(overrides)
        return build_tiny_causal_lm(arch, tokenizer=tokenizer, **kwargs)

    return make


@pytest.fixture
def tiny_gpt2(tok):
    """Factory: ``tiny_gpt2(**config_overrides)`` -> a seeded tiny GPT-2 causal LM."""
    return _tiny_factory("gpt2", tok)


@pytest.fixture
def tiny_llama(tok):
    """Factory: ``tiny_llama(**config_overrides)`` -> a seeded tiny Llama causal LM."""
    return _tiny_factory("llama", tok)


@pytest.fixture(params=["gpt2", "llama"])
def tiny_lm(request, tok):
    """Factory for both architectures (parametrized test runs once per arch)."""
    return _tiny_factory(request.param, tok)


@pytest.fixture(autouse=True)
def _clean_process_state():
    """Restore os.environ and tear down any process group a test (or DDP) left behind."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


@pytest.fixture
def compose_cfg(tmp_path, monkeypatch):
    """``compose_cfg(*overrides)`` -> the composed train config with HydraConfig set."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    from lit_rlhf import run

    monkeypatch.setenv("LIT_RLHF_HOME", str(tmp_path))
    run.register_resolvers()
    GlobalHydra.instance().clear()
    ctx = initialize_config_dir(
        config_dir=str(Path(__file__).resolve().parents[1] / "conf"), version_base="1.3"
    )
    ctx.__enter__()

    def make(*overrides: str):
        # hydra.runtime.output_dir is only filled in by a real run: point output_dir at tmp.
        cfg = compose(
            "train",
            overrides=[*overrides, f"paths.output_dir={tmp_path / 'run'}"],
            return_hydra_config=True,
        )
        HydraConfig().set_config(cfg)
        return cfg

    yield make
    ctx.__exit__(None, None, None)
    GlobalHydra.instance().clear()
    # A leftover HydraConfig would make later tests' run() think it is inside a Hydra job.
    HydraConfig.instance().cfg = None
