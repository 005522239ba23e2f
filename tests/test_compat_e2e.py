"""End to end: an LMMS Engine YAML over data in the four compat layouts (the release's t2i and
editing parquet, LLaVA jsonl with images on disk, an HF save_to_disk folder), converted by
`bagel-titan-from-lmms`, trains the debug model for a few steps; every layout is read during the
run (each holds one bad row, and each bad row's reason shows up in the run's metrics)."""

from __future__ import annotations

import pytest

import json

import pyarrow as pa
import pyarrow.parquet as pq

from bagel_titan_plugins.compat.lmms.cli import main as from_lmms
from bagel_titan_plugins.data.example_data import Scene, render, write_example_data

from conftest import train_in_process

pytestmark = [pytest.mark.dist, pytest.mark.slow]  # an end-to-end run (its Trainer in this process)

COLOURS = ("red", "green", "blue", "yellow")


def png(colour: str, shape: str = "circle") -> bytes:
    return render(Scene(shape, colour, "white", "large", 0.5, 0.5), 64, 48)


def write_layouts(root) -> dict[str, str]:
    t2i = root / "t2i"
    t2i.mkdir()
    rows = [
        {"image": png(c), "captions": json.dumps({"short": f"a {c} circle", "long": f"a large {c} circle"})}
        for c in COLOURS * 3
    ]
    rows[0]["captions"] = json.dumps({})
    pq.write_table(pa.Table.from_pylist(rows), t2i / "part-0.parquet", row_group_size=4)

    edit = root / "edit"
    edit.mkdir()
    chains = [
        {"image_list": [png(a), png(b)], "instruction_list": [[f"make it {b}"]]}
        for a, b in zip(COLOURS * 2, COLOURS[1:] * 2 + COLOURS[:1] * 2)
    ]
    chains[0]["image_list"] = chains[0]["image_list"][:1]
    pq.write_table(pa.Table.from_pylist(chains), edit / "part-0.parquet", row_group_size=3)

    images = root / "images"
    images.mkdir()
    for c in COLOURS:
        (images / f"{c}.png").write_bytes(png(c, "square"))
    records = [
        {
            "image": f"{c}.png",
            "conversations": [
                {"from": "human", "value": "<image>\nwhat colour is it ?"},
                {"from": "gpt", "value": f"it is {c} ."},
            ],
        }
        for c in COLOURS * 2
    ]
    records[0] = {"video": "clip.mp4", "conversations": records[0]["conversations"]}
    (root / "llava.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")

    hf = root / "hf"
    hf.mkdir()
    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    table = pa.Table.from_pylist(
        [
            {"image": None if i == 0 else {"bytes": png(c), "path": None}, "caption": f"a {c} circle"}
            for i, c in enumerate(COLOURS * 2)
        ],
        schema=pa.schema([("image", image), ("caption", pa.string())]),
    )
    with (
        pa.OSFile(str(hf / "data-00000-of-00001.arrow"), "wb") as sink,
        pa.ipc.new_stream(sink, table.schema) as w,
    ):
        w.write_table(table, max_chunksize=3)
    (hf / "dataset_info.json").write_text(
        json.dumps(
            {"features": {"image": {"_type": "Image"}, "caption": {"dtype": "string", "_type": "Value"}}}
        )
    )
    (hf / "state.json").write_text(json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}]}))
    return {
        "t2i": str(t2i),
        "edit": str(edit),
        "llava": str(root / "llava.jsonl"),
        "images": str(images),
        "hf": str(hf),
    }


LMMS_YAML = """
- type: trainer
  config:
    trainer_type: fsdp2_trainer
    dataset_config:
      dataset_type: bagel_iterable
      dataset_format: yaml
      datasets:
        - {{path: {t2i}, data_type: parquet}}
        - {{path: {edit}, data_type: parquet}}
        - {{path: {llava}, data_folder: {images}, data_type: jsonl}}
        - {{path: {hf}, data_type: arrow}}
      processor_config:
        processor_name: {tokenizer}
        processor_type: bagel
        extra_kwargs:
          image_transform_args: {{image_stride: 16, max_image_size: 64, min_image_size: 32}}
          vit_image_transform_args: {{image_stride: 14, max_image_size: 112, min_image_size: 56}}
      packing: true
      packing_strategy: first_fit
      packing_length: 1024
      video_backend: qwen_vl_utils
    model_config:
      attn_implementation: sdpa
    per_device_train_batch_size: 1
    learning_rate: 1.0e-03
    gradient_accumulation_steps: 1
    max_steps: 3
    save_steps: 100
    logging_steps: 1
    output_dir: {output}
    dataloader_num_workers: 0
    fsdp2: true
"""


def test_converted_lmms_config_trains_on_every_compat_layout(tmp_path):
    paths = write_layouts(tmp_path)
    tokenizer = write_example_data(str(tmp_path / "example"), num_samples=8)["tokenizer"]
    config = tmp_path / "lmms.yaml"
    config.write_text(LMMS_YAML.format(**paths, tokenizer=tokenizer, output=tmp_path / "runs" / "compat"))
    toml = tmp_path / "train.toml"
    # `bagel-titan-from-lmms` (its `main`, here in this process: test_compat_from_lmms.py checks
    # the command's own behaviour).
    assert from_lmms([str(config), "-o", str(toml)]) == 0
    text = toml.read_text()
    for fmt in ("bagel_t2i", "bagel_edit", "llava", "hf_disk"):
        assert f'format = "{fmt}"' in text

    # 8 steps, not the YAML's 3: the order and the conditioning dropout are keyed by the dataset
    # names, here the tmp paths, so which packs hold answer text (a CE term) changes between runs.
    train_in_process(  # one rank: the Trainer in this process
        [
            "--job.config_file",
            str(toml),
            "--training.device",
            "cpu",
            "--data.packing_window",
            "8",
            "--checkpoint.enable",
            "false",
            "--training.steps",
            "8",
        ]
    )

    lines = [
        json.loads(line) for line in (tmp_path / "runs" / "compat" / "metrics.jsonl").read_text().splitlines()
    ]
    assert [m["step"] for m in lines if "loss" in m] == list(range(1, 9))
    losses = [m for m in lines if "loss" in m]
    assert all(m["loss/flow_mse"] > 0 and m["loss/ce"] >= 0 for m in losses)
    assert any(m["loss/ce"] > 0 for m in losses)  # a pack without assistant text has no CE term
    last = lines[-1]
    for reason in ("no_caption", "bad_edit_chain", "unsupported_video", "image_missing"):
        assert last.get(f"data/skipped/{reason}", 0) >= 1, (reason, last)
