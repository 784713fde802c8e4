"""LD3Scheduler in real diffusers pipelines reproduces ld3.sampling.sample (every solver, decoupled or not).

Models: the project's tiny random checkpoints (pipeline/models/smoke.py) of the pixel (DDPMPipeline), latent
(LDMPipeline, VQ autoencoder; DiTPipeline, class-conditional with CFG) and Stable Diffusion
(StableDiffusionPipeline, CFG 7.5) families; the EDM network pickle and the exact Gaussian mixture (EDM schedule)
in a hand-written diffusers-style loop (diffusers has no pipeline for EDM pickles).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import DDPMPipeline, LDMPipeline, StableDiffusionPipeline

from ld3.models.diffusers_models import (
    DiffusersDenoiser,
    load_latent_diffusion,
    load_pixel_diffusion,
    schedule_from_scheduler_config,
)
from ld3.models.edm import load_edm_denoiser
from ld3.models.gmm import default_gmm
from ld3.models.stable_diffusion import load_stable_diffusion
from ld3.sampling import sample
from ld3.schedules import EDMSchedule
from ld3.solvers import coefficient_shape
from ld3.solvers import nfe as solver_nfe
from pipeline.consumers.diffusers_scheduler import LD3Scheduler
from pipeline.models.smoke import (
    tiny_edm_pickle,
    tiny_latent_pipeline,
    tiny_pixel_pipeline,
    tiny_stable_diffusion_pipeline,
)
from pipeline.recording.exports import build_export, save_export

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SOLVERS = [("euler", 1), ("heun", 2), ("dpm_solver_2", 2), ("dpmpp", 2), ("dpmpp", 3), ("unipc_bh1", 3),
           ("unipc_bh2", 2), ("ipndm", 1), ("ipndm", 2), ("ipndm", 3), ("ipndm", 4)]
N_STEPS = 4
RTOL = 1e-5


def _grid(schedule, decoupled: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A logSNR-uniform grid over the schedule's range and, if ``decoupled``, interior evaluation points
    moved off it (endpoints shared, as LD3 exports them)."""
    ends = schedule.lambda_(torch.tensor([schedule.t_max, schedule.t_min], dtype=torch.float64))
    sigmas = torch.exp(-torch.linspace(float(ends[0]), float(ends[1]), N_STEPS + 1, dtype=torch.float64))
    if not decoupled:
        return sigmas, None
    shifts = torch.tensor([0.0, 0.3, -0.2, 0.25, 0.0], dtype=torch.float64)
    return sigmas, sigmas * torch.exp(shifts)


def _export(tmp_path, schedule, solver: str, order: int, decoupled: bool):
    sigmas, sigmas_eval = _grid(schedule, decoupled)
    exported = build_export(sigmas=sigmas, sigmas_eval=sigmas_eval, noise_schedule=schedule, model="tiny", solver=solver,
                            order=order, nfe=solver_nfe(solver, N_STEPS), mode="lambda", metrics={}, config={},
                            teacher_cache_key="test")
    return save_export(exported, tmp_path), sigmas, sigmas_eval


def _record_final_latents(scheduler: LD3Scheduler) -> list[torch.Tensor]:
    """Latents the pipeline receives from each step (its output before decoding/clamping)."""
    seen: list[torch.Tensor] = []
    step = scheduler.step

    def recording_step(*args, **kwargs):
        out = step(*args, **kwargs)
        seen.append(out[0] if isinstance(out, tuple) else out.prev_sample)
        return out

    scheduler.step = recording_step
    return seen


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.fixture(scope="module")
def pixel():
    return load_pixel_diffusion(tiny_pixel_pipeline()).double()


@pytest.fixture(scope="module")
def latent():
    return load_latent_diffusion(tiny_latent_pipeline())  # LDMPipeline draws float32 latents


@pytest.fixture(scope="module")
def edm():
    return load_edm_denoiser(tiny_edm_pickle(image_shape=(3, 8, 8)))  # the project's own pickle: trusted


@pytest.fixture(scope="module")
def stable_diffusion():
    denoiser = load_stable_diffusion(tiny_stable_diffusion_pipeline()).double()
    denoiser.unconditional = denoiser.encode_prompts([""])  # the negative prompt embedded in float64, as the pipeline does
    return denoiser


def _scheduler_config(folder) -> dict:
    from diffusers import DDIMScheduler

    return dict(DDIMScheduler.from_pretrained(folder, subfolder="scheduler").config)


def _scheduler(tmp_path, denoiser, folder, solver: str, order: int, decoupled: bool, **options):
    """(LD3Scheduler of a fresh export for ``denoiser``'s schedule, the export's sigmas, sigmas_eval)."""
    path, sigmas, sigmas_eval = _export(tmp_path, denoiser.schedule, solver, order, decoupled)
    return LD3Scheduler.from_export(path, _scheduler_config(folder), **options), sigmas, sigmas_eval


@pytest.mark.parametrize("decoupled", [False, True], ids=["coupled", "decoupled"])
@pytest.mark.parametrize(("solver", "order"), SOLVERS)
def test_ddpm_pipeline_equals_ld3_sampling(tmp_path, pixel, solver, order, decoupled):
    scheduler, sigmas, sigmas_eval = _scheduler(tmp_path, pixel, tiny_pixel_pipeline(), solver, order, decoupled)
    pipe = DDPMPipeline(unet=pixel.net, scheduler=scheduler)
    seen = _record_final_latents(scheduler)
    images = pipe(batch_size=2, generator=torch.Generator().manual_seed(1), num_inference_steps=N_STEPS,
                  output_type="pt").images
    z = torch.randn(2, *pixel.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    # DDPMPipeline draws x_T ~ N(0, I) without init_noise_sigma: ld3's latent is z / init_noise_sigma.
    expected = sample(pixel, solver, order, sigmas, z / scheduler.init_noise_sigma, sigmas_eval=sigmas_eval)
    assert len(seen) == scheduler.order * N_STEPS == len(scheduler.timesteps)
    assert _relative_error(seen[-1], expected) < RTOL
    assert torch.allclose(images, (expected / 2 + 0.5).clamp(0, 1), rtol=0, atol=1e-6)


@pytest.mark.parametrize("decoupled", [False, True], ids=["coupled", "decoupled"])
@pytest.mark.parametrize(("solver", "order"), SOLVERS)
def test_latent_pipeline_equals_ld3_sampling_in_float32(tmp_path, latent, solver, order, decoupled):
    scheduler, sigmas, sigmas_eval = _scheduler(tmp_path, latent, tiny_latent_pipeline(), solver, order, decoupled)
    pipe = LDMPipeline(vqvae=latent.autoencoder, unet=latent.net, scheduler=scheduler)
    seen = _record_final_latents(scheduler)
    pipe(batch_size=2, generator=torch.Generator().manual_seed(2), num_inference_steps=N_STEPS, output_type="np")
    z = torch.randn(2, *latent.shape, generator=torch.Generator().manual_seed(2))
    expected = sample(latent, solver, order, sigmas, z, sigmas_eval=sigmas_eval)
    assert seen[-1].dtype == torch.float32
    assert _relative_error(seen[-1], expected) < RTOL


@pytest.mark.parametrize("decoupled", [False, True], ids=["coupled", "decoupled"])
@pytest.mark.parametrize(("solver", "order"), SOLVERS)
def test_stable_diffusion_pipeline_with_cfg_equals_ld3_sampling(tmp_path, stable_diffusion, solver, order, decoupled):
    scheduler, sigmas, sigmas_eval = _scheduler(tmp_path, stable_diffusion, tiny_stable_diffusion_pipeline(), solver, order,
                                                decoupled)
    pipe = StableDiffusionPipeline(vae=stable_diffusion.autoencoder, text_encoder=stable_diffusion.text_encoder,
                                   tokenizer=stable_diffusion.tokenizer, unet=stable_diffusion.net, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    prompts = ["a cat", "a red car"]
    latents = pipe(prompts, generator=torch.Generator().manual_seed(3), num_inference_steps=N_STEPS,
                   guidance_scale=7.5, output_type="latent").images
    z = torch.randn(2, *stable_diffusion.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    expected = sample(stable_diffusion, solver, order, sigmas, z, sigmas_eval=sigmas_eval,
                      cond=stable_diffusion.encode_prompts(prompts))
    assert _relative_error(latents, expected) < RTOL


@pytest.fixture(scope="module")
def dit():
    """A class-conditional DiT with ImageNet's 1000 classes (DiTPipeline's null class is id 1000) and CFG 4."""
    from diffusers import AutoencoderKL, DDIMScheduler, DiTTransformer2DModel

    folder = tiny_latent_pipeline(class_conditional=True)
    torch.manual_seed(0)
    net = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=1,
                                sample_size=8, patch_size=2, num_embeds_ada_norm=1000)
    vae = AutoencoderKL.from_pretrained(folder, subfolder="vae")
    schedule_config = DDIMScheduler.from_pretrained(folder, subfolder="scheduler").config
    return DiffusersDenoiser(net, schedule_from_scheduler_config(schedule_config), autoencoder=vae, guidance_scale=4.0).double()


@pytest.mark.parametrize("decoupled", [False, True], ids=["coupled", "decoupled"])
@pytest.mark.parametrize(("solver", "order"), [("heun", 2), ("unipc_bh2", 3), ("ipndm", 4)])
def test_dit_pipeline_with_cfg_equals_ld3_sampling(tmp_path, dit, solver, order, decoupled):
    """DiTPipeline steps a doubled batch (conditional and null class) and skips init_noise_sigma."""
    from diffusers import DiTPipeline

    scheduler, sigmas, sigmas_eval = _scheduler(tmp_path, dit, tiny_latent_pipeline(class_conditional=True), solver, order,
                                                decoupled)
    seen = _record_final_latents(scheduler)
    DiTPipeline(transformer=dit.net, vae=dit.autoencoder, scheduler=scheduler)(
        class_labels=[3, 999], guidance_scale=4.0, generator=torch.Generator().manual_seed(6),
        num_inference_steps=N_STEPS, output_type="np")
    z = torch.randn(2, *dit.shape, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    expected = sample(dit, solver, order, sigmas, z / scheduler.init_noise_sigma, sigmas_eval=sigmas_eval,
                      cond=torch.tensor([3, 999]))
    assert _relative_error(seen[-1][:2], expected) < RTOL


@pytest.mark.parametrize("prediction_type", ["v_prediction", "sample"])
def test_other_prediction_types_of_vp_models(tmp_path, pixel, prediction_type):
    """The same network read as a v- or x0-predictor, by the adapter and by the scheduler alike."""
    reinterpreted = DiffusersDenoiser(pixel.net, pixel.schedule, prediction_type)
    scheduler, sigmas, sigmas_eval = _scheduler(tmp_path, pixel, tiny_pixel_pipeline(), "unipc_bh2", 3, True,
                                                prediction_type=prediction_type)
    seen = _record_final_latents(scheduler)
    DDPMPipeline(unet=pixel.net, scheduler=scheduler)(batch_size=2, generator=torch.Generator().manual_seed(4),
                                                      num_inference_steps=N_STEPS, output_type="pt")
    z = torch.randn(2, *pixel.shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    expected = sample(reinterpreted, "unipc_bh2", 3, sigmas, z / scheduler.init_noise_sigma, sigmas_eval=sigmas_eval)
    assert _relative_error(seen[-1], expected) < RTOL


@pytest.mark.parametrize("prediction_type", ["sample", "epsilon"])
@pytest.mark.parametrize(("solver", "order"), [("heun", 2), ("dpm_solver_2", 2), ("ipndm", 4), ("unipc_bh1", 3)])
def test_edm_schedule_in_a_diffusers_style_loop(tmp_path, solver, order, prediction_type):
    """EDM/VE models: the network's time is σ itself, its input unscaled (the exact GMM as the network)."""
    gmm = default_gmm()
    path, sigmas, sigmas_eval = _export(tmp_path, EDMSchedule(), solver, order, True)
    scheduler = LD3Scheduler.from_export(path, prediction_type=prediction_type)

    def network(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        denoised = gmm(x, t.expand(x.shape[0]))
        return denoised if prediction_type == "sample" else (x - denoised) / t

    z = torch.randn(3, *gmm.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    x = z * scheduler.init_noise_sigma
    scheduler.set_timesteps(N_STEPS)
    for t in scheduler.timesteps:
        x = scheduler.step(network(scheduler.scale_model_input(x, t), t), t, x).prev_sample
    expected = sample(gmm, solver, order, sigmas, z, sigmas_eval=sigmas_eval)
    assert _relative_error(x, expected) < 1e-12


@pytest.mark.parametrize("decoupled", [False, True], ids=["coupled", "decoupled"])
@pytest.mark.parametrize(("solver", "order"), SOLVERS)
def test_edm_network_pickle_in_a_diffusers_style_loop(tmp_path, edm, solver, order, decoupled):
    """An EDM preconditioned network (it returns D: prediction type "sample"), float32 inside, latents float64."""
    path, sigmas, sigmas_eval = _export(tmp_path, edm.schedule, solver, order, decoupled)
    scheduler = LD3Scheduler.from_export(path, prediction_type="sample")
    z = torch.randn(2, *edm.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    x = z * scheduler.init_noise_sigma
    scheduler.set_timesteps(N_STEPS)
    for t in scheduler.timesteps:
        x = scheduler.step(edm.net(scheduler.scale_model_input(x, t), t.expand(x.shape[0])), t, x).prev_sample
    assert x.dtype == torch.float64
    assert _relative_error(x, sample(edm, solver, order, sigmas, z, sigmas_eval=sigmas_eval)) < RTOL


def test_timesteps_are_the_evaluation_points(tmp_path, pixel):
    """Decoupled: the network's times are those of sigmas_eval; Heun evaluates twice per step."""
    path, sigmas, sigmas_eval = _export(tmp_path, pixel.schedule, "heun", 2, True)
    scheduler = LD3Scheduler.from_export(path, _scheduler_config(tiny_pixel_pipeline()))
    native = pixel.schedule.t_from_sigma(sigmas_eval)
    pairs = torch.stack([native[:-1], native[1:]], dim=1).flatten()
    assert scheduler.order == 2 and torch.allclose(scheduler.timesteps, pairs, rtol=0, atol=1e-9)
    assert not torch.allclose(native, pixel.schedule.t_from_sigma(sigmas))  # the decoupling is real


def test_scheduler_config_round_trips(tmp_path, pixel):
    path, _, _ = _export(tmp_path, pixel.schedule, "ipndm", 4, True)
    scheduler = LD3Scheduler.from_export(path, _scheduler_config(tiny_pixel_pipeline()))
    scheduler.save_pretrained(tmp_path / "scheduler")
    again = LD3Scheduler.from_pretrained(tmp_path / "scheduler")
    assert torch.equal(again.timesteps, scheduler.timesteps) and again.config.solver == "ipndm"
    assert again.init_noise_sigma == scheduler.init_noise_sigma


def test_misuse_is_a_clear_error(tmp_path, pixel):
    pixel_config = _scheduler_config(tiny_pixel_pipeline())
    path, _, _ = _export(tmp_path, pixel.schedule, "ipndm", 4, True)
    scheduler = LD3Scheduler.from_export(path, pixel_config)
    with pytest.raises(ValueError, match="num_inference_steps=4"):
        scheduler.set_timesteps(50)
    with pytest.raises(ValueError, match="needs the model's scheduler config"):
        LD3Scheduler.from_export(path)
    with pytest.raises(ValueError, match="another noise schedule|outside"):
        LD3Scheduler.from_export(path, _scheduler_config(tiny_stable_diffusion_pipeline()))
    with pytest.raises(ValueError, match="image-to-image"):
        scheduler.set_begin_index(2)
    with pytest.raises(ValueError, match="prediction_type"):
        LD3Scheduler.from_export(path, {**pixel_config, "prediction_type": "flow"})
    scheduler.set_timesteps(4)
    x = torch.randn(1, *pixel.shape, dtype=torch.float64)
    t = scheduler.timesteps[0]
    with pytest.raises(ValueError, match="timestep"):
        scheduler.step(torch.zeros_like(x), scheduler.timesteps[1], x)
    x = scheduler.step(torch.zeros_like(x), t, x).prev_sample
    with pytest.raises(ValueError, match="editing latents"):
        scheduler.step(torch.zeros_like(x), scheduler.timesteps[1], x + 1)


def test_without_diffusers_the_import_error_says_how_to_install():
    code = ("import sys\nsys.modules['diffusers'] = None  # as if not installed\ntry:\n"
            "    import pipeline.consumers.diffusers_scheduler\nexcept ImportError as error:\n"
            "    assert \"pip install -e '.[models]'\" in str(error), error\nelse:\n    raise SystemExit('imported')\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])


@pytest.mark.parametrize(("solver", "order"), [("ipndm", 3), ("unipc_bh1", 3), ("dpmpp", 3)])
def test_learned_coefficients_are_honoured_by_the_scheduler(tmp_path, pixel, solver, order):
    sigmas, sigmas_eval = _grid(pixel.schedule, decoupled=True)
    generator = torch.Generator().manual_seed(2)
    coefficients = 0.2 * torch.randn(coefficient_shape(solver, N_STEPS, order), generator=generator, dtype=torch.float64)
    exported = build_export(sigmas=sigmas, sigmas_eval=sigmas_eval, noise_schedule=pixel.schedule, model="tiny",
                            solver=solver, order=order, nfe=N_STEPS, mode="lambda", metrics={}, config={},
                            teacher_cache_key="test", coefficients=coefficients)
    scheduler = LD3Scheduler.from_export(save_export(exported, tmp_path), _scheduler_config(tiny_pixel_pipeline()))
    pipe = DDPMPipeline(unet=pixel.net, scheduler=scheduler)
    seen = _record_final_latents(scheduler)
    pipe(batch_size=2, generator=torch.Generator().manual_seed(1), num_inference_steps=N_STEPS, output_type="pt")
    z = torch.randn(2, *pixel.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    z = z / scheduler.init_noise_sigma
    expected = sample(pixel, solver, order, sigmas, z, sigmas_eval=sigmas_eval, coefficients=coefficients)
    assert _relative_error(seen[-1], expected) < RTOL
    plain = sample(pixel, solver, order, sigmas, z, sigmas_eval=sigmas_eval)
    assert _relative_error(plain, expected) > 100 * RTOL  # the coefficients matter on this grid
