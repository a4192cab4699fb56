"""The conformance sweep: tiny random models of every architecture family attnscope captures, profiled end to end
(``profile``: the probe, the model's own backend, padded batches), against the model's eager ``output_attentions``
(float64 statistics from the returned weights) and a forward hook on each MLP block.

Each config is small (4 layers, hidden 64, 4 heads / 2 KV heads, 4 experts with 2 per token) with the features that
make the architecture itself: sliding windows and chunks of 8 tokens (shorter than the prompts), Gemma-2's
softcapping and ``query_pre_attn_scalar``, gpt-oss's learned sinks, MLA's 24/16 head sizes and yarn scaling, Granite's
``attention_multiplier``, OPT's pre-scaled queries, shared experts. ``SWEEP`` is also what the README's list of
supported architectures is generated from (``python tests/test_architectures.py --markdown``).
"""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from helpers import assert_verbose_allclose, word_tokenizer

from attnscope.kernels import AttnStatsSpec, KeyRanges
from attnscope.kernels.reference import attn_stats_from_probs_ref
from attnscope.kernels.stats import VECTORS

NL, W = 4, 8  # layers; window and chunk size
ALT = ["sliding_attention", "full_attention"] * (NL // 2)
SPEC = AttnStatsSpec(bins=64, thumb_size=8)

COMMON = dict(
    hidden_size=64,
    num_hidden_layers=NL,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    intermediate_size=128,
    max_position_embeddings=256,
    num_local_experts=4,
    num_experts=4,
    n_routed_experts=4,
    num_experts_per_tok=2,
    moe_intermediate_size=48,
    shared_expert_intermediate_size=80,
    initializer_range=0.1,  # attention far from uniform
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)
_MLA = dict(num_key_value_heads=4, kv_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16)
_MLA_MOE = dict(first_k_dense_replace=1, n_shared_experts=1, moe_intermediate_size=40)

# model type -> what its config sets beyond COMMON (the architecture's own features)
SWEEP: dict[str, dict] = {
    "llama": {},
    "mistral": dict(sliding_window=W),
    "qwen2": dict(use_sliding_window=True, sliding_window=W, max_window_layers=0, layer_types=ALT),
    "qwen3": dict(use_sliding_window=True, sliding_window=W, max_window_layers=0, layer_types=ALT),
    "gpt_neox": {},
    "gpt2": dict(n_inner=128, scale_attn_by_inverse_layer_idx=True),
    "gemma": {},
    "gemma2": dict(
        sliding_window=W,
        layer_types=ALT,
        query_pre_attn_scalar=32,
        attn_logit_softcapping=2.0,
        final_logit_softcapping=3.0,
    ),
    "gemma3_text": dict(sliding_window=W, layer_types=ALT, query_pre_attn_scalar=32, final_logit_softcapping=3.0),
    "cohere": dict(logit_scale=0.5),
    "cohere2": dict(sliding_window=W, layer_types=ALT),
    "gpt_oss": dict(sliding_window=W, layer_types=ALT),
    "mixtral": dict(sliding_window=W),
    "qwen2_moe": dict(
        use_sliding_window=True,
        sliding_window=W,
        max_window_layers=0,
        layer_types=ALT,
        decoder_sparse_step=1,
        mlp_only_layers=[0],
    ),
    "qwen3_moe": dict(use_sliding_window=True, sliding_window=W, decoder_sparse_step=1, mlp_only_layers=[0]),
    "olmoe": dict(sliding_window=W),  # the module passes sliding_window, the mask is full: the mask decides
    "llama4_text": dict(
        attention_chunk_size=W,
        no_rope_layer_interval=2,
        interleave_moe_layer_step=2,
        intermediate_size=48,
        intermediate_size_mlp=128,
        floor_scale=4,
        attn_scale=0.1,
    ),
    "deepseek_v3": dict(
        **_MLA,
        **_MLA_MOE,
        q_lora_rank=32,
        head_dim=8,
        n_group=2,
        topk_group=1,
        rope_parameters={
            "rope_type": "yarn",
            "rope_theta": 10000.0,
            "factor": 4.0,
            "original_max_position_embeddings": 64,
            "mscale": 1.0,
            "mscale_all_dim": 1.0,
            "beta_fast": 32,
            "beta_slow": 1,
        },
    ),
    "deepseek_v2": dict(**_MLA, **_MLA_MOE, q_lora_rank=None, head_dim=8, topk_method="greedy"),
    "phi": {},
    "phi3": dict(sliding_window=W),
    "olmo": {},
    "olmo2": {},
    "granite": dict(attention_multiplier=0.05, embedding_multiplier=2.0, residual_multiplier=0.5, logits_scaling=2.0),
    "granitemoe": dict(attention_multiplier=0.05, embedding_multiplier=2.0, residual_multiplier=0.5),
    "starcoder2": dict(sliding_window=W),
    "stablelm": {},
    "gptj": dict(rotary_dim=8, n_inner=128),
    "codegen": dict(rotary_dim=8, n_inner=128, n_ctx=256),
    "opt": dict(ffn_dim=128, word_embed_proj_dim=64),
    "exaone4": dict(sliding_window=W, layer_types=ALT),
    "smollm3": dict(use_sliding_window=True, sliding_window=W, no_rope_layer_interval=2),
    "glm4": {},
    "ernie4_5": {},
    "hunyuan_v1_dense": {},
    "seed_oss": {},
    "apertus": {},
    "arcee": {},
    "dots1": dict(n_shared_experts=1, first_k_dense_replace=1, sliding_window=W, max_window_layers=0, layer_types=ALT),
    "diffllama": {},  # two interface calls per layer on the same q and k (differential attention acts on V)
    "qwen3_next": dict(
        layer_types=["linear_attention", "full_attention"] * (NL // 2),
        linear_num_key_heads=2,
        linear_num_value_heads=4,
        linear_key_head_dim=16,
        linear_value_head_dim=16,
        linear_conv_kernel_dim=4,
        decoder_sparse_step=1,
        mlp_only_layers=[],
    ),
}


def _calls_interface(model_type: str) -> bool:
    """Whether the installed transformers' modeling code of ``model_type`` calls its attention interface."""
    import importlib
    import inspect

    return "ALL_ATTENTION_FUNCTIONS" in inspect.getsource(
        importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")
    )


# attention code that did not call transformers' attention interface (Falcon's calls it from transformers 5.25 on:
# then it is swept like the others)
_NO_INTERFACE = ("falcon", "bloom", "mpt")
UNSUPPORTED = tuple(m for m in _NO_INTERFACE if not _calls_interface(m))
SWEEP.update({m: {} for m in _NO_INTERFACE if m not in UNSUPPORTED})
# the layers' attention pattern the model defines, where it is not full causal on every layer
_EVERY_LAYER_SLIDING = ("mistral", "mixtral", "phi3", "starcoder2", "qwen3_moe")
_NO_HEAD_DIM = ("opt", "bloom", "falcon", "gpt2", "gptj", "codegen", "mpt", "gpt_neox", "phi")


def build_config(model_type: str, vocab: int = 128):
    from transformers import AutoConfig

    base = AutoConfig.for_model(model_type)
    kw = {"vocab_size": vocab} | {k: v for k, v in COMMON.items() if hasattr(base, k)}
    kw |= SWEEP.get(model_type, {})
    if model_type in _NO_HEAD_DIM:
        kw.pop("head_dim", None)
    return AutoConfig.for_model(model_type, **kw)


def build_model(model_type: str, vocab: int = 128, seed: int = 0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(build_config(model_type, vocab), dtype=torch.float32).eval()


def expected_pattern(model_type: str, cfg, layer: int) -> tuple[str, int | None]:
    """The attention layer's pattern from the config, as the model's code defines it (independent of attnscope):
    ("full" | "sliding" | "chunked" | "linear", size)."""
    types = getattr(cfg, "layer_types", None)
    if model_type == "llama4_text":  # chunked on its RoPE layers, full on the NoPE ones
        return (
            ("full", None) if (layer + 1) % cfg.no_rope_layer_interval == 0 else ("chunked", cfg.attention_chunk_size)
        )
    if model_type == "smollm3":  # sliding only on the NoPE layers
        return ("sliding", W) if not cfg.no_rope_layers[layer] else ("full", None)
    if types is not None and model_type not in ("olmoe",):
        kind = types[layer].removesuffix("_attention")
        return {"sliding": ("sliding", W), "full": ("full", None), "linear": ("linear", None)}.get(kind, (kind, None))
    if model_type in _EVERY_LAYER_SLIDING:
        return "sliding", W
    return "full", None


def mlp_block_outputs(model, ids: torch.Tensor) -> dict[int, torch.Tensor]:
    """Layer -> the MLP block's output [L, d] for one unpadded prompt, from forward hooks on the modules the
    modeling files name (OPT keeps fc2 on the layer)."""
    base = model.model if model.base_model is model else model.base_model  # Llama-4's text model names no base
    layers = getattr(base, "layers", None) or getattr(base, "h", None) or base.decoder.layers
    out, handles = {}, []
    for i, layer in enumerate(layers):
        block = next(
            (getattr(layer, n) for n in ("mlp", "feed_forward", "block_sparse_moe") if hasattr(layer, n)), None
        )
        block = layer.fc2 if block is None else block

        def hook(module, args, output, i=i):
            y = output[0] if isinstance(output, tuple) else output
            out[i] = y.reshape(-1, y.shape[-1]).clone()  # Falcon adds the attention output into it in place

        handles.append(block.register_forward_hook(hook))
    _run_hooked(model, ids, handles)
    return out


def _run_hooked(model, ids: torch.Tensor, handles: list) -> None:
    """One forward pass with the hooks ``handles`` registered, removed afterwards (also on error)."""
    try:
        with torch.no_grad():
            model(ids)
    finally:
        for h in handles:
            h.remove()


def router_choices(model, ids: torch.Tensor) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """MoE layer -> (experts [L, k], weights [L, k]) from a forward hook on its router (``gate`` / ``router``):
    transformers' routers return (logits, weights, experts); Llama-4's (scores [L, E], logits)."""
    base = model.model if model.base_model is model else model.base_model
    out, handles = {}, []
    for i, layer in enumerate(getattr(base, "layers", None) or []):  # every MoE type keeps model.layers
        block = getattr(layer, "mlp", None) or getattr(layer, "feed_forward", None) or layer.block_sparse_moe
        router = getattr(block, "gate", None) or getattr(block, "router", None)
        if router is None or not hasattr(block, "experts"):
            continue

        def hook(module, args, o, i=i):
            if len(o) == 3:
                out[i] = (o[2], o[1])
            else:
                idx = torch.topk(o[1], module.top_k, dim=-1).indices
                out[i] = (idx, o[0].gather(-1, idx))

        handles.append(router.register_forward_hook(hook))
    _run_hooked(model, ids, handles)
    return out


PROMPTS = [
    "the cat and the dog were in the river by the stone light of the day so we know them and their work "
    "is good for the people who come back",
    "one tree was by the river and the fox came to see it in the light of the day",
]


@pytest.mark.parametrize("model_type", list(SWEEP))
def test_profile_equals_eager_attention_and_mlp_block(model_type):
    from attnscope.profiler import profile

    torch.set_num_threads(1)
    tok = word_tokenizer()
    model = build_model(model_type)
    prof = profile(model, tok, PROMPTS, spec=SPEC, batch_size=2, keep_vectors=True, progress=False, block_q=16)
    cfg = model.config.get_text_config()
    layers = prof.meta["layers"]
    assert prof.meta["attention_notes"] == []
    model.set_attn_implementation("eager")
    offsets = np.concatenate([[0], np.cumsum([p["n_tokens"] for p in prof.prompts])])
    pairs: dict[int, int] = {}  # attention layer -> allowed (query, key) pairs over both prompts
    for n, text in enumerate(PROMPTS):
        ids = torch.tensor([tok(text)["input_ids"]])
        L = ids.shape[1]
        assert L > 2 * W, "the prompt must be longer than the windows"
        with torch.no_grad():
            eager = model(ids, output_attentions=True)
        lo, hi = offsets[n], offsets[n + 1]
        assert hi - lo == L
        attn_layers = [i for i in range(NL) if expected_pattern(model_type, cfg, i)[0] != "linear"]
        for i, probs in zip(attn_layers, [a for a in eager.attentions if a is not None]):
            kind, size = expected_pattern(model_type, cfg, i)
            got = layers[i]["attention"]
            assert (got["kind"], got["window"] or got["chunk"]) == (kind, size), f"{model_type} layer {i}: {got}"
            ranges = KeyRanges.full(1, L).with_window(*((size, None) if kind == "sliding" else (None, size)))
            ref = attn_stats_from_probs_ref(probs.double(), ranges, SPEC, tokens=ids, has_sinks=got["sinks"])
            pairs[i] = pairs.get(i, 0) + int(ranges.allowed(L).sum())
            for s in VECTORS:
                assert_verbose_allclose(
                    prof.arrays[s.key][i, :, lo:hi],
                    ref[s.name][0],
                    atol=1e-4,
                    rtol=1e-4,
                    name=f"{model_type} L{i} {s.name}",
                )
        for i, y in mlp_block_outputs(model, ids).items():
            want = torch.linalg.vector_norm(y.double(), dim=-1).numpy()
            assert_verbose_allclose(
                prof.arrays["mlp.out_norm"][i, lo:hi], want, atol=1e-3, rtol=1e-3, name=f"{model_type} L{i} mlp"
            )
        for i, (idx, w) in router_choices(model, ids).items():  # the MoE routing per token
            assert np.array_equal(prof.arrays["mlp.experts"][i, lo:hi], idx.numpy()), f"{model_type} L{i} experts"
            assert_verbose_allclose(
                prof.arrays["mlp.expert_weights"][i, lo:hi], w.double(), atol=1e-5, rtol=1e-5, name=f"L{i} weights"
            )
    for i, n in pairs.items():  # every allowed pair counted once per head (one call per layer and forward)
        assert (prof.arrays["attn.moments"][i, :, 0] == n).all(), f"{model_type} L{i} pair count"
    moe = [i for i, lay in enumerate(layers) if lay["mlp"] == "moe"]
    if moe:  # each MoE layer routes every token to k experts; the load sums what the tokens' routing says
        E, k = prof.meta["n_experts"], prof.meta["experts_per_token"]
        idx, w = prof.arrays["mlp.experts"], prof.arrays["mlp.expert_weights"]
        tokens, weight = prof.arrays["mlp.expert_tokens"], prof.arrays["mlp.expert_weight"]
        for i in range(NL):
            if i in moe:
                assert np.array_equal(tokens[i], np.bincount(idx[i].ravel(), minlength=E)), f"L{i} load"
                assert_verbose_allclose(weight[i], np.bincount(idx[i].ravel(), w[i].ravel(), E), name=f"L{i} weight")
                assert tokens[i].sum() == k * prof.n_tokens
            else:
                assert (idx[i] == -1).all() and np.isnan(w[i]).all() and tokens[i].sum() == 0
    else:
        assert prof.meta["n_experts"] is None and "mlp.experts" not in prof.arrays
    if model_type == "qwen3_next":  # a hybrid: its linear-attention layers are said to be none of attention's
        from attnscope.render.roles import NOT_ATTENTION, head_roles

        assert [lay["attention"] is None for lay in layers] == [True, False, True, False]
        roles = head_roles(prof)
        assert (roles["role"][[0, 2]] == NOT_ATTENTION).all() and (roles["role"][[1, 3]] != NOT_ATTENTION).all()


@pytest.mark.parametrize("model_type", ["gemma2", "granite", "cohere", "opt", "llama4_text", "gpt2", "gpt_oss"])
def test_logit_lens_last_layer_is_the_models_own_distribution(model_type):
    # the model's own final norm and logit transform (Gemma-2's final softcapping, Granite's logits_scaling,
    # Cohere's logit_scale, OPT's decoder.final_layer_norm): the last layer's lens is the model's distribution
    from attnscope.profiler.lens import logit_lens

    torch.set_num_threads(1)
    model = build_model(model_type)
    ids = torch.tensor([word_tokenizer()(PROMPTS[1])["input_ids"]])
    out, lens = logit_lens(model, {"input_ids": ids})
    logp = torch.log_softmax(out.logits[0].double(), -1)  # [L, V]
    entropy = -(logp.exp() * logp).sum(-1)
    assert_verbose_allclose(lens["entropy"][-1], entropy, atol=1e-4, rtol=1e-4, name=f"{model_type} entropy")
    assert_verbose_allclose(lens["top_prob"][-1], logp.max(-1).values.exp(), atol=1e-4, rtol=1e-4, name="top_prob")
    target = ids[0, 1:]
    want = logp[:-1].gather(-1, target[:, None])[:, 0].exp()
    assert_verbose_allclose(lens["target_prob"][-1][:-1], want, atol=1e-4, rtol=1e-4, name="target_prob")


def test_moe_run_answers_sql_on_experts_and_routing(tmp_path):
    # a run of a MoE model on disk: the experts view (load per layer and expert) and the tokens' routing columns,
    # read back equal to the in-memory profile
    pytest.importorskip("duckdb")
    from attnscope.cli import main
    from attnscope.cli.run import sql_connection
    from attnscope.profiler import load

    model, tok = build_model("qwen2_moe"), word_tokenizer()
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    run = tmp_path / "run"
    assert (
        main(["profile", str(tmp_path / "m"), "--prompt", PROMPTS[0], "--prompt", PROMPTS[1], "--out", str(run)]) == 0
    )
    prof = load(run)
    con = sql_connection(run)
    rows = con.execute("select layer, sum(tokens), sum(share) from experts group by layer order by layer").fetchall()
    assert [(r[0], r[1]) for r in rows] == [(i, 2 * 50) for i in (1, 2, 3)]  # layer 0 is dense; 50 tokens, k = 2
    assert all(abs(r[2] - 1) < 1e-9 for r in rows)
    got = con.execute("select experts, expert_weights from tokens order by prompt, position").fetchall()
    experts = np.array([r[0] for r in got]).reshape(-1, NL, 2).transpose(1, 0, 2)
    assert np.array_equal(experts, prof.arrays["mlp.experts"][:])
    weights = np.array([r[1] for r in got], dtype=np.float64).reshape(-1, NL, 2).transpose(1, 0, 2)
    assert np.allclose(weights, prof.arrays["mlp.expert_weights"][:], equal_nan=True)
    assert np.array_equal(prof.arrays["mlp.expert_tokens"][1:].sum(1), [100, 100, 100])
    # each expert's neurons: one row per (MoE layer, expert, neuron), the expert's token count on every row
    got = con.execute(
        "select n.layer, n.expert, count(*), min(n.tokens), max(n.tokens), max(e.tokens), max(n.max) from "
        "expert_neurons n join experts e using (layer, expert) group by n.layer, n.expert order by 1, 2"
    ).fetchall()
    mx = prof.arrays["mlp.expert_neuron_max"]
    assert [(r[0], r[1], r[2]) for r in got] == [(i, e, 48) for i in (1, 2, 3) for e in range(4)]
    for layer, e, _, lo, hi, want, top in got:
        assert lo == hi == want
        assert (top is None) if want == 0 else np.isclose(top, mx[layer, e].max())
    con.close()
    # rules of expert neurons, read back through SQL
    assert main(["rules", str(run), "--top-neurons", "2"]) == 0
    con = sql_connection(run)
    rows = con.execute("select layer, expert, count(distinct neuron) from rules group by 1, 2 order by 1, 2").fetchall()
    assert [r[0] for r in rows if r[1] == -1] == [0] and {r[0] for r in rows if r[1] >= 0} == {1, 2, 3}


def test_ffn_memories_of_a_model_with_dense_and_moe_layers():
    # Llama-4 alternates dense MLPs (layers 0, 2) and MoE blocks (1, 3): neuron contexts and promoted tokens of the
    # dense layers' d_ff neurons, and of each routed expert's neurons on the MoE layers; rules cover both
    from attnscope.profiler import profile
    from attnscope.profiler.memories import promoted_tokens
    from attnscope.render.memories import neuron_rules, rules_table

    model, tok = build_model("llama4_text"), word_tokenizer()
    prof = profile(model, tok, PROMPTS, neuron_contexts=3, progress=False)
    promoted = promoted_tokens(model, k=3)
    assert promoted["token"].shape[:2] == (NL, 128)
    assert (promoted["token"][[1, 3]] == -1).all() and (promoted["token"][[0, 2]] >= 0).all()
    assert promoted["expert_token"].shape == (NL, 4, 48, 3)
    assert (promoted["expert_token"][[0, 2]] == -1).all() and (promoted["expert_token"][[1, 3]] >= 0).all()
    base = model.model
    ex = base.layers[1].feed_forward.experts  # expert 2's neuron 5 writes down_proj[2][5, :] ([E, F, d] layout)
    g = base.norm.weight.detach()
    want = torch.topk(model.lm_head.weight.detach() @ (g * ex.down_proj[2, 5].detach()), 3)
    assert np.array_equal(promoted["expert_token"][1, 2, 5], want.indices.numpy())
    assert np.allclose(promoted["expert_logit"][1, 2, 5], want.values.numpy(), atol=1e-5)
    vocab = {i: tok.decode([i]) for i in range(128)}
    rules = neuron_rules(prof, promoted, vocab, top_neurons=2, window=3)
    assert sorted({(r["layer"], r["expert"] is None) for r in rules}) == [(0, True), (1, False), (2, True), (3, False)]
    for r in rules:
        if r["expert"] is not None:  # its trigger is a token routed to that expert, with the recorded activation
            c = r["contexts"][0]
            g_tok = prof.offsets[c["prompt"]] + c["position"]
            assert r["expert"] in prof.arrays["mlp.experts"][r["layer"], g_tok]
            assert np.isclose(
                r["activation"],
                prof.arrays["mlp.expert_neuron_max"][r["layer"], r["expert"], r["activation_neuron"]],
                atol=1e-4,
            )
    table = rules_table(rules)
    assert -1 in table["expert"] and max(table["expert"]) >= 0  # dense rows and expert rows


def test_promoted_tokens_read_the_final_norm_as_the_model_applies_it():
    # Gemma's RMSNorm scales by (1 + weight): the promoted direction is W_U ((1 + w) * W_out[:, n])
    from attnscope.profiler.memories import promoted_tokens

    model = build_model("gemma2")
    with torch.no_grad():
        model.model.norm.weight.normal_(0, 1.0)
    got = promoted_tokens(model, k=4)
    g = 1 + model.model.norm.weight.detach()
    w_out = model.model.layers[2].mlp.down_proj.weight.detach()
    want = torch.topk(model.lm_head.weight.detach() @ (g[:, None] * w_out), 4, dim=0)
    assert np.array_equal(got["token"][2], want.indices.T.numpy())
    assert np.allclose(got["logit"][2], want.values.T.numpy(), atol=1e-4)


@pytest.mark.parametrize("model_type", UNSUPPORTED)
def test_unsupported_architecture_says_why_before_any_work(model_type):
    from transformers import AutoModelForCausalLM

    from attnscope.profiler import UnsupportedModelError, profile

    model = AutoModelForCausalLM.from_config(build_config(model_type))
    with pytest.raises(UnsupportedModelError, match=rf"'{model_type}'.*attention interface") as err:
        profile(model, word_tokenizer(), PROMPTS, progress=False)
    assert "\n" not in str(err.value)


def test_attention_with_a_position_bias_is_refused_in_one_line():
    # Inkling adds relative-position logits (an L x L bias) to q . k: not expressible as two integers per row
    from transformers import AutoModelForCausalLM

    from attnscope.profiler import UnsupportedModelError, profile

    model = AutoModelForCausalLM.from_config(build_config("inkling_text"))
    with pytest.raises(UnsupportedModelError, match="layer 0 adds a position_bias") as err:
        profile(model, word_tokenizer(), PROMPTS, progress=False)
    assert "\n" not in str(err.value)
    assert model.config._attn_implementation != "attnscope"  # restored


def markdown_table() -> str:
    """The README's table of supported architectures, from the sweep."""
    from attnscope.profiler import describe_layers

    rows = ["| model type | attention layers | MLP blocks | scaling, softcap, sinks |", "|---|---|---|---|"]
    for t in SWEEP:
        d = describe_layers(build_model(t))
        att = [lay["attention"] for lay in d["layers"]]
        kinds = ", ".join(
            "linear" if a is None else a["kind"] + (f" {a['window'] or a['chunk']}" if a["kind"] != "full" else "")
            for a in att
        )
        mlp = ", ".join(str(lay["mlp"]) for lay in d["layers"])
        a0 = next(a for a in att if a is not None)
        extra = [f"{a0['scaling']:.3g}"] + (["softcap"] if a0["softcap"] else []) + (["sinks"] if a0["sinks"] else [])
        rows.append(f"| `{t}` | {kinds} | {mlp} | {', '.join(extra)} |")
    return "\n".join(rows)


if __name__ == "__main__" and "--markdown" in sys.argv:
    import warnings

    warnings.filterwarnings("ignore")
    print(markdown_table())
