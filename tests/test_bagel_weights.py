"""Weights in and out: official and LE layouts, export round trips, key and table errors,
streaming into FSDP2-sharded (DTensor) parameters."""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.multiprocessing as mp
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from conftest import REFERENCE_SEED0, fsdp_bagel_from_folder
from bagel_titan.distributed.utils import destroy_distributed
from bagel_titan_plugins.bagel.config import VAEArgs
from bagel_titan_plugins.bagel.parity import load_fixture_model
from bagel_titan_plugins.bagel.spec import build_bagel
from bagel_titan_plugins.bagel.weights import detect, export, load_weights, read_architecture

FIXTURE = REFERENCE_SEED0


def _fresh(folder):
    arch, options = read_architecture(str(folder))
    with torch.device("meta"):
        model = build_bagel(arch, options)
    model.to_empty(device="cpu")
    return model


def _assert_same(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    va, vb = a.vae.module.state_dict(), b.vae.module.state_dict()
    assert va and va.keys() == vb.keys()
    for k in va:
        assert torch.equal(va[k], vb[k]), k


@pytest.fixture(scope="module")
def reference():
    model = load_fixture_model(str(FIXTURE))
    # The loaded tables are recomputed; they must equal the release's own (kept in the fixture).
    stored = load_file(FIXTURE / "weights.safetensors")
    for key in ("latent_pos_embed.pos_embed", "vit_pos_embed.pos_embed"):
        torch.testing.assert_close(model.state_dict()[key], stored[key], atol=1e-6, rtol=0)
    return model


def test_fp32_round_trip_is_exact_and_byte_stable(reference, tmp_path):
    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "tokenizer.json").write_text('{"version": "1.0"}')
    (tok / "tokenizer_config.json").write_text("{}")
    reference.tokenizer_path = str(tok)
    out1, out2 = tmp_path / "export1", tmp_path / "export2"
    export(reference, str(out1), torch.float32)
    assert detect(str(out1)).layout == "official"
    for name in (
        "model.safetensors",
        "ae.safetensors",
        "llm_config.json",
        "vit_config.json",
        "config.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ):
        assert (out1 / name).is_file(), name
        assert (out1 / name).stat().st_mode & 0o777 == 0o644, name  # the group can read the export
    assert not (out1 / "ema.safetensors").exists()  # raw weights are never named EMA
    with open(out1 / "vit_config.json") as f:
        assert json.load(f)["num_hidden_layers"] == reference.arch.vit.num_layers + 1
    with safe_open(str(out1 / "model.safetensors"), "pt") as f:
        assert {"latent_pos_embed.pos_embed", "vit_pos_embed.pos_embed"} <= set(f.keys())
    again = _fresh(out1)
    assert again.arch == reference.arch
    # Without config.json (as the HF release ships it): the two sub-configs and the FLUX VAE.
    os.rename(out1 / "config.json", tmp_path / "config.json")
    arch, _ = read_architecture(str(out1))
    assert (arch.llm, arch.vit, arch.vae) == (reference.arch.llm, reference.arch.vit, VAEArgs())
    os.rename(tmp_path / "config.json", out1 / "config.json")
    assert load_weights(again, str(out1)) == "official"
    _assert_same(reference, again)
    again.tokenizer_path = str(tok)
    export(again, str(out2), torch.float32)
    for name in ("model.safetensors", "ae.safetensors", "config.json", "vit_config.json"):
        assert (out1 / name).read_bytes() == (out2 / name).read_bytes(), name


def test_bf16_export_is_default_size_and_loads(reference, tmp_path):
    export(reference, str(tmp_path), torch.bfloat16)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert len(f.keys()) > 0 and all(f.get_slice(k).get_dtype() == "BF16" for k in f.keys())
    again = _fresh(tmp_path)
    load_weights(again, str(tmp_path))
    ref = reference.state_dict()
    for key, value in again.state_dict().items():
        if key.endswith("pos_embed"):
            continue
        assert torch.equal(value, ref[key].to(torch.bfloat16).float()), key


def test_export_overrides_with_a_given_state_dict(reference, tmp_path):
    key = "language_model.model.norm.weight"
    ema = {key: torch.full_like(reference.state_dict()[key], 0.5)}
    export(reference, str(tmp_path), torch.float32, ema, ema=True)
    assert torch.equal(load_file(tmp_path / "ema.safetensors")[key], ema[key])
    assert not (tmp_path / "model.safetensors").exists()  # EMA weights are never named raw
    with pytest.raises(KeyError, match="not_a_key"):
        export(reference, str(tmp_path), torch.float32, {"not_a_key": torch.zeros(1)})


def test_le_layout_sharded_with_index(reference, tmp_path):
    state = {k: v for k, v in reference.state_dict().items() if not k.endswith("pos_embed")}
    state.update({f"vae_model.{k}": v for k, v in reference.vae.module.state_dict().items()})
    keys = sorted(state)
    shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    weight_map = {}
    for name, shard_keys in shards.items():
        save_file({k: state[k].contiguous() for k in shard_keys}, tmp_path / name)
        weight_map.update({k: name for k in shard_keys})
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (tmp_path / "config.json").write_text((FIXTURE / "config.json").read_text())
    model = _fresh(tmp_path)
    assert load_weights(model, str(tmp_path)) == "le"
    _assert_same(reference, model)


def test_missing_and_unexpected_keys_are_listed(reference, tmp_path):
    export(reference, str(tmp_path), torch.float32)
    tensors = load_file(tmp_path / "model.safetensors")
    tensors["language_model.model.extra.weight"] = torch.zeros(2)
    del tensors["connector.fc2.bias"]
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(KeyError) as err:
        load_weights(_fresh(tmp_path), str(tmp_path))
    assert "connector.fc2.bias" in str(err.value) and "language_model.model.extra.weight" in str(err.value)


def test_position_table_that_does_not_fit_names_the_setting(reference, tmp_path):
    export(reference, str(tmp_path), torch.float32)
    config = json.loads((tmp_path / "config.json").read_text())
    config["max_latent_size"] = 4
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="max_latent_size = 8"):
        load_weights(_fresh(tmp_path), str(tmp_path))


def test_another_architecture_names_the_key(reference, tmp_path):
    export(reference, str(tmp_path), torch.float32)
    tensors = load_file(tmp_path / "model.safetensors")
    tensors["connector.fc1.weight"] = torch.zeros(3, 3)
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="connector.fc1.weight .* flavor"):
        load_weights(_fresh(tmp_path), str(tmp_path))


def test_unknown_folder_says_what_it_looked_for(tmp_path):
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        detect(str(tmp_path))


def _sharded_load(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        model = fsdp_bagel_from_folder(FIXTURE, world)
        load_weights(model, str(FIXTURE))
        sharded = [n for n, p in model.named_parameters() if isinstance(p, DTensor)]
        full = {
            n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
            for n, p in model.named_parameters()
        }
        if rank == 0:
            torch.save({"sharded": sharded, "full": full}, out)
    finally:
        destroy_distributed()


@pytest.mark.dist
def test_streams_into_fsdp2_sharded_parameters(tmp_path):
    from conftest import free_port

    out = str(tmp_path / "full.pt")
    mp.spawn(_sharded_load, args=(2, free_port(), out), nprocs=2, join=True)
    result = torch.load(out)
    assert len(result["sharded"]) == len(result["full"])
    reference = load_file(FIXTURE / "weights.safetensors")
    for name, value in result["full"].items():
        torch.testing.assert_close(value, reference[name], atol=1e-6, rtol=0, msg=name)
