"""A Ray Data run on a local 2-CPU cluster equals a single-process run of the same corpus."""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers import random_text, tiny_model, word_tokenizer

from attnscope.cli import main
from attnscope.profiler import load

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # from inside ray.data
def test_ray_run_equals_single_process(local_ray, tmp_path, rng, capsys):
    d = tmp_path / "m"
    tiny_model("gpt_neox", vocab=200).save_pretrained(d)
    word_tokenizer().save_pretrained(d)
    c = tmp_path / "c.jsonl"
    rows = [{"text": random_text(int(k), rng)} for k in rng.integers(2, 30, size=11)]
    for r in rows[::3]:  # named spans travel to the actors with their prompts
        r["spans"] = {"head": [0, 3], "tail": [[len(r["text"]) - 2, len(r["text"])]]}
    c.write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = ["profile", str(d), "--prompts", str(c), "--bins", "64", "--thumb-size", "8", "--top-k", "3"]
    common += ["--shard-size", "3", "--batch-size", "2", "--keep", "vectors", "--no-progress"]
    common += ["--threads", "1"]  # a float sum depends on how the threads split it: one thread here and in each actor
    assert main(common + ["--out", str(tmp_path / "one")]) == 0
    assert main(common + ["--out", str(tmp_path / "ray"), "--ray"]) == 0
    assert "(4 shard(s), 4 written by the actors, 0 sent back" in capsys.readouterr().out  # 11 prompts, 3 a shard
    a, b = load(tmp_path / "one"), load(tmp_path / "ray")
    assert list(a.prompts) == list(b.prompts)
    assert sorted(a.arrays) == sorted(b.arrays)
    for name in a.arrays:  # same windows, same batches, same order of sums: equal number for number
        assert np.array_equal(a.arrays[name], b.arrays[name]), name
    spans = a.span_attention()
    assert len(set(spans["prompt"])) == 4 and spans == b.span_attention()
    doc_a = json.loads((tmp_path / "one/run.json").read_text())
    doc_b = json.loads((tmp_path / "ray/run.json").read_text())
    assert doc_a["shards"] == doc_b["shards"] and doc_b["status"] == "complete"


def test_actor_writes_its_shards_where_it_sees_the_run(tmp_path, rng):
    """An actor that sees the run's staging marker writes the shard's files itself; one that does not (another
    node, no shared filesystem) sends the shard back. Both commits give the same run, file for file; the staged
    files end up in place and no .staging is left."""
    import pickle

    from attnscope.kernels import AttnStatsSpec
    from attnscope.profiler.distributed import ShardActor, _config_kwargs
    from attnscope.profiler.run import ProfileConfig
    from attnscope.profiler.store import STAGING, RunWriter

    d = tmp_path / "m"
    tiny_model("llama", vocab=200).save_pretrained(d)
    word_tokenizer().save_pretrained(d)
    cfg = ProfileConfig(spec=AttnStatsSpec(bins=64, thumb_size=8), top_k=3, keep_vectors=True, threads=1)
    texts = [random_text(int(k), rng) for k in rng.integers(2, 20, size=4)]
    batch = {"first": [0], "name": ["s000000"], "prompt0": [0], "ids": [[f"p{i}" for i in range(4)]], "texts": [texts]}
    kw = dict(model=str(d), device="cpu", dtype="float32", config=_config_kwargs(cfg), threads=1)

    staged = RunWriter(tmp_path / "a", None, "new")
    staged.acquire()
    (tmp_path / "a" / STAGING).mkdir()
    (tmp_path / "a" / STAGING / "run-x").write_text("")
    out = ShardActor(**kw, run_dir=str(tmp_path / "a"), token="run-x")(batch)
    files = list(out["files"][0])
    assert out["shard"] == [b""] and sorted(f.split("/")[0] for f in files) == ["index", "prompts", "tokens", "vectors"]
    assert all((tmp_path / "a" / STAGING / f).is_file() for f in files)
    staged.meta = pickle.loads(out["meta"][0])
    staged.open()
    staged.commit_staged("s000000", 0, 4, int(out["n_tokens"][0]), files, pickle.loads(out["accum"][0]))
    staged.close()

    back = ShardActor(**kw, run_dir=str(tmp_path / "b"), token="run-x")(batch)  # no marker there
    assert back["files"] == [[]] and back["accum"] == [b""]
    with RunWriter(tmp_path / "b", pickle.loads(back["meta"][0]), "new") as w:
        w.commit(pickle.loads(back["shard"][0]))

    assert not (tmp_path / "a" / STAGING).exists()
    doc_a = json.loads((tmp_path / "a/run.json").read_text())
    doc_b = json.loads((tmp_path / "b/run.json").read_text())
    assert doc_a["shards"] == doc_b["shards"] and doc_a["accum_sha256"] == doc_b["accum_sha256"]
    for f in doc_a["shards"][0]["files"]:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f
    a, b = load(tmp_path / "a"), load(tmp_path / "b")
    assert list(a.prompts) == list(b.prompts) and [p["id"] for p in a.prompts] == [f"p{i}" for i in range(4)]
