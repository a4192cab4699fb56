"""A Ray Data run on a local 2-CPU cluster equals a single-process run of the same corpus."""

from __future__ import annotations

import json

import numpy as np
import pytest
from attnscope.profiler import load
from helpers import random_text, tiny_model, word_tokenizer

from attnscope.cli import main

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # from inside ray.data
def test_ray_run_equals_single_process(local_ray, tmp_path, rng):
    d = tmp_path / "m"
    tiny_model("gpt_neox", vocab=200).save_pretrained(d)
    word_tokenizer().save_pretrained(d)
    c = tmp_path / "c.jsonl"
    c.write_text("".join(json.dumps({"text": random_text(int(k), rng)}) + "\n" for k in rng.integers(2, 30, size=11)))
    common = ["profile", str(d), "--prompts", str(c), "--bins", "64", "--thumb-size", "8", "--top-k", "3"]
    common += ["--shard-size", "3", "--batch-size", "2", "--keep", "vectors", "--no-progress"]
    common += ["--threads", "1"]  # a float sum depends on how the threads split it: one thread here and in each actor
    assert main(common + ["--out", str(tmp_path / "one")]) == 0
    assert main(common + ["--out", str(tmp_path / "ray"), "--ray"]) == 0
    a, b = load(tmp_path / "one"), load(tmp_path / "ray")
    assert list(a.prompts) == list(b.prompts)
    assert sorted(a.arrays) == sorted(b.arrays)
    for name in a.arrays:  # same windows, same batches, same order of sums: equal number for number
        assert np.array_equal(a.arrays[name], b.arrays[name]), name
    doc_a = json.loads((tmp_path / "one/run.json").read_text())
    doc_b = json.loads((tmp_path / "ray/run.json").read_text())
    assert doc_a["shards"] == doc_b["shards"] and doc_b["status"] == "complete"
