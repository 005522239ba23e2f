"""The bundled example dataset: coloured shapes, captions, questions and answers.

``python -m bagel_titan_plugins.data.example_data OUT_DIR`` (or ``bagel-titan-example-data``)
writes, deterministically:

- ``OUT_DIR/train.parquet``: understanding samples (an image and a question in the user turn,
  the answer in the assistant turn), text-to-image samples (a caption and the image) and
  text-only samples (a question and answer about colours), images embedded as PNG bytes in the
  HF ``{bytes, path}`` struct, several row groups;
- ``OUT_DIR/tokenizer/``: a tiny word-level tokenizer trained on the texts with `tokenizers`,
  loadable with ``AutoTokenizer.from_pretrained`` and holding the Qwen2 special tokens.

So the debug config trains with no download.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import tempfile
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

COLOURS = {
    "red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 80, 220), "yellow": (235, 210, 40),
    "purple": (140, 60, 190), "orange": (240, 140, 30), "white": (245, 245, 245), "black": (15, 15, 15),
}
SHAPES = ("circle", "square", "triangle")
SIZES = ("small", "large")
QWEN2_SPECIAL = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>")


@dataclass(frozen=True)
class Scene:
    """One image: a shape of one colour on a background of another."""

    shape: str
    colour: str
    background: str
    size: str
    cx: float
    cy: float

    def caption(self) -> str:
        return f"a {self.size} {self.colour} {self.shape} on a {self.background} background"


def random_scene(rng: random.Random) -> Scene:
    """A scene with a random shape, colours, size and position."""
    colour, background = rng.sample(sorted(COLOURS), 2)
    return Scene(rng.choice(SHAPES), colour, background, rng.choice(SIZES), rng.uniform(0.35, 0.65), rng.uniform(0.35, 0.65))


def render(scene: Scene, width: int, height: int) -> bytes:
    """PNG bytes of the scene."""
    image = Image.new("RGB", (width, height), COLOURS[scene.background])
    draw = ImageDraw.Draw(image)
    r = (0.32 if scene.size == "large" else 0.16) * min(width, height)
    cx, cy = scene.cx * width, scene.cy * height
    box = (cx - r, cy - r, cx + r, cy + r)
    fill = COLOURS[scene.colour]
    if scene.shape == "circle":
        draw.ellipse(box, fill=fill)
    elif scene.shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def _question(scene: Scene, rng: random.Random) -> tuple[str, str]:
    kind = rng.randrange(4)
    if kind == 0:
        return "what colour is the shape ?", f"the shape is {scene.colour} ."
    if kind == 1:
        return "what shape is in the image ?", f"it is a {scene.shape} ."
    if kind == 2:
        return "describe the image .", f"the image shows {scene.caption()} ."
    return "what colour is the background ?", f"the background is {scene.background} ."


def _text_only(rng: random.Random) -> dict:
    colour = rng.choice(sorted(COLOURS))
    shape = rng.choice(SHAPES)
    sides = {"circle": "no corners", "square": "four corners", "triangle": "three corners"}[shape]
    return {"messages": [
        {"role": "user", "content": [{"type": "text", "text": f"how many corners does a {colour} {shape} have ?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": f"a {shape} has {sides} , whatever its colour ."}]},
    ]}


def make_records(num_samples: int, seed: int, image_size: tuple[int, int]) -> list[dict]:
    """The records: about 60% understanding, 30% text-to-image, 10% text only."""
    rng = random.Random(seed)
    records = []
    for i in range(num_samples):
        u = rng.random()
        if u < 0.1:
            records.append(_text_only(rng))
            continue
        scene = random_scene(rng)
        w, h = image_size if rng.random() < 0.5 else (image_size[1], image_size[0])
        image = {"bytes": render(scene, w, h), "path": f"shape_{i:05d}.png"}
        if u < 0.7:
            question, answer = _question(scene, rng)
            records.append({"messages": [
                {"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": question}]},
                {"role": "assistant", "content": [{"type": "text", "text": answer}]},
            ]})
        else:
            records.append({"messages": [
                {"role": "user", "content": [{"type": "text", "text": scene.caption()}]},
                {"role": "assistant", "content": [{"type": "image", "image": image}]},
            ]})
    return records


def _texts(records: list[dict]) -> list[str]:
    return [item["text"] for r in records for m in r["messages"] for item in m["content"] if item["type"] == "text"]


def build_tokenizer(texts: list[str], out_dir: str) -> None:
    """A word-level tokenizer over the example texts, saved for `AutoTokenizer`."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.WordLevel(unk_token="<|endoftext|>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(special_tokens=list(QWEN2_SPECIAL), min_frequency=1)
    # Every word of the generator's vocabulary, so any generated sentence tokenises without <unk>.
    vocabulary = " ".join([*COLOURS, *SHAPES, *SIZES, "a", "an", "the", "on", "of", "is", "it", "in",
                           "what", "how", "many", "does", "have", "has", "no", "three", "four",
                           "corners", "whatever", "its", "colour", "shape", "image", "shows",
                           "background", "describe", "?", ".", ","])
    tokenizer.train_from_iterator([vocabulary, *texts], trainer=trainer)
    os.makedirs(out_dir, exist_ok=True)
    tokenizer.save(os.path.join(out_dir, "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "additional_special_tokens": list(QWEN2_SPECIAL[1:]),
        "model_max_length": 32768,
    }
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=1)
    with open(os.path.join(out_dir, "special_tokens_map.json"), "w") as f:
        json.dump({k: config[k] for k in ("eos_token", "pad_token", "unk_token", "additional_special_tokens")}, f, indent=1)


def write_example_data(out_dir: str, num_samples: int = 512, seed: int = 0,
                       image_size: tuple[int, int] = (64, 48), row_group_size: int = 64) -> dict[str, str]:
    """Write the dataset and tokenizer into `out_dir`; returns their paths."""
    os.makedirs(out_dir, exist_ok=True)
    records = make_records(num_samples, seed, image_size)
    content = pa.list_(pa.struct([
        ("type", pa.string()), ("text", pa.string()),
        ("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
    ]))
    schema = pa.schema([("messages", pa.list_(pa.struct([("role", pa.string()), ("content", content)])))])
    table = pa.Table.from_pylist(records, schema=schema)
    data_path = os.path.join(out_dir, "train.parquet")
    pq.write_table(table, data_path, row_group_size=row_group_size)
    tokenizer_path = os.path.join(out_dir, "tokenizer")
    build_tokenizer(_texts(records), tokenizer_path)
    return {"data": data_path, "tokenizer": tokenizer_path}


def ensure_example_data(out_dir: str, **kwargs) -> dict[str, str]:
    """The example data in `out_dir`, written on first use. Safe when several ranks call it at
    once: each writes a private folder and renames it into place; the first rename wins."""
    paths = {"data": os.path.join(out_dir, "train.parquet"), "tokenizer": os.path.join(out_dir, "tokenizer")}
    if os.path.isfile(paths["data"]) and os.path.isfile(os.path.join(paths["tokenizer"], "tokenizer.json")):
        return paths
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=parent, prefix=".example_data.") as tmp:
        write_example_data(os.path.join(tmp, "data"), **kwargs)
        try:
            os.rename(os.path.join(tmp, "data"), out_dir)
        except OSError:
            if not os.path.isfile(paths["data"]):  # lost the race to an incomplete folder: a real error
                raise
    return paths


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir")
    parser.add_argument("--num-samples", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image-size", type=int, nargs=2, default=(64, 48), metavar=("W", "H"))
    args = parser.parse_args(argv)
    paths = write_example_data(args.out_dir, args.num_samples, args.seed, tuple(args.image_size))
    print(f"wrote {paths['data']} and {paths['tokenizer']}")


if __name__ == "__main__":
    main()
