"""The bundled example dataset: coloured shapes, captions, questions and answers.

``python -m bagel_titan_plugins.data.example_data OUT_DIR`` (or ``bagel-titan-example-data``)
writes, deterministically:

- ``OUT_DIR/train.parquet``: understanding samples (an image and a question in the user turn,
  the answer in the assistant turn), text-to-image samples (a caption and the image) and
  text-only samples (a question and answer about colours), images embedded as PNG bytes in the
  HF ``{bytes, path}`` struct, several row groups;
- ``OUT_DIR/tokenizer/``: a tiny word-level tokenizer trained on the texts with `tokenizers`,
  loadable with ``AutoTokenizer.from_pretrained`` and holding the Qwen2 special tokens;
- ``OUT_DIR/samples/``: the images of `QUESTION_SCENES` (``red_circle.png``, ...) that the
  debug config's sampling questions ask about;
- ``OUT_DIR/ae.safetensors`` (with ``--vae``, or ``vae_fit={}``): the debug flavor's VAE fitted
  to the dataset's images, in FLUX's key layout, for ``[bagel] vae_path`` (a random VAE's latents
  carry no picture, so generated samples could never show one). The fit belongs to the bagel
  plugin (`bagel_titan_plugins.bagel.vae_fit`), which imports this module; this module runs it as
  a command (`VAE_FIT_COMMAND`) instead of importing it, so the data plugin never imports the
  model plugin.

So the debug config trains with no download.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from typing import Any, Mapping

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

# Six well separated colours, three shapes, two sizes: 180 kinds of scene, few enough for the
# tiny debug model to learn every combination in a few minutes of CPU. Both sizes are large (a
# small shape is 19 px wide at 32 px, a large one 24 px): a triangle of a few pixels is hard to
# see, to draw and to check.
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 210, 40),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}
SHAPES = ("circle", "square", "triangle")
SIZES = ("small", "large")
SHAPE_RADIUS = {"small": 0.30, "large": 0.38}
"""Half the shape's width (a circle's radius) as a fraction of the image's shorter side."""
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


QUESTION_SCENES = {
    "red_circle": Scene("circle", "red", "white", "large", 0.5, 0.5),
    "blue_square": Scene("square", "blue", "yellow", "large", 0.5, 0.5),
    "green_triangle": Scene("triangle", "green", "black", "small", 0.5, 0.5),
}
"""Fixed images written to ``OUT_DIR/samples/<name>.png`` for the sampling questions."""


def random_scene(rng: random.Random) -> Scene:
    """A scene with a random shape, colours, size and position."""
    colour, background = rng.sample(sorted(COLOURS), 2)
    return Scene(
        rng.choice(SHAPES),
        colour,
        background,
        rng.choice(SIZES),
        rng.uniform(0.45, 0.55),
        rng.uniform(0.45, 0.55),
    )


def render(scene: Scene, width: int, height: int) -> bytes:
    """PNG bytes of the scene."""
    image = Image.new("RGB", (width, height), COLOURS[scene.background])
    draw = ImageDraw.Draw(image)
    r = SHAPE_RADIUS[scene.size] * min(width, height)
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


QUESTION_WEIGHTS = {"shape": 0.55, "colour": 0.15, "background": 0.15, "describe": 0.15}
"""How often each question kind is asked: the shape most, since colours are learnt much sooner."""


def _question(scene: Scene, rng: random.Random) -> tuple[str, str]:
    kind = rng.choices(list(QUESTION_WEIGHTS), weights=list(QUESTION_WEIGHTS.values()))[0]
    if kind == "colour":
        return "what colour is the shape ?", f"the shape is {scene.colour} ."
    if kind == "shape":
        return "what shape is in the image ?", f"it is a {scene.shape} ."
    if kind == "describe":
        return "describe the image .", f"the image shows {scene.caption()} ."
    return "what colour is the background ?", f"the background is {scene.background} ."


def _text_only(rng: random.Random) -> dict:
    colour = rng.choice(sorted(COLOURS))
    shape = rng.choice(SHAPES)
    sides = {"circle": "no corners", "square": "four corners", "triangle": "three corners"}[shape]
    return {
        "messages": [
            {
                "role": "user",
                "content": [{"type": "text", "text": f"how many corners does a {colour} {shape} have ?"}],
            },
            {
                "role": "assistant",
                "content": [{"type": "text", "text": f"a {shape} has {sides} , whatever its colour ."}],
            },
        ]
    }


def make_records(num_samples: int, seed: int, image_size: tuple[int, int]) -> list[dict]:
    """The records: about 45% understanding, 50% text-to-image, 5% text only (drawing the shapes
    is learnt last, so it gets the most samples)."""
    rng = random.Random(seed)
    records = []
    for i in range(num_samples):
        u = rng.random()
        if u < 0.05:
            records.append(_text_only(rng))
            continue
        scene = random_scene(rng)
        w, h = image_size if rng.random() < 0.5 else (image_size[1], image_size[0])
        image = {"bytes": render(scene, w, h), "path": f"shape_{i:05d}.png"}
        if u < 0.5:
            question, answer = _question(scene, rng)
            records.append(
                {
                    "messages": [
                        {
                            "role": "user",
                            "content": [
                                {"type": "image", "image": image},
                                {"type": "text", "text": question},
                            ],
                        },
                        {"role": "assistant", "content": [{"type": "text", "text": answer}]},
                    ]
                }
            )
        else:
            records.append(
                {
                    "messages": [
                        {"role": "user", "content": [{"type": "text", "text": scene.caption()}]},
                        {"role": "assistant", "content": [{"type": "image", "image": image}]},
                    ]
                }
            )
    return records


def _texts(records: list[dict]) -> list[str]:
    return [
        item["text"]
        for r in records
        for m in r["messages"]
        for item in m["content"]
        if item["type"] == "text"
    ]


def build_tokenizer(texts: list[str], out_dir: str) -> None:
    """A word-level tokenizer over the example texts, saved for `AutoTokenizer`."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.WordLevel(unk_token="<|endoftext|>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(special_tokens=list(QWEN2_SPECIAL), min_frequency=1)
    # Every word of the generator's vocabulary, so any generated sentence tokenises without <unk>.
    vocabulary = " ".join(
        [
            *COLOURS,
            *SHAPES,
            *SIZES,
            "a",
            "an",
            "the",
            "on",
            "of",
            "is",
            "it",
            "in",
            "what",
            "how",
            "many",
            "does",
            "have",
            "has",
            "no",
            "three",
            "four",
            "corners",
            "whatever",
            "its",
            "colour",
            "shape",
            "image",
            "shows",
            "background",
            "describe",
            "?",
            ".",
            ",",
        ]
    )
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
        json.dump(
            {k: config[k] for k in ("eos_token", "pad_token", "unk_token", "additional_special_tokens")},
            f,
            indent=1,
        )


def write_question_images(out_dir: str, image_size: tuple[int, int]) -> str:
    """`QUESTION_SCENES` as ``out_dir/<name>.png`` of `image_size` (W, H); returns `out_dir`."""
    os.makedirs(out_dir, exist_ok=True)
    for name, scene in QUESTION_SCENES.items():
        with open(os.path.join(out_dir, f"{name}.png"), "wb") as f:
            f.write(render(scene, *image_size))
    return out_dir


def record_images(records: list[dict]) -> list[bytes]:
    """The PNG bytes of every image in `records` (what the debug VAE is fitted to)."""
    return [
        item["image"]["bytes"]
        for r in records
        for m in r["messages"]
        for item in m["content"]
        if item["type"] == "image"
    ]


VAE_FIT_COMMAND = (sys.executable, "-m", "bagel_titan_plugins.bagel.vae_fit")
"""The bagel plugin's command that fits the debug VAE to ``DATA_DIR/train.parquet``'s images and
writes ``DATA_DIR/ae.safetensors`` (``--fit JSON``: `VAEFitConfig` fields to change)."""


def fit_vae_command(data_dir: str, fit: Mapping[str, Any]) -> None:
    """Run `VAE_FIT_COMMAND` on `data_dir` with the `VAEFitConfig` overrides `fit` ({}: defaults)."""
    subprocess.run([*VAE_FIT_COMMAND, data_dir, "--fit", json.dumps(dict(fit))], check=True)


DEFAULT_NUM_SAMPLES = 8000
"""Enough distinct scenes that the debug run (about 12 samples a step) sees most of them about
once: with a few hundred it memorises them and answers shapes of new images at chance."""
DEFAULT_IMAGE_SIZE = (32, 32)
"""(W, H) of the example images: 64 generation tokens each, small enough for CPU training."""


def write_example_data(
    out_dir: str,
    num_samples: int = DEFAULT_NUM_SAMPLES,
    seed: int = 0,
    image_size: tuple[int, int] = DEFAULT_IMAGE_SIZE,
    row_group_size: int = 64,
    vae_fit: Mapping[str, Any] | None = None,
) -> dict[str, str]:
    """Write the dataset, tokenizer and question images into `out_dir`, and with `vae_fit` (the
    bagel plugin's `VAEFitConfig` fields to change, {} for none) the fitted debug VAE (tens of
    seconds of CPU, hence opt-in here); returns their paths."""
    os.makedirs(out_dir, exist_ok=True)
    records = make_records(num_samples, seed, image_size)
    content = pa.list_(
        pa.struct(
            [
                ("type", pa.string()),
                ("text", pa.string()),
                ("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
            ]
        )
    )
    schema = pa.schema([("messages", pa.list_(pa.struct([("role", pa.string()), ("content", content)])))])
    table = pa.Table.from_pylist(records, schema=schema)
    data_path = os.path.join(out_dir, "train.parquet")
    pq.write_table(table, data_path, row_group_size=row_group_size)
    paths = example_paths(out_dir, with_vae=vae_fit is not None)
    build_tokenizer(_texts(records), paths["tokenizer"])
    write_question_images(paths["samples"], image_size)
    if vae_fit is not None:
        fit_vae_command(out_dir, vae_fit)
    return paths


def example_paths(out_dir: str, with_vae: bool) -> dict[str, str]:
    """Where `write_example_data` puts each part (``vae`` only `with_vae`)."""
    paths = {
        "data": os.path.join(out_dir, "train.parquet"),
        "tokenizer": os.path.join(out_dir, "tokenizer"),
        "samples": os.path.join(out_dir, "samples"),
    }
    if with_vae:
        paths["vae"] = os.path.join(out_dir, "ae.safetensors")
    return paths


def _complete(paths: dict[str, str]) -> bool:
    files = [
        paths["data"],
        os.path.join(paths["tokenizer"], "tokenizer.json"),
        *(os.path.join(paths["samples"], f"{name}.png") for name in QUESTION_SCENES),
    ]
    return all(os.path.isfile(f) for f in files + ([paths["vae"]] if "vae" in paths else []))


def ensure_example_data(out_dir: str, **kwargs: Any) -> dict[str, str]:
    """The example data in `out_dir`, written on first use and rewritten when a part is missing
    (a folder from an older version). Safe when several ranks call it at once: each writes a
    private folder and renames it into place; the first rename wins."""
    paths = example_paths(out_dir, with_vae=kwargs.get("vae_fit") is not None)
    if _complete(paths):
        return paths
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=parent, prefix=".example_data.") as tmp:
        write_example_data(os.path.join(tmp, "data"), **kwargs)
        if os.path.isdir(out_dir) and not _complete(paths):  # outdated: move it aside, then replace it
            os.rename(out_dir, os.path.join(tmp, "outdated"))
        try:
            os.rename(os.path.join(tmp, "data"), out_dir)
        except OSError:
            if not _complete(paths):  # lost the race to an incomplete folder: a real error
                raise
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir")
    parser.add_argument("--num-samples", type=int, default=DEFAULT_NUM_SAMPLES)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image-size", type=int, nargs=2, default=DEFAULT_IMAGE_SIZE, metavar=("W", "H"))
    parser.add_argument(
        "--vae",
        action="store_true",
        help="also fit the debug flavor's VAE to the images and write OUT_DIR/ae.safetensors "
        "(about a minute of CPU), the file of [bagel] vae_path in the debug config",
    )
    parser.add_argument(
        "--vae-steps", type=int, default=None, help="steps of that fit (default: VAEFitConfig.steps)"
    )
    args = parser.parse_args(argv)
    fit = None
    if args.vae:
        fit = {"seed": args.seed} if args.vae_steps is None else {"seed": args.seed, "steps": args.vae_steps}
    try:
        paths = write_example_data(
            args.out_dir, args.num_samples, args.seed, tuple(args.image_size), vae_fit=fit
        )
    except OSError as exc:
        print(
            f"bagel-titan-example-data: error: cannot write {args.out_dir!r} ({exc.strerror}); choose a "
            f"writable folder",
            file=sys.stderr,
        )
        return 2
    print("wrote " + ", ".join(paths.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
