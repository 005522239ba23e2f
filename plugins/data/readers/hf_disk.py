"""HF `datasets` folders written by `Dataset.save_to_disk`, read by their declared features.

The `arrow` reader already streams such a folder (its `state.json` names the arrow files, an
`Image` column arrives as the `{bytes, path}` struct the processor decodes), but it hands rows
over as they are, so they must already be in a processor form. This reader reads
`dataset_info.json` to find the `Image` columns (and lists of images) and maps the common row
layouts onto the processor's forms, chosen once per dataset from its features:

- a ``messages`` column: passed through (the messages format);
- a ``conversations`` column (LLaVA-style ``from``/``value`` turns): converted as the `llava`
  reader does, the images taken from the image column(s) in column order;
- one image column and a ``caption`` / ``text`` / ``prompt`` column: text-to-image;
- a ``text`` column and no image: text only.

Any other layout is a configuration error at start naming the columns. Streaming, sharding and
resume are the arrow reader's (record batches, memory mapped).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Iterator

from bagel_titan.protocols import DatasetReader, RawSample, ReadPass

from ..bad_samples import as_bad_record, bad_record
from .arrow import ArrowReader
from .llava import llava_to_messages

CAPTION_COLUMNS = ("caption", "text", "prompt")
_LIST_TYPES = ("Sequence", "List", "LargeList")


def _is_image(feature: Any) -> bool:
    return isinstance(feature, dict) and feature.get("_type") == "Image"


def _is_image_list(feature: Any) -> bool:
    if isinstance(feature, list):  # the `[Image()]` shorthand
        return len(feature) == 1 and _is_image(feature[0])
    return (
        isinstance(feature, dict)
        and feature.get("_type") in _LIST_TYPES
        and _is_image(feature.get("feature"))
    )


def read_features(path: str) -> dict[str, Any]:
    """The `features` mapping of a save_to_disk folder (column name -> HF feature JSON)."""
    if os.path.isfile(os.path.join(path, "dataset_dict.json")):
        with open(os.path.join(path, "dataset_dict.json")) as f:
            splits = json.load(f).get("splits", [])
        raise ValueError(
            f"hf_disk dataset {path!r} is a DatasetDict (splits {splits}); point `path` at one "
            f"split folder, e.g. {os.path.join(path, splits[0] if splits else 'train')!r}"
        )
    info = os.path.join(path, "dataset_info.json")
    if (
        not os.path.isdir(path)
        or not os.path.isfile(info)
        or not os.path.isfile(os.path.join(path, "state.json"))
    ):
        raise FileNotFoundError(
            f"hf_disk dataset {path!r} is not a `save_to_disk` folder (it needs "
            f'dataset_info.json and state.json); use format = "arrow" for plain .arrow files'
        )
    with open(info) as f:
        features = json.load(f).get("features")
    if not isinstance(features, dict) or not features:
        raise ValueError(f"{info} declares no `features`; re-save the dataset with `save_to_disk`")
    return features


@dataclass(frozen=True)
class RowForm:
    """How one dataset's rows become processor records (chosen from its features)."""

    kind: str
    """"messages", "conversations", "text_to_image" or "text"."""
    image_columns: tuple[str, ...] = ()
    caption_column: str = ""

    @staticmethod
    def from_features(features: dict[str, Any], where: str) -> "RowForm":
        images = tuple(
            name for name, feature in features.items() if _is_image(feature) or _is_image_list(feature)
        )
        if "messages" in features:
            return RowForm("messages")
        if "conversations" in features:
            return RowForm("conversations", images)
        caption = next((c for c in CAPTION_COLUMNS if c in features), "")
        if len(images) == 1 and caption and _is_image(features[images[0]]):
            return RowForm("text_to_image", images, caption)
        if not images and "text" in features:
            return RowForm("text")
        raise ValueError(
            f"hf_disk dataset {where!r} has columns {sorted(features)} (image columns: {list(images)}); "
            f"supported layouts: `messages`; `conversations` (+ image columns); one Image column + one of "
            f"{list(CAPTION_COLUMNS)}; `text` alone. Rename the columns (Dataset.rename_column) and re-save"
        )

    def convert(self, row: dict[str, Any], where: str) -> dict[str, Any]:
        if self.kind == "messages":
            return {"messages": row["messages"]}
        if self.kind == "text":
            return {"text": row["text"]}
        if self.kind == "text_to_image":
            image = row[self.image_columns[0]]
            if image is None:
                return bad_record("image_missing", f"{where}: `{self.image_columns[0]}` is null")
            return {"caption": row[self.caption_column], "image": image}
        images: list[Any] = []
        for column in self.image_columns:
            value = row[column]
            images.extend(value if isinstance(value, list) else [] if value is None else [value])
        return llava_to_messages(row["conversations"], images, where)


class HFDiskReader(DatasetReader):
    """`format = "hf_disk"`: a `save_to_disk` folder (one split), rows mapped by their features."""

    format = "hf_disk"
    extensions: tuple[str, ...] = ()  # a folder has no extension; select by `format`

    def __init__(self) -> None:
        self._arrow = ArrowReader()

    def iter_samples(
        self, path: str, *, shard_index: int, num_shards: int, start: int, read_pass: ReadPass = ReadPass()
    ) -> Iterator[RawSample]:
        """The converted rows of one shard (record batches as the arrow reader streams them)."""
        form = RowForm.from_features(read_features(path), path)
        for sample in self._arrow.iter_samples(
            path, shard_index=shard_index, num_shards=num_shards, start=start, read_pass=read_pass
        ):
            if as_bad_record(sample.data) is None:
                sample.data = form.convert(sample.data, f"{path}[{sample.index}]")
            yield sample
