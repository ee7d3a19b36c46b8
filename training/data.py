"""Data layer: load instruction records from files or the Hub, normalise them to chat messages,
render them to token ids with a loss mask that keeps only assistant tokens.

Every example keeps a stable id (its own ``id`` field, else a hash of its content) and its
provenance (source file and 1-based line or record index).
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
TULU_USER = "<|user|>\n"
TULU_ASSISTANT = "<|assistant|>\n"
TULU_SYSTEM = "<|system|>\n"
TULU_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|assistant|>\\n' + message['content'] + eos_token }}"
    "{% if not loop.last %}{{ '\\n' }}{% endif %}"
    "{% else %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] }}"
    "{% if not loop.last or add_generation_prompt %}{{ '\\n' }}{% endif %}"
    "{% endif %}"
    "{% if loop.last and add_generation_prompt and message['role'] != 'assistant' %}{{ '<|assistant|>\\n' }}{% endif %}"
    "{% endfor %}"
)
"""Jinja chat template that renders exactly the Tulu text of ``iaif.training.data.render(template="tulu")``:
``<|user|>\\n…\\n<|assistant|>\\n…</s>``, turns joined by a newline, no trailing newline."""


class DataError(ValueError):
    """Bad input data. The message always names the source, the line and the field."""

    def __init__(self, source: str, line: int | None, field_name: str | None, problem: str):
        where = f"{source}:{line}" if line is not None else source
        what = f" field '{field_name}'" if field_name else ""
        super().__init__(f"{where}:{what} {problem}")
        self.source, self.line, self.field_name, self.problem = source, line, field_name, problem


@dataclass(frozen=True)
class Message:
    role: str  # "system" | "user" | "assistant"
    content: str


@dataclass(frozen=True)
class Example:
    """One instruction example, normalised to chat messages, with provenance."""

    id: str
    messages: tuple[Message, ...]
    source: str
    line: int
    task: str
    record: dict[str, Any] = field(compare=False, hash=False, repr=False)

    @property
    def answer(self) -> str:
        """Content of the last assistant turn."""
        return next(m.content for m in reversed(self.messages) if m.role == "assistant")

    @property
    def prompt(self) -> str:
        """Content of the last user turn."""
        return next(m.content for m in reversed(self.messages) if m.role == "user")


@dataclass(frozen=True)
class TokenizedExample:
    id: str
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX on every non-assistant token

    @property
    def num_answer_tokens(self) -> int:
        return sum(1 for t in self.labels if t != IGNORE_INDEX)

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass
class DataConfig:
    """Where a pool or target set comes from."""

    path: str = ""
    """Local .json/.jsonl/.parquet/.tsv file, a `datasets.save_to_disk` folder, or a Hub dataset id."""
    split: str = "train"
    """Split to read for Hub datasets and `save_to_disk` DatasetDicts."""
    format: Literal["auto", "jsonl", "json", "parquet", "flan_cot_tsv", "disk", "hub"] = "auto"
    task: str | None = None
    """Task label for every example; default: the record's `task` field, else the file stem."""
    max_examples: int | None = None
    """Read only the first N records (None: all)."""


# --------------------------------------------------------------------------------------------
# Reading raw records
# --------------------------------------------------------------------------------------------


_FILE_SUFFIXES = {".jsonl": "jsonl", ".json": "json", ".parquet": "parquet", ".tsv": "flan_cot_tsv"}
_OTHER_FILE_SUFFIXES = {".csv", ".txt", ".arrow", ".gz", ".bz2", ".xz", ".zst", ".zip", ".yaml", ".yml"}


def _detect_format(path: str) -> str:
    p = Path(path)
    if p.is_dir():
        return "disk"
    if p.exists():
        return _FILE_SUFFIXES.get(p.suffix.lower(), "jsonl")
    suffix = p.suffix.lower()
    if (path.count("/") <= 1 and not path.startswith((".", "/", "~"))
            and suffix not in _FILE_SUFFIXES and suffix not in _OTHER_FILE_SUFFIXES):
        return "hub"
    raise DataError(path, None, None, "no such file or folder")


def json_error_text(err: json.JSONDecodeError) -> str:
    """'malformed JSON: expecting value at column 31' from a decoder error (its message may end in 'at')."""
    msg = err.msg[:1].lower() + err.msg[1:]
    return f"malformed JSON: {msg}{'' if msg.endswith(' at') else ' at'} column {err.colno}"


def _not_utf8(source: str, raw: bytes, err: UnicodeDecodeError) -> DataError:
    """DataError naming the line and column of the first byte of ``raw`` (a whole file) that is not UTF-8."""
    line = raw.count(b"\n", 0, err.start) + 1
    column = err.start - raw.rfind(b"\n", 0, err.start)
    return DataError(source, line, None, f"not UTF-8 text (byte 0x{raw[err.start]:02x} at column {column})")


def read_text(path: str | Path) -> str:
    """A whole UTF-8 text file; a byte that is not UTF-8 is a ``DataError`` naming the file and line."""
    raw = Path(path).read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise _not_utf8(str(path), raw, err) from None


def read_text_lines(path: str | Path) -> Iterator[tuple[int, str]]:
    """Yield (1-based line number, line) of a UTF-8 text file; a byte that is not UTF-8 is a
    ``DataError`` naming the file and line."""
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            try:
                yield lineno, raw.decode("utf-8")
            except UnicodeDecodeError as err:
                bad = _not_utf8(str(path), raw, err)
                raise DataError(str(path), lineno, None, bad.problem) from None


def read_jsonl(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (1-based line number, record) for each non-blank line of a JSONL file of objects."""
    for lineno, raw in read_text_lines(path):
        if not raw.strip():
            continue
        try:
            rec = json.loads(raw.rstrip("\r\n"))
        except json.JSONDecodeError as err:
            raise DataError(str(path), lineno, None, json_error_text(err)) from None
        if not isinstance(rec, dict):
            raise DataError(str(path), lineno, None, f"expected a JSON object, got {type(rec).__name__}")
        yield lineno, rec


def iter_records(cfg: DataConfig) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (line or record number, record) pairs, 1-based, in file order."""
    fmt = cfg.format if cfg.format != "auto" else _detect_format(cfg.path)
    src = cfg.path
    if fmt == "jsonl":
        yield from read_jsonl(src)
    elif fmt == "json":
        try:
            data = json.loads(read_text(src))
        except json.JSONDecodeError as err:
            raise DataError(src, err.lineno, None, json_error_text(err)) from None
        if isinstance(data, dict):  # {"data": [...]} or {"examples": [...]}
            lists = [v for v in data.values() if isinstance(v, list)]
            if len(lists) != 1:
                raise DataError(src, None, None, "expected a JSON list of records or an object holding one list")
            data = lists[0]
        for i, rec in enumerate(data, start=1):
            if not isinstance(rec, dict):
                raise DataError(src, i, None, f"record {i} is not a JSON object")
            yield i, rec
    elif fmt == "flan_cot_tsv":
        for lineno, line in read_text_lines(src):
            row = next(csv.reader([line], delimiter="\t", quoting=csv.QUOTE_NONE), [])
            if not row or all(not c.strip() for c in row):
                continue
            if len(row) != 3:
                raise DataError(src, lineno, None, f"expected 3 tab-separated columns (question, answer, rationale), got {len(row)}")
            question, answer, rationale = (c.replace("\\n", "\n") for c in row)  # FLAN escapes newlines
            yield lineno, {"question": question, "answer": answer, "rationale": rationale}
    elif fmt == "parquet":
        import datasets

        ds = datasets.Dataset.from_parquet(src)
        for i, rec in enumerate(ds, start=1):
            yield i, dict(rec)
    elif fmt in ("disk", "hub"):
        import datasets

        if fmt == "disk":
            ds = datasets.load_from_disk(src)
        else:
            ds = _load_hub(src, cfg.split, guessed=cfg.format == "auto")
        if isinstance(ds, datasets.DatasetDict):
            if cfg.split not in ds:
                raise DataError(src, None, "split", f"split '{cfg.split}' not found; have {sorted(ds)}")
            ds = ds[cfg.split]
        for i, rec in enumerate(ds, start=1):
            yield i, dict(rec)
    else:
        raise DataError(src, None, "format", f"unknown format '{fmt}'")


def _load_hub(src: str, split: str, guessed: bool) -> Any:
    """``datasets.load_dataset``; when ``src`` was only taken for a Hub id because no such local path
    exists, a failure says that first."""
    import datasets

    try:
        return datasets.load_dataset(src, split=split)
    except Exception as err:  # offline, unknown repository, network: many error types
        text = str(err).strip()
        reason = type(err).__name__ + (f": {text.splitlines()[0]}" if text else "")
        if guessed:
            problem = f"no such local file or folder, and not a reachable Hub dataset id either ({reason})"
            raise DataError(src, None, None, problem) from None
        raise DataError(src, None, None, f"cannot load the Hub dataset ({reason})") from None


# --------------------------------------------------------------------------------------------
# Normalising record shapes to messages
# --------------------------------------------------------------------------------------------


def _text(rec: dict[str, Any], key: str, src: str, line: int, *, allow_empty: bool = False) -> str:
    value = rec.get(key)
    if value is None:
        raise DataError(src, line, key, "missing")
    if not isinstance(value, str):
        raise DataError(src, line, key, f"expected a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise DataError(src, line, key, "is empty")
    return value


def record_to_messages(rec: dict[str, Any], src: str, line: int) -> tuple[Message, ...]:
    """Normalise one record (chat, Alpaca, prompt/completion, question/answer, FLAN CoT) to messages."""
    rec = {k: v for k, v in rec.items() if v is not None}  # columnar sources fill absent fields with None
    if "messages" in rec:
        raw = rec["messages"]
        if not isinstance(raw, list) or not raw:
            raise DataError(src, line, "messages", "must be a non-empty list of {role, content}")
        msgs = []
        for i, m in enumerate(raw):
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise DataError(src, line, f"messages[{i}]", "needs 'role' and 'content'")
            if m["role"] not in ("system", "user", "assistant"):
                raise DataError(src, line, f"messages[{i}].role", f"unknown role '{m['role']}'")
            if not isinstance(m["content"], str):
                raise DataError(src, line, f"messages[{i}].content", "must be a string")
            if m["role"] == "assistant" and not m["content"].strip():
                raise DataError(src, line, f"messages[{i}].content", "assistant answer is empty")
            msgs.append(Message(m["role"], m["content"]))
        if not any(m.role == "assistant" for m in msgs):
            raise DataError(src, line, "messages", "has no assistant turn (nothing to learn)")
        return tuple(msgs)
    if "instruction" in rec and "output" in rec:
        instruction = _text(rec, "instruction", src, line)
        extra = rec.get("input") or ""
        if not isinstance(extra, str):
            raise DataError(src, line, "input", "must be a string")
        user = instruction if not extra.strip() else f"{instruction}\n\n{extra}"
        return (Message("user", user), Message("assistant", _text(rec, "output", src, line)))
    if "prompt" in rec and "completion" in rec:
        return (
            Message("user", _text(rec, "prompt", src, line)),
            Message("assistant", _text(rec, "completion", src, line)),
        )
    if "question" in rec and "rationale" in rec and "answer" in rec:  # FLAN v2 CoT
        question = _text(rec, "question", src, line)
        answer = _text(rec, "answer", src, line)
        rationale = _text(rec, "rationale", src, line)
        return (Message("user", question), Message("assistant", f"{rationale.strip()} So the answer is {answer.strip()}."))
    if "question" in rec and "answer" in rec:
        return (
            Message("user", _text(rec, "question", src, line)),
            Message("assistant", _text(rec, "answer", src, line)),
        )
    partial = {"instruction": "output", "output": "instruction", "prompt": "completion", "completion": "prompt",
               "question": "answer", "answer": "question"}
    for have, need in partial.items():
        if have in rec:
            raise DataError(src, line, need, f"missing (record has '{have}')")
    raise DataError(
        src, line, None,
        f"unknown record shape with fields {sorted(rec)}; expected 'messages', 'instruction'/'output', "
        "'prompt'/'completion', 'question'/'answer' or FLAN CoT 'question'/'answer'/'rationale'",
    )


def content_id(messages: Sequence[Message]) -> str:
    """Stable id from the normalised content: 16 hex digits of SHA-256."""
    canon = json.dumps([[m.role, m.content] for m in messages], ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canon.encode("utf-8")).hexdigest()[:16]


def load_examples(cfg: DataConfig | str) -> list[Example]:
    """Load and normalise every record of a data source. Ids that repeat are disambiguated with a
    ``~N`` suffix (``a``, ``a~2``, ``a~3``; never colliding with another id of the file) so ids stay
    unique and stable, and reported once, in one warning for the whole file."""
    if isinstance(cfg, str):
        cfg = DataConfig(path=cfg)
    if not cfg.path:
        raise DataError("<config>", None, "path", "no data path given")
    default_task = cfg.task or Path(cfg.path).stem
    examples: list[Example] = []
    line_of: dict[str, int] = {}  # every id given so far -> its line
    next_suffix: Counter[str] = Counter()
    repeats: dict[str, list[int]] = {}  # repeated id -> lines of every record that has it
    for line, rec in iter_records(cfg):
        if cfg.max_examples is not None and len(examples) >= cfg.max_examples:
            break
        messages = record_to_messages(rec, cfg.path, line)
        raw_id = rec.get("id")
        ex_id = str(raw_id) if raw_id not in (None, "") else content_id(messages)
        if ex_id in line_of:
            repeats.setdefault(ex_id, [line_of[ex_id]]).append(line)
            next_suffix[ex_id] = max(next_suffix[ex_id], 2)
            while f"{ex_id}~{next_suffix[ex_id]}" in line_of:
                next_suffix[ex_id] += 1
            ex_id = f"{ex_id}~{next_suffix[ex_id]}"
        line_of[ex_id] = line
        task = cfg.task or str(rec.get("task") or default_task)
        examples.append(Example(ex_id, messages, cfg.path, line, task, rec))
    if not examples:
        raise DataError(cfg.path, None, None, "no records")
    if repeats:
        shown = "; ".join(f"'{i}' at lines {', '.join(map(str, lines[:5]))}{', ...' if len(lines) > 5 else ''}"
                          for i, lines in list(repeats.items())[:3])
        logger.warning("%s: %d id(s) repeat (%d record(s) in all), e.g. %s; the repeats are kept as '<id>~2', '<id>~3', ... "
                       "(give every record its own id to avoid this)", cfg.path, len(repeats),
                       sum(map(len, repeats.values())), shown)
    return examples


# --------------------------------------------------------------------------------------------
# Rendering and tokenisation with the loss mask
# --------------------------------------------------------------------------------------------

Template = Literal["chat", "tulu"]


@dataclass
class TextFormat:
    """How examples become tokens, one block shared by every stage that renders text (warm-up,
    extract, train, subsets, select's rds/embed, airrep, lds) and by the pipeline, which feeds its
    ``text:`` section to all of them."""

    template: Template = "tulu"
    """Rendering: Tulu-v2 `<|user|>`/`<|assistant|>` markers, or the tokenizer's chat template."""
    max_length: int = 2048
    """Token limit per example (longer ones are truncated on the right; examples left without answer
    tokens are excluded)."""


def render(example: Example, tokenizer: Any, template: Template) -> tuple[str, list[tuple[int, int]]]:
    """Render to text; return it with the character spans that count in the loss (assistant
    contents, each followed by the end-of-sequence token where the template puts one)."""
    eos = getattr(tokenizer, "eos_token", None) or ""
    if template == "tulu":
        parts: list[str] = []
        spans: list[tuple[int, int]] = []
        pos = 0
        for m in example.messages:
            if m.role == "assistant":
                head = TULU_ASSISTANT
                parts.append(head)
                pos += len(head)
                body = m.content + eos
                spans.append((pos, pos + len(body)))
                parts.append(body + "\n")
                pos += len(body) + 1
            else:
                head = TULU_USER if m.role == "user" else TULU_SYSTEM
                chunk = f"{head}{m.content}\n"
                parts.append(chunk)
                pos += len(chunk)
        text = "".join(parts).rstrip("\n")
        return text, spans
    if template == "chat":
        if not getattr(tokenizer, "chat_template", None):
            raise DataError(example.source, example.line, "template", "tokenizer has no chat template; use template: tulu")
        return _render_chat(example, tokenizer)
    raise DataError(example.source, example.line, "template", f"unknown template '{template}'")


def _render_chat(example: Example, tokenizer: Any) -> tuple[str, list[tuple[int, int]]]:
    """Chat-template rendering. Each assistant span starts where the template's generation prompt
    for the preceding turns ends and reaches to the end of the conversation rendered up to that
    turn (so it takes in the end-of-turn token), found by rendering the prefixes of the
    conversation; content is never searched inside the template's own markup."""
    msgs = [{"role": m.role, "content": m.content} for m in example.messages]

    def chat(turns: list[dict[str, str]], generation_prompt: bool) -> str:
        if not turns:
            return ""
        return tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=generation_prompt)

    text = chat(msgs, False)
    spans: list[tuple[int, int]] = []
    pos = 0
    for i, m in enumerate(example.messages):
        if m.role != "assistant":
            continue
        head = chat(msgs[:i], True)
        if text.startswith(head):
            pos = max(pos, len(head))
        start = text.find(m.content, pos)
        content = m.content
        if start < 0:  # templates that trim the content
            content = m.content.strip()
            start = text.find(content, pos)
        if start < 0:
            raise DataError(example.source, example.line, f"messages[{i}].content",
                            "the chat template does not reproduce the assistant content")
        end = start + len(content)
        upto = chat(msgs[: i + 1], False)
        if text.startswith(upto) and len(upto) > end:
            end = len(upto)
        spans.append((start, end))
        pos = end
    return text, spans


def tokenize_example(example: Example, tokenizer: Any, template: Template, max_length: int) -> TokenizedExample:
    """Token ids and labels (IGNORE_INDEX outside assistant spans), truncated on the right."""
    text, spans = render(example, tokenizer, template)
    bos: str | None = getattr(tokenizer, "bos_token", None)
    has_bos = bos is not None and bos != "" and text.startswith(bos)  # chat templates that write the BOS themselves
    enc = tokenizer(text, add_special_tokens=not has_bos, return_offsets_mapping=True, truncation=False)
    ids: list[int] = list(enc["input_ids"])[:max_length]
    offsets = list(enc["offset_mapping"])[:max_length]
    labels = []
    for tok, (s, e) in zip(ids, offsets):
        inside = e > s and any(s < b and e > a for a, b in spans)
        labels.append(tok if inside else IGNORE_INDEX)
    return TokenizedExample(example.id, ids, labels)


@dataclass
class Exclusion:
    id: str
    source: str
    line: int
    reason: str


def tokenize_examples(
    examples: Sequence[Example], tokenizer: Any, template: Template = "tulu", max_length: int = 2048
) -> tuple[list[TokenizedExample], list[Exclusion]]:
    """Tokenise every example; examples left with no answer tokens after truncation are
    excluded and reported (they would otherwise give 0/0 = NaN losses downstream)."""
    kept: list[TokenizedExample] = []
    excluded: list[Exclusion] = []
    for ex in examples:
        tok = tokenize_example(ex, tokenizer, template, max_length)
        if tok.num_answer_tokens == 0:
            reason = f"no answer tokens left after truncation to max_length={max_length}"
            logger.warning("%s:%d: example '%s' excluded: %s", ex.source, ex.line, ex.id, reason)
            excluded.append(Exclusion(ex.id, ex.source, ex.line, reason))
            continue
        kept.append(tok)
    if excluded:
        logger.warning("%d of %d examples excluded (no answer tokens)", len(excluded), len(examples))
    return kept, excluded
