"""Readers for the BAGEL release's parquet layouts: text-to-image shards and editing chains.

``bagel_t2i``: column ``image`` (encoded image bytes) and ``captions`` (a JSON object of named
captions, e.g. ``{"short": ..., "long": ...}``). Each row becomes the processor's text-to-image
form ``{"caption", "image"}`` with one usable caption picked at random. Unlike the release (which
trains on an empty caption then), a row without a usable caption is skipped and counted
(``no_caption``).

``bagel_edit``: column ``image_list`` (the encoded images of one editing chain) and
``instruction_list`` (for step i -> i+1, a list of alternative instructions). Each row becomes a
chat in the messages format, built as the release's ``UnifiedEditIterableDataset.parse_row``
does: a random start image and a random end one or two steps later; the start image in a user
turn (a clean VAE condition and a ViT input), the instruction(s) as user text, the target image
in an assistant turn (generated). With two steps, half of the time the instructions are joined
into one ("a. b.") and only the final image is generated; otherwise the intermediate image is
generated too and then conditions the next step (as the release's ``need_loss + need_vae +
need_vit`` image).

Both stream one row group at a time and read only their two columns; sharding and resume are the
parquet reader's (whole row groups per shard when there are enough, `start` skipped by metadata).
The random choices are drawn from (seed, epoch, the row's stable index): a row becomes a different
sample in each epoch, and the same one whenever the same read is repeated (exact resume of a
packing buffer).
"""

from __future__ import annotations

import json
import random
from abc import ABC, abstractmethod
from typing import Any, Iterator, Sequence

import pyarrow.parquet as pq

from bagel_titan.protocols import DatasetReader, RawSample, ReadPass

from ..bad_samples import as_bad_record, bad_record
from .base import Unit, iter_units, list_files


def _image_item(source: Any) -> dict[str, Any]:
    """A messages-format content item holding an embedded image (bytes or a `{bytes, path}` struct)."""
    return {"type": "image", "image": source}


def _text_item(text: str) -> dict[str, Any]:
    return {"type": "text", "text": text}


def _usable_texts(values: Any) -> list[str]:
    return [v for v in values if isinstance(v, str) and v.strip()] if isinstance(values, list) else []


class ReleaseParquetReader(DatasetReader, ABC):
    """Shared by the release readers: parquet row groups, only `columns` decoded, each row
    converted by `convert(row, rng)`; a row that cannot be converted is a counted bad record."""

    format = ""
    extensions: tuple[str, ...] = ()  # plain .parquet belongs to the `parquet` reader; select by `format`
    columns: tuple[str, ...] = ()

    def units(self, path: str) -> list[Unit]:
        """Row groups of every file, after checking each file has the layout's columns."""
        units: list[Unit] = []
        first = 0
        for file in list_files(path, (".parquet",), self.format):
            parquet = pq.ParquetFile(file)
            missing = [c for c in self.columns if c not in parquet.schema_arrow.names]
            if missing:
                raise ValueError(
                    f"{self.format} dataset file {file!r} has no column(s) {missing} (it has "
                    f"{parquet.schema_arrow.names}); a {self.format} shard needs {list(self.columns)}. "
                    f"Fix `format` in its [[data.datasets]] entry"
                )
            for g in range(parquet.metadata.num_row_groups):
                n = parquet.metadata.row_group(g).num_rows
                units.append(Unit(file, g, n, first))
                first += n
        return units

    def _load(self, unit: Unit) -> list[dict[str, Any]]:
        return pq.ParquetFile(unit.file).read_row_group(unit.part, columns=list(self.columns)).to_pylist()

    @abstractmethod
    def convert(self, row: dict[str, Any], rng: random.Random, where: str) -> dict[str, Any]:
        """The processor record of one row, or `bad_record(...)`."""

    def iter_samples(
        self, path: str, *, shard_index: int, num_shards: int, start: int, read_pass: ReadPass = ReadPass()
    ) -> Iterator[RawSample]:
        """The converted rows of one shard (see the module docstring)."""
        for sample in iter_units(
            self.units(path),
            self._load,
            dataset=path,
            shard_index=shard_index,
            num_shards=num_shards,
            start=start,
            read_pass=read_pass,
        ):
            if as_bad_record(sample.data) is None:
                rng = read_pass.rng(self.format, sample.index)
                sample.data = self.convert(sample.data, rng, f"{path}[{sample.index}]")
            yield sample


class BagelT2IReader(ReleaseParquetReader):
    """`format = "bagel_t2i"`: the release's text-to-image shards (`image`, `captions`)."""

    format = "bagel_t2i"
    columns = ("image", "captions")

    def convert(self, row: dict[str, Any], rng: random.Random, where: str) -> dict[str, Any]:
        raw = row["captions"]
        if isinstance(raw, (str, bytes)):
            try:
                raw = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                return bad_record("bad_json", f"{where}: `captions` is not JSON: {exc}")
        if isinstance(raw, list) and all(isinstance(p, (list, tuple)) and len(p) == 2 for p in raw):
            raw = dict(raw)  # a parquet map column reads as (key, value) pairs
        if not isinstance(raw, dict):
            return bad_record(
                "bad_json",
                f"{where}: `captions` must be a JSON object of named captions, got {type(raw).__name__}",
            )
        captions = _usable_texts(list(raw.values()))
        if not captions:
            return bad_record("no_caption", f"{where}: no non-empty caption in {sorted(raw)}")
        if row["image"] is None:
            return bad_record("image_missing", f"{where}: `image` is null")
        return {"caption": rng.choice(captions), "image": row["image"]}


def _instructions(raw: Any) -> list[Any] | None:
    if isinstance(raw, (str, bytes)):
        try:
            raw = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            return None
    return raw if isinstance(raw, list) else None


def edit_messages(
    images: Sequence[Any], instructions: Sequence[list[str]], rng: random.Random
) -> list[dict[str, Any]]:
    """The chat of one editing sample, drawn as the release's edit dataset draws it.

    `images[i]` is step i of the chain; `instructions[i]` the usable alternatives for i -> i+1.
    """
    n = len(images)
    start = rng.choice(range(n - 1))
    end = rng.choice(range(start + 1, min(start + 3, n)))
    user: list[dict[str, Any]] = [_image_item(images[start])]
    messages: list[dict[str, Any]] = [{"role": "user", "content": user}]
    if end - start > 1 and rng.random() < 0.5:  # one joined instruction, only the last image generated
        if end == n - 1:
            end -= 1  # as the release does
        joined = "".join(rng.choice(instructions[i - 1]) + ". " for i in range(start + 1, end + 1))
        user.append(_text_item(joined.rstrip()))
        messages.append({"role": "assistant", "content": [_image_item(images[end])]})
        return messages
    for i in range(start + 1, end + 1):
        user.append(_text_item(rng.choice(instructions[i - 1])))
        messages.append({"role": "assistant", "content": [_image_item(images[i])]})
        if i != end:  # the generated intermediate image conditions the next step
            user = [_image_item(images[i])]
            messages.append({"role": "user", "content": user})
    return messages


class BagelEditReader(ReleaseParquetReader):
    """`format = "bagel_edit"`: the release's editing shards (`image_list`, `instruction_list`)."""

    format = "bagel_edit"
    columns = ("image_list", "instruction_list")

    def convert(self, row: dict[str, Any], rng: random.Random, where: str) -> dict[str, Any]:
        images = row["image_list"]
        steps = _instructions(row["instruction_list"])
        if not isinstance(images, list) or len(images) < 2:
            return bad_record(
                "bad_edit_chain",
                f"{where}: `image_list` needs at least 2 images, got "
                f"{len(images) if isinstance(images, list) else type(images).__name__}",
            )
        if any(image is None for image in images):
            return bad_record("image_missing", f"{where}: `image_list` holds a null image")
        if steps is None or len(steps) < len(images) - 1:
            return bad_record(
                "bad_edit_chain",
                f"{where}: `instruction_list` needs one list of instructions per "
                f"step ({len(images) - 1}), got {steps if steps is None else len(steps)}",
            )
        usable = [_usable_texts(step) if isinstance(step, list) else _usable_texts([step]) for step in steps]
        empty = [i for i, step in enumerate(usable[: len(images) - 1]) if not step]
        if empty:
            return bad_record("bad_edit_chain", f"{where}: no usable instruction for step(s) {empty}")
        return {"messages": edit_messages(images, usable, rng)}
