"""What ``--logit-lens`` costs: attnscope.profile with and without it against a plain SDPA forward, real SmolLM2.

    python benchmarks/bench_lens.py --length 2048

Same process, model loaded once; one burn-in each, then the median of --repeats. The lens reduces every layer's
residual stream over the whole vocabulary: layers x (tokens x vocab x d_model) multiply-adds, i.e. one LM head per
layer, so on a model whose unembedding is a large part of its weights it costs several forwards.
Writes benchmarks/results/lens_smollm2.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from bench_head_roles import median_time

import attnscope
from attnscope.profiler.bench import machine_info
from attnscope.profiler.models import load_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--length", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "lens_smollm2.json"))
    args = ap.parse_args()
    model, tok, model_id = load_model(None, device="cpu", dtype="float32")
    ids = torch.randint(100, 40000, (1, args.length))  # token ids, not text: the length is exact
    text = tok.decode(ids[0])
    ids = tok(text, return_tensors="pt")["input_ids"][:, : args.length]
    text = tok.decode(ids[0])

    def forward():
        with torch.no_grad():
            model(input_ids=ids)

    kw = dict(progress=False, model_id=model_id, batch_size=1)
    res = {
        "what": "SmolLM2-135M float32, one prompt, medians (s)",
        "tokens": int(ids.shape[1]),
        "forward_s": median_time(forward, args.repeats),
        "profile_s": median_time(lambda: attnscope.profile(model, tok, [text], **kw), args.repeats),
        "profile_logit_lens_s": median_time(
            lambda: attnscope.profile(model, tok, [text], logit_lens=True, **kw), args.repeats
        ),
        "machine": machine_info("cpu"),
    }
    res["lens_extra_over_forward"] = (res["profile_logit_lens_s"] - res["profile_s"]) / res["forward_s"]
    Path(args.out).write_text(json.dumps(res, indent=1))
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
