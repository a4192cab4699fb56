"""The command line: errors are one line and exit code 2, never a traceback or a partial output directory."""

from __future__ import annotations

import json

import pytest
from helpers import random_text, tiny_model, word_tokenizer

from attnscope.cli import main
from attnscope.profiler import load


@pytest.fixture(scope="module")
def model_dir(tiny_llama64_dir):
    return tiny_llama64_dir


@pytest.fixture(scope="module")
def other_model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny_neox")
    tiny_model("gpt_neox", vocab=200).save_pretrained(d)
    word_tokenizer().save_pretrained(d)
    return d


def _fails(capsys, argv, match):
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("attnscope: error:") and match in last, last
    return last


def test_profile_then_render(model_dir, tmp_path, capsys, rng):
    out = tmp_path / "run"
    pf = tmp_path / "p.txt"
    pf.write_text(random_text(30, rng))
    rc = main(
        [
            "profile",
            str(model_dir),
            "--prompt-file",
            str(pf),
            "--prompt",
            random_text(12, rng),
            "--out",
            str(out),
            "--bins",
            "256",
            "--keep-head",
            "1:2",
            "--no-progress",
        ]
    )
    assert rc == 0, capsys.readouterr().err
    prof = load(out)
    assert len(prof.prompts) == 2 and "attn.full.p0.l1.h2" in prof.arrays
    # --append merges a second run of the same model
    assert (
        main(
            [
                "profile",
                str(model_dir),
                "--prompt",
                random_text(5, rng),
                "--out",
                str(out),
                "--bins",
                "256",
                "--append",
                "--no-progress",
            ]
        )
        == 0
    )
    assert len(load(out).prompts) == 3
    # --append with other settings is refused before profiling; a plain re-run says how to replace or add
    _fails(
        capsys,
        ["profile", str(model_dir), "--prompt", "cat", "--out", str(out), "--bins", "128", "--append"],
        "settings (--bins, --thumb-size) differ",
    )
    _fails(capsys, ["profile", str(model_dir), "--prompt", "cat", "--out", str(out)], "--force replaces it")
    _fails(
        capsys,
        ["profile", str(model_dir), "--prompt", "cat", "--out", str(out), "--append", "--dtype", "bfloat16"],
        "the dtype differs",
    )
    argv = ["profile", str(model_dir), "--prompt", "cat dog", "--out", str(out), "--bins", "128", "--no-progress"]
    assert main(argv + ["--force"]) == 0
    assert len(load(out).prompts) == 1 and load(out).meta["spec"]["bins"] == 128
    assert main(["render", str(out), "--per-head", "--kinds", "self,all"]) == 0
    figs = sorted(p.name for p in (out / "figures").iterdir())
    assert figs == ["laminar_all.png", "laminar_all_heads.png", "laminar_self.png", "laminar_self_heads.png"]


def test_corpus_files(model_dir, tmp_path, capsys, rng):
    jl = tmp_path / "c.jsonl"
    jl.write_text(json.dumps({"text": random_text(6, rng)}) + "\n\n" + json.dumps(random_text(4, rng)) + "\n")
    txt = tmp_path / "c.txt"
    txt.write_text(random_text(5, rng) + "\n\n" + random_text(7, rng) + "\n")
    out = tmp_path / "corpus"
    assert (
        main(
            [
                "profile",
                str(model_dir),
                "--prompts",
                str(jl),
                "--prompts",
                str(txt),
                "--out",
                str(out),
                "--bins",
                "64",
                "--no-progress",
            ]
        )
        == 0
    )
    assert len(load(out).prompts) == 4
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": 3}\n')
    _fails(capsys, ["profile", str(model_dir), "--prompts", str(bad), "--out", str(tmp_path / "n")], "bad.jsonl:1")


def test_bad_inputs(model_dir, other_model_dir, tmp_path, capsys, rng):
    out = tmp_path / "o"
    m = str(model_dir)
    _fails(capsys, ["profile", m, "--prompt", "   ", "--out", str(out)], "--prompt 1: the prompt is empty")
    _fails(capsys, ["profile", m, "--prompt-file", str(tmp_path / "nope.txt"), "--out", str(out)], "does not exist")
    _fails(capsys, ["profile", m, "--prompt-file", str(tmp_path), "--out", str(out)], "is a directory, not a file")
    _fails(capsys, ["profile", m, "--prompts", str(tmp_path), "--out", str(out)], "is a directory")
    binary = tmp_path / "bin.txt"
    binary.write_bytes(b"\xff\xfe\x00abc")
    _fails(capsys, ["profile", m, "--prompt-file", str(binary), "--out", str(out)], f"{binary} is not UTF-8 text")
    _fails(capsys, ["profile", str(tmp_path / "no_model"), "--prompt", "a", "--out", str(out)], "does not exist")
    _fails(capsys, ["profile", str(tmp_path / "m.gguf"), "--prompt", "a", "--out", str(out)], "does not exist")
    long = random_text(100, rng)  # the model has 64 positions
    _fails(capsys, ["profile", m, "--prompt", long, "--out", str(out)], "more than the model's 64 positions")
    _fails(capsys, ["profile", m, "--prompt", "cat", "--keep-head", "9:0", "--out", str(out)], "out of range")
    _fails(capsys, ["profile", m, "--prompt", "cat", "--keep-head", "x", "--out", str(out)], "LAYER:HEAD")
    _fails(capsys, ["profile", m, "--prompt", "cat", "--bins", "100", "--out", str(out)], "power of two")
    assert not out.exists(), "a failed run left an output directory"
    # --allow-long lets the long prompt through
    assert main(["profile", m, "--prompt", long, "--allow-long", "--out", str(out), "--no-progress"]) == 0
    # --out holding another model's run
    _fails(capsys, ["profile", str(other_model_dir), "--prompt", "cat", "--out", str(out), "--append"], "another model")
    assert load(out).meta["model_type"] == "llama"


def test_unsupported_architecture(tmp_path, capsys):
    import transformers as tf

    d = tmp_path / "bloom"
    tf.BloomForCausalLM(tf.BloomConfig(vocab_size=200, hidden_size=32, n_layer=1, n_head=2)).save_pretrained(d)
    word_tokenizer().save_pretrained(d)
    _fails(capsys, ["profile", str(d), "--prompt", "cat dog", "--out", str(tmp_path / "o")], "unsupported architecture")
    assert not (tmp_path / "o").exists()


def test_render_errors(tmp_path, capsys):
    _fails(capsys, ["render", str(tmp_path / "none")], "not a profile directory")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "profile.json").write_text("[]")
    (tmp_path / "junk" / "profile.safetensors").write_bytes(b"xx")
    _fails(capsys, ["render", str(tmp_path / "junk")], "not an attnscope profile")


def test_help_matches_the_options():
    from attnscope.cli import build_parser

    text = build_parser()._subparsers._group_actions[0].choices["profile"].format_help()
    for opt in (
        "--prompt-file",
        "--prompts",
        "--device",
        "--dtype",
        "--keep-head",
        "--full-max-tokens",
        "--allow-long",
        "--append",
        "--force",
        "--impl",
        "--batch-size",
        "--resume",
        "--keep",
        "--shard-size",
        "--text-column",
        "--ray",
        "runs/<model>",
    ):
        assert opt in text
