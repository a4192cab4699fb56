"""One self-contained HTML report of a profile (plotly.js embedded, images inline): opens without a network.

Everything in it is drawn from pooled data (laminar KDEs, thumbnails, per-head summaries, per-token norms), so
its size does not grow with L^2.
"""

from __future__ import annotations

import base64
import html
import io
import json
import warnings
from pathlib import Path

import numpy as np

from attnscope.kernels.stats import LAMINAR, thumb_key

from .base import Renderer
from .suite import plot_span_heads
from .summary import HEAD_COLUMNS, head_summary, high_entropy_positions, token_labels

__all__ = ["ReportRenderer", "write_report"]

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px auto;max-width:1200px;color:#222}
h1{font-size:22px} h2{font-size:18px;margin-top:32px;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:13px} td,th{border:1px solid #ddd;padding:3px 8px;text-align:right}
th{background:#f4f4f4;cursor:pointer;user-select:none} td.l,th.l{text-align:left}
.card td{text-align:left} .scroll{max-height:480px;overflow:auto;display:inline-block}
img{max-width:100%} .note{color:#666;font-size:12px} .how{color:#444;font-size:13px;max-width:900px}
nav#toc{position:sticky;top:0;background:#fff;border-bottom:1px solid #ddd;padding:6px 0;z-index:10;font-size:13px}
nav#toc ol{display:inline;margin:0;padding:0} nav#toc li{display:inline;margin-left:14px}
section{scroll-margin-top:44px}
"""

_SORT_JS = """
document.querySelectorAll('table.sortable').forEach(function(t){
  t.querySelectorAll('th').forEach(function(th, col){
    th.addEventListener('click', function(){
      var body = t.tBodies[0], rows = Array.from(body.rows);
      var asc = th.dataset.dir !== 'asc'; th.dataset.dir = asc ? 'asc' : 'desc';
      rows.sort(function(a, b){
        var x = a.cells[col].dataset.v || a.cells[col].textContent;
        var y = b.cells[col].dataset.v || b.cells[col].textContent;
        var nx = parseFloat(x), ny = parseFloat(y);
        var c = (isNaN(nx) || isNaN(ny)) ? x.localeCompare(y) : nx - ny;
        return asc ? c : -c;
      });
      rows.forEach(function(r){ body.appendChild(r); });
    });
  });
});
"""


def _png(fig) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return f'<img alt="figure" src="data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}">'


def _card(prof) -> str:
    m = prof.meta
    rows = [
        ("model", m.get("model_id")),
        ("architecture", m.get("model_type")),
        ("layers x heads (KV heads)", f"{m.get('n_layers')} x {m.get('n_heads')} ({m.get('n_kv_heads')})"),
        ("head size, d_ff", f"{m.get('head_dim')}, {m.get('d_ff')}"),
        ("model dtype, statistics dtype", f"{m.get('model_dtype')}, {m.get('stats_dtype')}"),
        ("device, attention backend", f"{m.get('device')}, {m.get('attn_implementation')}"),
        ("tokenizer", json.dumps(m.get("tokenizer"))),
        ("prompts, tokens", f"{len(prof.prompts)}, {prof.n_tokens}"),
        ("statistics", json.dumps(m.get("spec"))),
        ("config / weights digest", f"{m.get('config_digest')} / {m.get('weights_digest')}"),
        ("versions", json.dumps(m.get("versions"))),
    ]
    body = "".join(f"<tr><th class=l>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>" for k, v in rows)
    return f"<table class=card>{body}</table>"


def _head_table(prof) -> str:
    s = head_summary(prof)
    cols = list(HEAD_COLUMNS)
    head = (
        "<tr><th>layer</th><th>head</th>"
        + "".join(f'<th title="{html.escape(HEAD_COLUMNS[c])}">{c}</th>' for c in cols)
        + "</tr>"
    )
    rows = []
    for layer in range(prof.n_layers):
        for h in range(prof.n_heads):
            cells = "".join(f"<td data-v='{s[c][layer, h]:.6g}'>{s[c][layer, h]:.4f}</td>" for c in cols)
            rows.append(f"<tr><td>{layer}</td><td>{h}</td>{cells}</tr>")
    legend = "; ".join(f"<b>{c}</b>: {html.escape(d)}" for c, d in HEAD_COLUMNS.items())
    return (
        f"<p class=note>Click a column to sort. {legend}.</p><div class=scroll><table class=sortable id=heads>"
        f"<thead>{head}</thead><tbody>{''.join(rows)}</tbody></table></div>"
    )


def _entropy_table(prof, prompt: int, top: int = 10) -> str:
    labels = token_labels(prof, prompt)
    ent = prof.arrays["tokens.logit_entropy"][prof.prompt_slice(prompt)]
    rows = "".join(
        f"<tr><td>{p}</td><td class=l>{html.escape(repr(labels[p]))}</td><td>{ent[p]:.3f}</td></tr>"
        for p in high_entropy_positions(prof, prompt, top)
    )
    return (
        f"<table class=sortable id=entropy><thead><tr><th>position</th><th class=l>token</th>"
        f"<th>next-token entropy (nats)</th></tr></thead><tbody>{rows}</tbody></table>"
    )


def _top_heads(prof, top: int = 3) -> str:
    """A line per role: how many heads take it and the highest-scoring heads."""
    from .roles import ROLE_THRESHOLDS, head_roles

    r = head_roles(prof)
    H = prof.n_heads
    rows = []
    for role, (col, thr) in ROLE_THRESHOLDS.items():
        order = np.argsort(-r[col].ravel(), kind="stable")[:top]
        best = ", ".join(f"{i // H}:{i % H} ({r[col].ravel()[i]:.2f})" for i in order)
        n = int((r["role"] == role).sum())
        rows.append(f"<tr><td>{html.escape(role)}</td><td>{col} &ge; {thr}</td><td>{n}</td><td>{best}</td></tr>")
    return (
        "<table><thead><tr><th>role</th><th>threshold</th><th>heads</th><th>highest layer:head (score)</th></tr>"
        f"</thead><tbody>{''.join(rows)}</tbody></table>"
    )


def _grid_layers(n_layers: int, k: int = 8) -> list[int]:
    return sorted({int(round(x)) for x in np.linspace(0, n_layers - 1, min(k, n_layers))})


class ReportRenderer(Renderer):
    """The HTML report; with ``compare`` (another profile of the same model), a comparison section too."""

    output_file_extension = "html"
    output_is_binary = False

    def __init__(self, compare=None, names=("A", "B"), prompt: int = 0):
        self.compare, self.names, self.prompt = compare, names, prompt

    def render(self, prof, out_path) -> list[Path]:
        from plotly.offline import get_plotlyjs

        from .interactive import down_proj_scatter, laminar_figure
        from .lens import has_lens, plot_logit_lens_of
        from .roles import plot_head_roles
        from .views import plot_compare, plot_down_proj, plot_layer_grid, plot_layer_grid_relative

        if self.compare is not None:
            prof.check_compatible_model(self.compare)
        prof.prompt_slice(self.prompt)
        out_path = Path(out_path)
        sections: list[tuple[str, str, str, str]] = []  # (id, title, how to read it, body)
        sections.append(
            (
                "model",
                "Model",
                "What was profiled: the model and its geometry, the prompts, and the settings of the statistics.",
                _card(prof),
            )
        )
        lam = []
        for kind in LAMINAR:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the KDE's bandwidth warning: the 'log' panel is its answer
                fig = laminar_figure(prof, kind)
            lam.append(
                f'<div class="plot" id="laminar-{kind}">{fig.to_html(full_html=False, include_plotlyjs=False)}</div>'
            )
        sections.append(
            (
                "laminar",
                "Laminar profiles",
                "One column per layer, all heads pooled. Up the Y axis the attention weight, and the colour says "
                "how many weights of that size the layer has (log colour; the floor is a tenth of one sample's "
                "share). A bright band at 0 is attention spread thinly; weight near 1 is a head locking onto one "
                "token. Self: p(i,i); final: the last token's row; all: every causal pair. The last panel bins "
                "log10 p, which resolves the small weights the other panels pile up at 0.",
                "".join(lam),
            )
        )
        layers = _grid_layers(prof.n_layers)
        reading = (
            "query on Y, key on X, one log colour scale for all panels (grey: no causal pair). A bright first "
            "column is an attention sink, a bright diagonal self/previous-token attention, parallel off-diagonals "
            "copying of a repeated passage."
        )
        if thumb_key(self.prompt) in prof.arrays:
            how = f"Prompt {self.prompt}, layers {layers}, heads averaged: {reading} Yellow cross-hairs mark the "
            how += "tokens of highest next-token entropy."
            grid = plot_layer_grid(prof, layers, None, self.prompt)
        else:  # a corpus run without per-prompt thumbnails (the vectors tier)
            how = f"All {len(prof.prompts)} prompts, averaged in relative position (this run kept no per-prompt "
            how += f"thumbnail: --keep vectors keeps them), layers {layers}, heads averaged: {reading}"
            grid = plot_layer_grid_relative(prof, layers)
        sections.append(("grid", "Layer grid", how, _png(grid)))
        sections.append(
            (
                "heads",
                "Heads",
                "One row per layer and head, over every token profiled. Click a column to sort: high sink = "
                "attends to the first token, high prev = previous-token head, low entropy = sharp attention.",
                _head_table(prof),
            )
        )
        sections.append(
            (
                "roles",
                "Head roles",
                "Left, each head's role (the score it passes by the largest factor: sink, previous-token, induction, "
                "duplicate, self, local, broad; grey 'mixed' passes none); right, the scores behind it, each on its "
                "own scale from 0 to its maximum. Induction and duplicate scores need text that repeats.",
                _png(plot_head_roles(prof)) + _top_heads(prof),
            )
        )
        if has_lens(prof):
            sections.append(
                (
                    "lens",
                    "Logit lens",
                    f"Prompt {self.prompt}, its last tokens: what each layer would predict next if the model stopped "
                    "there (the text in a cell), coloured by the probability that layer gives to the model's final "
                    "prediction (top row). The layer where a column turns bright is where the answer forms.",
                    _png(plot_logit_lens_of(prof, self.prompt)),
                )
            )
        fig = down_proj_scatter(prof, self.prompt)
        sections.append(
            (
                "downproj",
                "down_proj",
                f"Prompt {self.prompt}. The L2 norm of the MLP down-projection's input (neuron activations) and "
                "output per token and layer, log colour: bright rows are tokens with massive activations. Below, "
                "each token's top neurons by |activation| in 3-D (drag to turn, hover for the token).",
                _png(plot_down_proj(prof, self.prompt))
                + f'<div class="plot" id="downproj-3d">{fig.to_html(full_html=False, include_plotlyjs=False)}</div>',
            )
        )
        sections.append(
            (
                "entropy",
                "High-entropy tokens",
                f"Prompt {self.prompt}: the positions where the model was least sure of the next token "
                "(entropy of its next-token distribution, nats).",
                _entropy_table(prof, self.prompt),
            )
        )
        span_fig = plot_span_heads(prof, self.prompt)
        if span_fig is not None:
            sections.append(
                (
                    "spans",
                    "Span attention",
                    f"Prompt {self.prompt} names spans ({', '.join(prof.prompts[self.prompt]['spans'])}): per key "
                    "span, each head's mean attention from the answer span (or the final token) to it, layers down, "
                    "heads across. Bright cells are the heads that read that span; a retrieval head lights up on "
                    "the needle. All prompts' values are in the span_attention SQL view.",
                    _png(span_fig),
                )
            )
        if self.compare is not None:
            a, b = (html.escape(n) for n in self.names)
            sections.append(
                (
                    "compare",
                    f"Comparison: {a} vs {b}",
                    f"Left {a}, middle {b} on one colour scale; right {b} - {a} on a diverging scale symmetric "
                    "about 0 (red: more in B; for laminar rows and norms the log10 ratio). Each colourbar says what "
                    "its scale clips. Norms are by relative position, so prompt sets of any lengths compare.",
                    _png(plot_compare(prof, self.compare, self.names)),
                )
            )
        title = f"attnscope report: {prof.meta.get('model_id')}"
        toc = "".join(f'<li><a href="#{sid}">{html.escape(t)}</a></li>' for sid, t, _, _ in sections)
        body = "".join(
            f'<section id="{sid}"><h2>{html.escape(t)}</h2><p class="how"><b>How to read this.</b> '
            f"{html.escape(how)}</p>{content}</section>"
            for sid, t, how, content in sections
        )
        doc = (
            f"<!DOCTYPE html><html lang=en><head><meta charset=utf-8><title>{html.escape(title)}</title>"
            f"<style>{_CSS}</style><script>{get_plotlyjs()}</script></head><body>"
            f"<h1>{html.escape(title)}</h1><nav id=toc><b>Contents</b><ol>{toc}</ol></nav>{body}"
            f"<script>{_SORT_JS}</script></body></html>"
        )
        out_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = out_path.with_name(f".{out_path.name}.tmp")
        tmp.write_text(doc, encoding="utf-8")
        tmp.replace(out_path)
        return [out_path]


def write_report(prof, out_path, compare=None, names=("A", "B"), prompt: int = 0) -> Path:
    """Shorthand for ``ReportRenderer(compare, names, prompt).render(prof, out_path)[0]``."""
    return ReportRenderer(compare, names, prompt).render(prof, out_path)[0]
