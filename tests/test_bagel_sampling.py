"""The BAGEL sampler: Euler integration, classifier-free guidance, the model's velocity at a given
(x_t, t), and `BagelSpec.generate_samples` end to end on the debug model."""

from __future__ import annotations

import math
import sys

import numpy as np
import pytest
import torch

from bagel_titan.config.fields import ConfigError
from bagel_titan.config.manager import load_job_config, to_toml
from bagel_titan.distributed.utils import destroy_distributed
from bagel_titan_plugins.bagel.collator import BagelCollator
from bagel_titan_plugins.bagel.config import BagelConfig
from bagel_titan_plugins.bagel.modeling import flow_timesteps, patchify_latents
from bagel_titan_plugins.bagel.processor import BagelSample, TextSegment, VaeSegment
from bagel_titan_plugins.bagel.sampling import (
    BagelSampler,
    euler_sample,
    guidance_active,
    guided_velocity,
    sampling_schedule,
    slug,
    unpatchify_latents,
)
from bagel_titan_plugins.bagel.sampling_config import SamplingConfig, SamplingQuestion
from bagel_titan_plugins.bagel.spec import BagelSpec
from synthetic_bagel import build_bagel_for_tests
from bagel_titan_plugins.data.example_data import Scene, ensure_example_data, render

# -- the integrator and the guidance, on analytic velocity fields -----------------------------


def test_schedule_runs_from_noise_to_data_with_the_release_shift():
    assert sampling_schedule(4, 1.0) == pytest.approx([1.0, 0.75, 0.5, 0.25, 0.0])
    shifted = sampling_schedule(4, 3.0)
    assert shifted[0] == 1.0 and shifted[-1] == 0.0
    assert shifted[2] == pytest.approx(3 * 0.5 / (1 + 2 * 0.5))  # u = 0.5 -> t = 0.75
    assert all(a > b for a, b in zip(shifted, shifted[1:]))


@pytest.mark.parametrize("num_steps,shift", [(1, 1.0), (7, 3.0), (25, 0.5)])
def test_euler_integrates_the_flow_velocity_onto_x0(num_steps, shift):
    gen = torch.Generator().manual_seed(num_steps)
    x0, noise = torch.randn(12, 8, generator=gen), torch.randn(12, 8, generator=gen)
    schedule = sampling_schedule(num_steps, shift)
    # The training target, constant along the straight path from noise to x0.
    landed = euler_sample(lambda x_t, t: noise - x0, noise, schedule)
    torch.testing.assert_close(landed, x0, atol=1e-5, rtol=0)
    # The same field read off x_t itself (what a perfect model predicts at (x_t, t)).
    seen_t = []

    def from_state(x_t, t):
        seen_t.append(t)
        return (x_t - x0) / t

    torch.testing.assert_close(euler_sample(from_state, noise, schedule), x0, atol=1e-5, rtol=0)
    assert seen_t == schedule[:-1]  # never evaluated at t = 0


def test_euler_step_size_and_direction_on_a_curved_field():
    # dx/dt = x: each Euler step from t to t - dt multiplies x by (1 - dt).
    n = 10
    x1 = torch.tensor([2.0, -3.0], dtype=torch.float64)
    landed = euler_sample(lambda x, t: x, x1, sampling_schedule(n, 1.0))
    torch.testing.assert_close(landed, x1 * (1 - 1 / n) ** n)
    assert landed[0] == pytest.approx(2.0 / math.e, rel=0.06)  # and it approaches x1 * e^-1


def test_guided_velocity_is_the_cfg_combination():
    gen = torch.Generator().manual_seed(0)
    v_cond, v_uncond = torch.randn(6, 4, generator=gen), torch.randn(6, 4, generator=gen)
    plain = guided_velocity(v_cond, v_uncond, 4.0, "none")
    torch.testing.assert_close(plain, v_uncond + 4.0 * (v_cond - v_uncond))
    torch.testing.assert_close(guided_velocity(v_cond, v_uncond, 1.0, "global"), v_cond)

    # Global renorm: the guided field scaled to the conditional norm when larger.
    renormed = guided_velocity(v_cond, v_uncond, 4.0, "global", 0.0)
    assert plain.norm() > v_cond.norm()
    torch.testing.assert_close(renormed, plain * (v_cond.norm() / plain.norm()), rtol=1e-5, atol=1e-6)
    # ... bounded below by renorm_min (1.0 disables it) ...
    torch.testing.assert_close(guided_velocity(v_cond, v_uncond, 4.0, "global", 1.0), plain)
    # ... and never scaled up: here the guided field (-v) is no longer than v_cond.
    torch.testing.assert_close(guided_velocity(v_cond, 1.5 * v_cond, 5.0, "global"), -v_cond * 1.0)
    # Channel renorm: per token.
    per_token = guided_velocity(v_cond, v_uncond, 4.0, "channel", 0.0)
    ratio = (v_cond.norm(dim=-1, keepdim=True) / plain.norm(dim=-1, keepdim=True)).clamp(max=1.0)
    torch.testing.assert_close(per_token, plain * ratio, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="cfg_renorm"):
        guided_velocity(v_cond, v_uncond, 4.0, "rows")


def test_guidance_interval_is_open_below_closed_above():
    assert guidance_active(1.0, 4.0, [0.4, 1.0])
    assert guidance_active(0.41, 4.0, [0.4, 1.0])
    assert not guidance_active(0.4, 4.0, [0.4, 1.0])
    assert not guidance_active(0.9, 1.0, [0.0, 1.0])  # scale 1: no unconditional pass


def test_unpatchify_inverts_patchify():
    latent = torch.randn(1, 16, 6, 10)
    tokens = patchify_latents(latent, [(3, 5)], 2)
    torch.testing.assert_close(unpatchify_latents(tokens, 3, 5, 2, 16), latent)


def test_slug_is_a_file_name():
    assert slug("A large, RED circle on a white background!") == "a-large-red-circle-on-a-white-background"
    assert slug("a small blue square on a yellow background") == "a-small-blue-square-on-a-yellow"


# -- the model's velocity at a given (x_t, t) ----------------------------------------------------


@pytest.fixture(scope="module")
def example(tmp_path_factory):
    root = tmp_path_factory.mktemp("example")
    paths = ensure_example_data(str(root / "data"), num_samples=16)
    image = root / "red_circle.png"
    image.write_bytes(render(Scene("circle", "red", "white", "large", 0.5, 0.5), 48, 40))
    return {"tokenizer": paths["tokenizer"], "root": root, "image": image.name}


def debug_model() -> torch.nn.Module:
    model = build_bagel_for_tests("debug", seed=0).eval()
    with torch.no_grad():  # a fresh model predicts v = 0 (zero llm2vae): give it a real head
        torch.nn.init.normal_(model.llm2vae.weight, generator=torch.Generator().manual_seed(0), std=0.5)
    return model


@pytest.fixture(scope="module")
def model():
    return debug_model()


def _job_config(tmp_path, tokenizer: str, sampling: str):
    path = tmp_path / "job.toml"
    path.write_text(f"""
[model]
flavor = "debug"
tokenizer_path = "{tokenizer}"

[attention]
backend = "eager"

[bagel.processor]
vit_min_size = 28
vit_max_size = 56
vae_min_size = 16
vae_max_size = 32

[bagel.sampling]
{sampling}
""")
    return load_job_config(["--job.config_file", str(path)])[0]


def test_noised_forward_is_the_training_forward_at_the_same_x_t(tmp_path, example, model):
    job = _job_config(tmp_path, example["tokenizer"], "")
    spec = BagelSpec()
    processor = spec.build_processor(job)
    collator = BagelCollator(job, BagelConfig(), special_tokens=processor.special, **spec._data_kwargs(job))
    target = VaeSegment(torch.zeros(3, 16, 24), processor.vae_stride, noised=True)
    cond = BagelSample([TextSegment(processor.encode("a large red circle"), loss=False), target])
    batch = collator([cond])
    h, w = batch.patchified_vae_latent_shapes[0]
    gen = torch.Generator().manual_seed(1)
    batch.padded_latent = torch.randn(1, 16, 2 * h, 2 * w, generator=gen)
    batch.noise = torch.randn(h * w, model.patch_latent_dim, generator=gen)
    batch.packed_timesteps = torch.full((h * w,), 0.3)
    with torch.no_grad():
        trained = model(batch)
        t_N = flow_timesteps(batch.packed_timesteps, model.options.timestep_shift)
        x0 = patchify_latents(batch.padded_latent, [(h, w)], 2)
        x_t = (1 - t_N[:, None]) * x0 + t_N[:, None] * batch.noise
        sampled = model(batch, noised=(x_t, t_N))
        assert sampled.target_velocity is None
        torch.testing.assert_close(sampled.pred_velocity, trained.pred_velocity, atol=1e-5, rtol=1e-5)

        # The conditional and unconditional passes share one pack without seeing each other.
        sampler = BagelSampler(model, processor, collator, SamplingConfig())
        pair = collator([cond, BagelSample([target])])
        alone = sampler._velocity(batch, x_t, float(t_N[0]))
        v_cond, v_uncond = sampler._velocity(pair, torch.cat([x_t, x_t]), float(t_N[0])).chunk(2)
        torch.testing.assert_close(v_cond, alone, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(v_uncond, v_cond, atol=1e-4)  # the prompt matters


# -- end to end ----------------------------------------------------------------------------------


def test_generate_samples_end_to_end(tmp_path, example, model):
    job = _job_config(
        tmp_path,
        example["tokenizer"],
        f"""
prompts = ["a large red circle on a white background", "a small blue square on a yellow background"]
data_folder = "{example["root"]}"
num_steps = 3
cfg_scale = 4.0
cfg_interval = [0.5, 1.0]
timestep_shift = 3.0
image_size = [16, 24]
max_new_tokens = 4
seed = 7

[[bagel.sampling.questions]]
image = "{example["image"]}"
question = "what colour is the shape ?"
""",
    )
    sampling = job.section("bagel.sampling")
    assert sampling.questions == [SamplingQuestion(example["image"], "what colour is the shape ?")]
    reread = tmp_path / "resolved.toml"
    reread.write_text(to_toml(job))
    assert load_job_config(["--job.config_file", str(reread)])[0].section("bagel.sampling") == sampling

    with torch.no_grad():
        out = BagelSpec().generate_samples(model, job, step=10)
        again = BagelSpec().generate_samples(model, job, step=20)
    names = ["gen_00_a-large-red-circle-on-a-white-background", "gen_01_a-small-blue-square-on-a-yellow"]
    assert list(out.images) == names
    for name in names:
        image = out.images[name]
        assert image.shape == (16, 24, 3) and image.dtype == np.uint8
        assert image.std() > 0  # a decoded latent, not a constant
        np.testing.assert_array_equal(image, again.images[name])  # fixed noise: comparable across steps
    assert out.texts[names[0]] == "prompt: a large red circle on a white background"
    answer = out.texts["qa_00"].split("answer: ", 1)[1]
    assert answer.strip() and len(answer.split()) <= 4
    assert "question: what colour is the shape ?" in out.texts["qa_00"]


def test_nothing_configured_generates_nothing(tmp_path, example, model):
    job = _job_config(tmp_path, example["tokenizer"], "")
    out = BagelSpec().generate_samples(model, job, step=0)
    assert out.images == {} and out.texts == {}


def test_user_errors_name_the_setting(tmp_path, example, model):
    with pytest.raises(ConfigError, match=r"bagel.sampling.*cfg_interval"):
        _job_config(tmp_path, example["tokenizer"], "cfg_interval = [0.8, 0.2]")
    with pytest.raises(ConfigError, match="needs both `image` and `question`"):
        _job_config(tmp_path, example["tokenizer"], '[[bagel.sampling.questions]]\nimage = "x.png"')
    job = _job_config(tmp_path, example["tokenizer"], 'prompts = ["a red circle"]\nimage_size = [18, 24]')
    with pytest.raises(ValueError, match=r"image_size = \[18, 24\].*multiples of 4"):
        BagelSpec().generate_samples(model, job, step=0)
    job = _job_config(
        tmp_path,
        example["tokenizer"],
        f"""data_folder = "{tmp_path}"
[[bagel.sampling.questions]]
image = "missing.png"
question = "what colour is the shape ?"
""",
    )
    with pytest.raises(ValueError, match="missing.png.*data_folder"):
        BagelSpec().generate_samples(model, job, step=0)


# -- FSDP: every rank runs the same forwards ------------------------------------------------------

QUESTIONS_AND_PROMPTS = """
prompts = ["a large red circle on a white background"]
data_folder = "{root}"
num_steps = 3
image_size = [16, 24]
max_new_tokens = 6

[[bagel.sampling.questions]]
image = "{image}"
question = "what colour is the shape ?"
"""


@pytest.mark.dist
def test_generate_samples_on_two_fsdp_ranks_matches_one_process(tmp_path, example):
    from conftest import run_torchrun

    _job_config(tmp_path, example["tokenizer"], QUESTIONS_AND_PROMPTS.format(**example))
    proc = run_torchrun(2, __file__, str(tmp_path / "job.toml"), timeout=300)
    assert proc.stdout.count("sharded samples match") == 2


def _fsdp_worker(job_file: str) -> None:
    """On each of 2 gloo ranks: samples of the whole model, then of the FSDP-sharded one."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from bagel_titan.config.job_config import Parallelism
    from bagel_titan.distributed.fsdp import apply_fsdp

    dist.init_process_group("gloo")
    job = load_job_config(["--job.config_file", job_file])[0]
    spec, model = BagelSpec(), debug_model()
    whole = spec.generate_samples(model, job, step=0)
    apply_fsdp(model, spec.sharding_units(model), init_device_mesh("cpu", (2,)), Parallelism())
    sharded = spec.generate_samples(model, job, step=0)
    assert sharded.texts == whole.texts, (sharded.texts, whole.texts)
    assert whole.images and sharded.images.keys() == whole.images.keys()
    for name, image in whole.images.items():
        assert np.abs(sharded.images[name].astype(int) - image.astype(int)).max() <= 1, name
    print(f"rank {dist.get_rank()}: sharded samples match", flush=True)
    destroy_distributed()


if __name__ == "__main__":
    _fsdp_worker(sys.argv[1])
