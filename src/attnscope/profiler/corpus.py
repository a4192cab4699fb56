"""Corpus readers: prompts streamed from .txt, .jsonl, .csv/.tsv, .parquet files and Hugging Face datasets on disk.

Every prompt gets a stable id for ``--resume``: the corpus's own id (``--id-column``, default ``id``) where it has
one, else ``<index>:<first 16 hex digits of the text's SHA-256>``. Readers stream (memory does not grow with the
corpus); ``Corpus.check`` reads everything once to count the prompts and to report a malformed row by file and
line before any model is loaded. A .csv or .tsv file is a table like Parquet: its first line names the columns.
A prompt holding a NUL character is refused (it is binary data, not text).
"""

from __future__ import annotations

import csv
import hashlib
import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from attnscope.kernels.stats import LAST_SPAN

__all__ = ["Corpus", "CorpusError", "PromptItem", "check_char_spans", "jsonl_rows", "read_text_file"]


@dataclass(frozen=True)
class PromptItem:
    """One prompt of a corpus: a stable id (the corpus's ``id`` where it has one, else index and content hash)."""

    id: str
    text: str
    spans: dict | None = None  # name -> [(start, end), ...] character pieces of the text (end exclusive)


class CorpusError(ValueError):
    """A corpus file is missing, a directory, not text, or holds a malformed row (the message names where)."""


def check_char_spans(spans, text: str, where: str, error: type[Exception] = None) -> dict | None:
    """A row's named spans as ``{name: [(start, end), ...]}`` character pieces of ``text`` (end exclusive), from
    ``{name: [start, end] | [[start, end], ...]}`` or that as a JSON string; None for no spans (None, {} or "").
    ``error`` (default ``CorpusError``) names ``where`` on anything else, an empty piece, or one outside the text."""
    error = error or CorpusError
    if spans is None or (isinstance(spans, str | dict) and not spans):
        return None
    if isinstance(spans, str):
        try:
            spans = json.loads(spans)
        except json.JSONDecodeError as e:
            raise error(f"{where}: spans are not valid JSON ({e.msg})") from None
    if not isinstance(spans, dict):
        raise error(f"{where}: spans must map names to [start, end] or [[start, end], ...], got {type(spans).__name__}")
    out = {}
    for name, v in spans.items():
        if not name or name == LAST_SPAN:
            raise error(f"{where}: span name {name!r} is not allowed ({LAST_SPAN!r} is the final token's query span)")
        pieces = [v] if isinstance(v, list | tuple) and len(v) == 2 and all(isinstance(x, int) for x in v) else v
        ok = isinstance(pieces, list | tuple) and pieces
        ok = ok and all(
            isinstance(p, list | tuple) and len(p) == 2 and all(isinstance(x, int) for x in p) for p in pieces
        )
        if not ok:
            raise error(f"{where}: span {name!r} must be [start, end] or a list of them (character offsets), got {v!r}")
        for a, b in pieces:
            if not 0 <= a < b <= len(text):
                raise error(f"{where}: span {name!r} piece [{a}, {b}] is empty or lies outside the text "
                            f"({len(text)} characters)")  # fmt: skip
        out[str(name)] = [(int(a), int(b)) for a, b in pieces]
    return out


def read_text_file(path: str | Path, what: str = "prompt file") -> str:
    """The whole UTF-8 text of ``path``; ``CorpusError`` naming the file when it is missing, a directory or binary."""
    p = Path(path)
    if p.is_dir():
        raise CorpusError(f"{what} {p} is a directory, not a file")
    if not p.is_file():
        raise CorpusError(f"{what} {p} does not exist")
    try:
        return p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise CorpusError(f"{what} {p} is not UTF-8 text (byte {e.start}: {e.reason})") from None
    except OSError as e:
        raise CorpusError(f"cannot read {what} {p}: {e.strerror}") from None


def _is_hf_dataset(p: Path) -> bool:
    return p.is_dir() and ((p / "dataset_info.json").is_file() or (p / "state.json").is_file())


_DELIMITERS = {".csv": ",", ".tsv": "\t"}


def _table_rows(p: Path, tc: str, ic: str, sc: str) -> Iterator[tuple[str | None, object, str, object]]:
    """Rows of a .csv/.tsv file whose first line is the header; ``where`` is the line a row starts on."""
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # a long prompt is one field (the default limit is 128 KiB)
    lines = (text for _, text in _lines(p, keep_ends=True))
    reader = csv.reader(lines, delimiter=_DELIMITERS[p.suffix.lower()], strict=True)  # strict: a stray quote is
    # an error, not a field that swallows the rest of the file
    start = 1
    try:
        header = next(reader, None)
        if header is None:
            return
        names = [h.strip() for h in header]
        if names[:1] and names[0].startswith("\ufeff"):  # a spreadsheet's byte-order mark
            names[0] = names[0][1:].strip()
        if tc not in names:
            raise CorpusError(
                f"{p} has no column {tc!r} (its first line names the columns: {', '.join(names)}); --text-column"
            )
        ti, ii = names.index(tc), (names.index(ic) if ic in names else None)
        si = names.index(sc) if sc in names else None
        start = reader.line_num + 1
        for row in reader:
            where, start = f"{p}:{start}", reader.line_num + 1
            if not row:  # a blank line
                continue
            if len(row) != len(names):
                raise CorpusError(f"{where}: expected {len(names)} fields (the header's), got {len(row)}")
            spans = row[si] if si is not None else None  # a JSON string
            yield ((row[ii] or None) if ii is not None else None), row[ti], where, spans  # an empty id cell: no id
    except csv.Error as e:
        raise CorpusError(f"{p}:{start}: not valid {p.suffix[1:].upper()} ({e})") from None


def jsonl_rows(p: Path) -> Iterator[tuple[int, object]]:
    """(line number, parsed value) of each non-blank line of a JSONL file, streamed; ``CorpusError`` naming the
    file and line for a line that is not UTF-8 or not JSON."""
    for n, line in _lines(p):
        if not line.strip():
            continue
        try:
            yield n, json.loads(line)
        except json.JSONDecodeError as e:
            raise CorpusError(f"{p}:{n}: not valid JSON ({e.msg})") from None


def _lines(p: Path, keep_ends: bool = False) -> Iterator[tuple[int, str]]:
    """(line number, text) of each line, decoded line by line so a bad byte is reported at its own line."""
    try:
        with open(p, "rb") as f:
            for n, raw in enumerate(f, 1):
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise CorpusError(f"{p}:{n}: not UTF-8 text ({e.reason})") from None
                yield n, text if keep_ends else text.rstrip("\r\n")
    except OSError as e:
        raise CorpusError(f"cannot read {p}: {e.strerror}") from None


@dataclass
class Corpus:
    """Prompts from literal texts, whole-file prompts and corpus files, in that order.

    Args:
        texts: literal prompts (``--prompt``).
        files: files whose whole text is one prompt (``--prompt-file``).
        corpora: corpus files or dataset directories (``--prompts``).
        text_column: the text field of .jsonl/.csv/.tsv/.parquet/datasets rows.
        id_column: the id field, used as the prompt id where present.
        spans_column: the named-spans field, where present: ``{name: [start, end] | [[start, end], ...]}`` character
            offsets of the text (end exclusive); a JSON string in a .csv/.tsv cell, a struct or a JSON string in
            Parquet and datasets.
    """

    texts: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    corpora: list[str] = field(default_factory=list)
    text_column: str = "text"
    id_column: str = "id"
    spans_column: str = "spans"
    first_index: int = 0  # where the index part of generated ids starts (an --append continues a run's count)

    def __post_init__(self) -> None:
        for f in self.corpora:
            p = Path(f)
            if p.is_dir() and not _is_hf_dataset(p):
                raise CorpusError(
                    f"prompts file {p} is a directory (a Hugging Face dataset saved with save_to_disk would hold "
                    "dataset_info.json); give a .txt, .jsonl, .csv, .tsv or .parquet file"
                )
            if not p.exists():
                raise CorpusError(f"prompts file {p} does not exist")

    # -- raw rows: (id or None, text, where, spans or None) --
    def _rows(self) -> Iterator[tuple[str | None, object, str, object]]:
        for i, t in enumerate(self.texts):
            yield None, t, f"--prompt {i + 1}", None
        for f in self.files:
            text = read_text_file(f)
            nul = text.find("\x00")  # a whole file is one prompt: a NUL in it is named by its line
            yield None, text, str(f) if nul < 0 else f"{f}:{text.count(chr(10), 0, nul) + 1}", None
        for f in self.corpora:
            yield from self._corpus_rows(Path(f))

    def _corpus_rows(self, p: Path) -> Iterator[tuple[str | None, object, str, object]]:
        tc, ic, sc = self.text_column, self.id_column, self.spans_column
        if _is_hf_dataset(p):
            try:
                import datasets
            except ImportError:
                raise CorpusError(f"{p} is a Hugging Face dataset: reading it needs `pip install datasets`") from None
            ds = datasets.load_from_disk(str(p))
            if isinstance(ds, datasets.DatasetDict):
                raise CorpusError(f"{p} holds several splits ({', '.join(ds)}); give one split's directory")
            if tc not in ds.column_names:
                raise CorpusError(f"{p} has no column {tc!r} (columns: {', '.join(ds.column_names)}); --text-column")
            has_id, has_spans = ic in ds.column_names, sc in ds.column_names
            for n, row in enumerate(ds):
                yield (str(row[ic]) if has_id else None), row[tc], f"{p} row {n}", row[sc] if has_spans else None
        elif p.suffix == ".jsonl":
            for n, obj in jsonl_rows(p):
                if isinstance(obj, dict):
                    if not isinstance(obj.get(tc), str):
                        raise CorpusError(f"{p}:{n}: expected a string field {tc!r}")
                    yield (str(obj[ic]) if ic in obj else None), obj[tc], f"{p}:{n}", obj.get(sc)
                elif isinstance(obj, str):
                    yield None, obj, f"{p}:{n}", None
                else:
                    raise CorpusError(f"{p}:{n}: expected a string or an object with a string field {tc!r}")
        elif p.suffix.lower() in _DELIMITERS:
            yield from _table_rows(p, tc, ic, sc)
        elif p.suffix == ".parquet":
            import pyarrow.parquet as pq

            try:
                f = pq.ParquetFile(p)
            except Exception as e:  # pyarrow raises its own error types for a file that is not Parquet
                raise CorpusError(f"{p} is not a Parquet file ({e})") from None
            names = f.schema_arrow.names
            if tc not in names:
                raise CorpusError(f"{p} has no column {tc!r} (columns: {', '.join(names)}); --text-column")
            cols = [tc] + [c for c in (ic, sc) if c in names]
            n = 0
            for batch in f.iter_batches(batch_size=4096, columns=cols):
                texts = batch.column(tc).to_pylist()
                ids = batch.column(ic).to_pylist() if ic in names else [None] * len(texts)
                spans = batch.column(sc).to_pylist() if sc in names else [None] * len(texts)
                for t, i, sp in zip(texts, ids, spans):
                    yield (None if i is None else str(i)), t, f"{p} row {n}", sp
                    n += 1
        else:  # plain text: one prompt per non-empty line
            for n, line in _lines(p):
                if line.strip():
                    yield None, line, f"{p}:{n}", None

    def __iter__(self):
        for index, (pid, text, where, spans) in enumerate(self._rows(), self.first_index):
            if not isinstance(text, str):
                raise CorpusError(f"{where}: the prompt is not a string ({type(text).__name__})")
            if not text.strip():
                raise CorpusError(f"{where}: the prompt is empty")
            if "\x00" in text:
                raise CorpusError(f"{where}: the prompt holds a NUL character (\\x00): binary data, not text")
            if pid is None:
                pid = f"{index}:{hashlib.sha256(text.encode()).hexdigest()[:16]}"
            yield PromptItem(pid, text, check_char_spans(spans, text, where))

    def check(self) -> int:
        """Read every prompt once: the count, or ``CorpusError`` at the first malformed row or repeated id."""
        seen: set[str] = set()
        texts: dict[str, int] = {}  # sha256 of the prompts with generated ids -> their number
        n = 0
        for it in self:
            if it.id in seen:
                raise CorpusError(f"prompt id {it.id!r} appears twice: ids must be unique for --resume")
            seen.add(it.id)
            sha = hashlib.sha256(it.text.encode()).hexdigest()
            if it.id.endswith(":" + sha[:16]):  # a generated id: the prompt is its text
                if sha in texts:
                    raise CorpusError(
                        f"prompt {n} repeats prompt {texts[sha]} (the same text): a prompt is profiled once per run; "
                        "give each prompt an id (a JSONL or table id field, --id-column) to profile both"
                    )
                texts[sha] = n
            n += 1
        return n
