"""LLaVA-style conversations (json lists and jsonl) -> the processor's messages format.

A record::

    {"id": "...", "image": "coco/0001.jpg",            # or a list of paths, or absent (text only)
     "conversations": [{"from": "human", "value": "<image>\\nWhat is shown?"},
                       {"from": "gpt", "value": "A cat."}]}

becomes ``{"messages": [{"role": "user", "content": [image_url item, text item]},
{"role": "assistant", "content": "A cat."}]}``. Each ``<image>`` placeholder of a human turn is
replaced by the next image, in order; when no turn has a placeholder, the images go in front of
the first human turn (LLaVA's convention). Image paths resolve against the dataset's
``data_folder``. Roles: human/user -> user, gpt/assistant -> assistant, system -> system.

Bad records are counted, never fatal: a line or list entry that does not parse (``bad_json``), a
record without conversations (``empty_messages``), an unknown role, a placeholder outside a human
turn or a placeholder count that differs from the image count (``unknown_content``), a video
record (``unsupported_video``: the BAGEL processor takes no video).

A ``.json`` file (one list of records, LLaVA's usual layout, often ~1 GB) is streamed element by
element, never loaded whole. Record i of the concatenated files belongs to shard i % num_shards.
"""

from __future__ import annotations

import json
from typing import Any, Iterator, Sequence

from bagel_titan.protocols import DatasetReader, RawSample, ReadPass

from ..bad_samples import as_bad_record, bad_record
from .base import list_files

IMAGE_PLACEHOLDER = "<image>"
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}

_CHUNK_CHARS = 1 << 20
_MAX_RECORD_CHARS = 64 << 20
_WHITESPACE = " \t\r\n"


class JsonArrayError(ValueError):
    """A JSON list file that stops parsing part way (the elements before it were good)."""


class NotAJsonListError(JsonArrayError):
    """A file that does not start with a JSON list at all (a config error, not a bad record)."""


def iter_json_array(file: str, chunk_chars: int = _CHUNK_CHARS) -> Iterator[Any]:
    """The elements of the top-level JSON list in `file`, decoded one at a time.

    Memory holds one chunk plus the element being decoded. Raises `JsonArrayError` where the file
    stops being a JSON list (already yielded elements stay valid).
    """
    decoder = json.JSONDecoder()
    with open(file, encoding="utf-8", errors="replace") as f:
        buf, pos, consumed, eof = "", 0, 0, False

        def fill(need_more: bool) -> bool:
            """Drop the consumed text; read another chunk when `need_more`. False at EOF."""
            nonlocal buf, pos, consumed, eof
            consumed += pos
            buf, pos = buf[pos:], 0
            if not need_more or eof:
                return False
            more = f.read(chunk_chars)
            eof = not more
            buf += more
            return bool(more)

        def skip_ws() -> bool:
            """Advance to the next non-space character; False at the end of the file."""
            nonlocal pos
            while True:
                while pos < len(buf) and buf[pos] in _WHITESPACE:
                    pos += 1
                if pos < len(buf) or not fill(True):
                    return pos < len(buf)

        def fail(message: str) -> JsonArrayError:
            return JsonArrayError(f"{file}: {message} at character {consumed + pos}")

        if not skip_ws() or buf[pos] != "[":
            raise NotAJsonListError(
                f"{file} does not hold a JSON list (it starts with "
                f"{buf[pos : pos + 20]!r}); a .json dataset is one list of records, "
                f"use .jsonl for one record per line"
            )
        pos += 1
        if skip_ws() and buf[pos] == "]":
            return
        while True:
            if not skip_ws():
                raise fail("unexpected end of file inside the list")
            while True:
                try:
                    element, end = decoder.raw_decode(buf, pos)
                except json.JSONDecodeError as exc:
                    if len(buf) - pos > _MAX_RECORD_CHARS or not fill(True):
                        raise fail(f"invalid JSON ({exc.msg})") from None
                    continue
                if end == len(buf) and fill(True):  # a number may continue in the next chunk
                    continue
                break
            pos = end
            yield element
            if not skip_ws():
                raise fail("unexpected end of file after an element")
            if buf[pos] == "]":
                return
            if buf[pos] != ",":
                raise fail(f"expected ',' or ']' but found {buf[pos]!r}")
            pos += 1


def _images_of(record: dict[str, Any]) -> list[Any] | None:
    images = record.get("image", record.get("images"))
    if images is None:
        return []
    if isinstance(images, (str, dict, bytes)):
        return [images]
    return list(images) if isinstance(images, list) else None


def llava_to_messages(conversations: Any, images: Sequence[Any], where: str) -> dict[str, Any]:
    """`{"messages": [...]}` for one LLaVA conversation with its `images` (paths, bytes or
    `{bytes, path}` structs), or a `bad_record(...)` saying why it cannot be one."""
    if not isinstance(conversations, list) or not conversations:
        return bad_record("empty_messages", f"{where}: `conversations` is empty or missing")
    turns: list[tuple[str, str]] = []
    for turn in conversations:
        speaker = turn.get("from", turn.get("role")) if isinstance(turn, dict) else None
        text = turn.get("value", turn.get("content")) if isinstance(turn, dict) else None
        if speaker not in ROLES or not isinstance(text, str):
            return bad_record(
                "unknown_content",
                f"{where}: turn {turn!r:.120} needs `from` in {sorted(ROLES)} and a string `value`",
            )
        turns.append((ROLES[speaker], text))
    placeholders = sum(text.count(IMAGE_PLACEHOLDER) for _, text in turns)
    if any(role != "user" and IMAGE_PLACEHOLDER in text for role, text in turns):
        return bad_record(
            "unknown_content", f"{where}: an {IMAGE_PLACEHOLDER} placeholder outside a human turn"
        )
    if placeholders and placeholders != len(images):
        return bad_record(
            "unknown_content",
            f"{where}: {placeholders} {IMAGE_PLACEHOLDER} placeholder(s) but {len(images)} image(s)",
        )
    pending = list(images)
    messages = []
    for role, text in turns:
        content: list[dict[str, Any]] = []
        if not placeholders and role == "user" and pending:
            content += [{"type": "image_url", "image_url": {"url": image}} for image in pending]
            pending = []
        for i, piece in enumerate(text.split(IMAGE_PLACEHOLDER)):
            if i > 0:
                content.append({"type": "image_url", "image_url": {"url": pending.pop(0)}})
            if piece.strip():
                content.append({"type": "text", "text": piece.strip()})
        messages.append({"role": role, "content": content})
    if pending:
        return bad_record(
            "unknown_content", f"{where}: {len(images)} image(s) but no human turn to hold them"
        )
    return {"messages": messages}


def llava_record(record: Any, where: str) -> dict[str, Any]:
    """The processor record of one parsed LLaVA record (or a bad record)."""
    if not isinstance(record, dict):
        return bad_record("bad_json", f"{where}: expected a JSON object, got {type(record).__name__}")
    if record.get("video") is not None:
        return bad_record(
            "unsupported_video", f"{where}: a video record; the BAGEL processor takes images only"
        )
    images = _images_of(record)
    if images is None:
        return bad_record("unknown_content", f"{where}: `image` must be a path or a list of paths")
    return llava_to_messages(record.get("conversations"), images, where)


class LlavaReader(DatasetReader):
    """`format = "llava"`: LLaVA conversation files, `.json` lists and `.jsonl` (or a folder of them)."""

    format = "llava"
    extensions: tuple[str, ...] = ()  # .json / .jsonl stay with the plain json readers; select by `format`

    @staticmethod
    def _records(file: str) -> Iterator[tuple[str, Any]]:
        """(where, parsed record or a bad record) for each record of one file, in order."""
        if file.endswith(".jsonl"):
            with open(file, encoding="utf-8", errors="replace") as f:
                for line_no, line in enumerate(f, start=1):
                    if line.strip():
                        yield f"{file}:{line_no}", line
            return
        count = 0
        try:
            for count, element in enumerate(iter_json_array(file), start=1):
                yield f"{file}[{count - 1}]", element
        except NotAJsonListError:
            raise
        except JsonArrayError as exc:  # the rest of the file is lost: one counted bad record
            yield f"{file}[{count}]", bad_record("bad_json", f"{exc}; the rest of this file is skipped")

    def iter_samples(
        self, path: str, *, shard_index: int, num_shards: int, start: int, read_pass: ReadPass = ReadPass()
    ) -> Iterator[RawSample]:
        """Records of one shard, converted; only this shard's jsonl lines are parsed."""
        index = 0
        owned = 0
        for file in list_files(path, (".json", ".jsonl"), "llava"):
            for where, raw in self._records(file):
                if index % num_shards == shard_index:
                    if owned >= start:
                        if isinstance(raw, str):
                            try:
                                raw = json.loads(raw)
                            except json.JSONDecodeError as exc:
                                raw = bad_record("bad_json", f"{where}: {exc}")
                        bad = isinstance(raw, dict) and as_bad_record(raw) is not None
                        yield RawSample(path, index, raw if bad else llava_record(raw, where))
                    owned += 1
                index += 1
