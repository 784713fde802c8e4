"""diffusers adapters: tiny random-weight models built from configs, saved as pipeline folders, loaded
through ld3's loaders and checked against diffusers' own schedulers and pipelines.

Alignment with diffusers (why the comparisons are set up this way):
- Both sides use the same integer timesteps; our grid is ``sigma(t_i)`` plus the schedule's sigma_min,
  which is diffusers' ``final_sigmas_type="sigma_min"`` (its default "zero" jumps to sigma = 0, a point
  the EDM-form solvers never reach).
- EulerDiscreteScheduler works on the EDM state ``x`` itself: its ``init_noise_sigma`` is sigma_max for
  "linspace" spacing (so x_T = sigma_max z, as ours) and ``scale_model_input`` divides by
  sqrt(sigma^2 + 1), which is our ``x_vp = alpha x``.
- DPMSolverMultistepScheduler works on ``x_vp = alpha x`` with ``init_noise_sigma = 1``: it is started from
  ``alpha(sigma_max) x_T`` and its result divided by ``alpha(sigma_min)`` (DiT's pipeline starts from
  ``x_vp = z``, so there we start ours from ``z / alpha(sigma_max)``).
- diffusers computes alphas_cumprod in float32, ours in float64: sigma differs by up to ~3e-4 relative
  at t = 0 and ~1e-6 at large t. Its effect on the samples is below float32 round-off of the sampling
  loops, so outputs agree to ~1e-6 of their scale (asserted: 1e-5).
"""

import json

import numpy as np
import pytest
import torch
from diffusers import (
    AutoencoderKL,
    DiTPipeline,
    DiTTransformer2DModel,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
    UNet2DModel,
    VQModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from ld3.losses import MissingWeightsError
from ld3.models.diffusers_models import (
    load_latent_diffusion,
    load_pixel_diffusion,
    schedule_from_scheduler_config,
    x0_from_prediction,
)
from ld3.models.stable_diffusion import load_prompts, load_stable_diffusion
from ld3.solvers import dpmpp, euler

TIMESTEPS = [999, 800, 600, 400, 200, 50]
SD_BETAS = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
AE_BLOCKS = dict(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4)


def tiny_unet(**kwargs) -> UNet2DModel:
    torch.manual_seed(0)
    return UNet2DModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(8, 16),
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4, **kwargs)


def save_components(folder, **components):
    for name, component in components.items():
        component.save_pretrained(folder / name)
    return folder


def grid(schedule, timesteps=TIMESTEPS) -> torch.Tensor:
    """Our sigma grid for diffusers' timesteps with final_sigmas_type="sigma_min"."""
    t = torch.tensor(timesteps, dtype=torch.float64)
    return torch.cat([schedule.sigma(t), torch.tensor([schedule.sigma_min], dtype=torch.float64)])


def diffusers_euler(unet, scheduler, x, prediction=lambda out: out, **set_timesteps):
    scheduler.set_timesteps(**set_timesteps)
    for t in scheduler.timesteps:
        with torch.no_grad():
            out = prediction(unet(scheduler.scale_model_input(x, t), t).sample)
        x = scheduler.step(out, t, x).prev_sample
    return x


def assert_same(ours, theirs, rel=1e-5):
    """Agreement relative to the output's scale (random networks give large, unnormalised outputs)."""
    ours, theirs = torch.as_tensor(ours), torch.as_tensor(theirs)
    assert ours.shape == theirs.shape
    error = float((ours - theirs).abs().max() / theirs.abs().max())
    assert error <= rel, f"max |ours - diffusers| / max |diffusers| = {error:.3g} > {rel:g}"


def alpha(sigma) -> torch.Tensor:
    return torch.rsqrt(1 + torch.as_tensor(sigma, dtype=torch.float64) ** 2).float()


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def z():
    return torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))


# ---- schedule and prediction conversion ------------------------------------------------------------
@pytest.mark.parametrize("config", [dict(beta_schedule="linear"), SD_BETAS, dict(beta_schedule="squaredcos_cap_v2"),
                                    dict(trained_betas=np.linspace(1e-4, 0.03, 500).tolist())])
def test_schedule_from_config_matches_diffusers(config):
    scheduler = EulerDiscreteScheduler(**config)
    ours = schedule_from_scheduler_config(scheduler.config)
    t = torch.arange(len(scheduler.alphas_cumprod), dtype=torch.float64)
    theirs = ((1 - scheduler.alphas_cumprod.double()) / scheduler.alphas_cumprod.double()).sqrt()
    torch.testing.assert_close(ours.sigma(t), theirs, rtol=5e-4, atol=0)  # float32 cumprod in diffusers
    torch.testing.assert_close(ours.t_from_sigma(ours.sigma(t)), t, rtol=0, atol=1e-6)


def test_schedule_config_errors():
    with pytest.raises(ValueError, match="beta_schedule='sigmoid' is not supported"):
        schedule_from_scheduler_config({"beta_schedule": "sigmoid"})
    with pytest.raises(ValueError, match="rescale_betas_zero_snr"):
        schedule_from_scheduler_config({"rescale_betas_zero_snr": True})


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_x0_conversion_matches_euler_scheduler(prediction_type):
    scheduler = EulerDiscreteScheduler(prediction_type=prediction_type)
    scheduler.set_timesteps(timesteps=[700])
    x, out = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    theirs = scheduler.step(out, scheduler.timesteps[0], x).pred_original_sample
    sigma = scheduler.sigmas[0].expand(2)
    torch.testing.assert_close(x0_from_prediction(out, x, sigma, prediction_type), theirs)


# ---- pixel models ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pixel_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pixel")
    return save_components(folder, unet=tiny_unet(), scheduler=EulerDiscreteScheduler(final_sigmas_type="sigma_min"))


def test_pixel_model_euler_matches_diffusers(pixel_folder, z):
    denoiser = load_pixel_diffusion(pixel_folder)
    assert denoiser.shape == (3, 8, 8) and denoiser.condition_kind is None
    sigmas = grid(denoiser.schedule)
    with torch.no_grad():
        ours = euler(denoiser, z * sigmas[0].float(), sigmas)
    scheduler = EulerDiscreteScheduler.from_pretrained(pixel_folder, subfolder="scheduler")
    theirs = diffusers_euler(denoiser.net, scheduler, z * scheduler.init_noise_sigma, timesteps=TIMESTEPS)
    assert_same(ours, theirs)


def test_pixel_model_euler_at_fractional_timesteps_matches_diffusers(pixel_folder, z):
    """Custom sigmas (EDM rho=7) map to real-valued timesteps on both sides: no rounding."""
    denoiser = load_pixel_diffusion(pixel_folder)
    s_max, s_min = denoiser.schedule.sigma_max, denoiser.schedule.sigma_min
    ramp = torch.linspace(0, 1, 6, dtype=torch.float64)
    sigmas = (s_max ** (1 / 7) + ramp * (s_min ** (1 / 7) - s_max ** (1 / 7))) ** 7
    with torch.no_grad():
        ours = euler(denoiser, z * sigmas[0].float(), sigmas)
    scheduler = EulerDiscreteScheduler.from_pretrained(pixel_folder, subfolder="scheduler")
    theirs = diffusers_euler(denoiser.net, scheduler, z * sigmas[0].float(), sigmas=sigmas.tolist())
    assert not torch.equal(scheduler.timesteps, scheduler.timesteps.round())
    assert_same(ours, theirs)


def test_pixel_model_dpmpp_2m_matches_diffusers(pixel_folder, z):
    denoiser = load_pixel_diffusion(pixel_folder)
    sigmas = grid(denoiser.schedule)
    with torch.no_grad():
        ours = dpmpp(denoiser, z * sigmas[0].float(), sigmas, order=2)
    scheduler = DPMSolverMultistepScheduler(solver_order=2, algorithm_type="dpmsolver++", final_sigmas_type="sigma_min")
    scheduler.set_timesteps(timesteps=TIMESTEPS)
    x = z * (sigmas[0] * alpha(sigmas[0])).float()
    for t in scheduler.timesteps:
        with torch.no_grad():
            x = scheduler.step(denoiser.net(x, t).sample, t, x).prev_sample
    assert_same(ours, x / alpha(sigmas[-1]))


def test_v_prediction_model_matches_diffusers(tmp_path, z):
    folder = save_components(tmp_path, unet=tiny_unet(),
                             scheduler=EulerDiscreteScheduler(prediction_type="v_prediction", final_sigmas_type="sigma_min", **SD_BETAS))
    denoiser = load_pixel_diffusion(folder)
    assert denoiser.prediction_type == "v_prediction"
    sigmas = grid(denoiser.schedule)
    with torch.no_grad():
        ours = euler(denoiser, z * sigmas[0].float(), sigmas)
    scheduler = EulerDiscreteScheduler.from_pretrained(folder, subfolder="scheduler")
    theirs = diffusers_euler(denoiser.net, scheduler, z * scheduler.init_noise_sigma, timesteps=TIMESTEPS)
    assert_same(ours, theirs)


def test_denoiser_is_differentiable_in_sigma_and_checkpointing_keeps_gradients(pixel_folder, z):
    plain = load_pixel_diffusion(pixel_folder)
    checkpointed = load_pixel_diffusion(pixel_folder, gradient_checkpointing=True)
    grads = []
    for denoiser in (plain, checkpointed):
        x = z.clone().requires_grad_()
        sigma = torch.tensor([0.7, 3.0], requires_grad=True)
        denoiser(x, sigma).square().sum().backward()
        grads.append((x.grad, sigma.grad))
    torch.testing.assert_close(grads[0], grads[1])
    assert grads[0][1].abs().min() > 0  # continuous timesteps: d D / d sigma flows through t(sigma)
    bf16 = load_pixel_diffusion(pixel_folder, autocast_bf16=True)
    with torch.no_grad():
        out, ref = bf16(z, torch.tensor([0.7, 3.0])), plain(z, torch.tensor([0.7, 3.0]))
    assert out.dtype == torch.float32 and not torch.equal(out, ref)
    torch.testing.assert_close(out, ref, rtol=0.05, atol=0.05)


def test_pixel_model_bad_input(pixel_folder, z, tmp_path):
    denoiser = load_pixel_diffusion(pixel_folder)
    with pytest.raises(ValueError, match=r"x must have shape \[B, 3, 8, 8\]"):
        denoiser(torch.zeros(2, 3, 16, 16), torch.ones(2))
    with pytest.raises(ValueError, match="unconditional"):
        denoiser(z, torch.ones(2), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="decode needs a latent model"):
        denoiser.decode(z)
    with pytest.raises(ValueError, match="needs a conditional model"):
        load_pixel_diffusion(pixel_folder, guidance_scale=2.0)
    with pytest.raises(MissingWeightsError, match="not found .*huggingface-cli download google/ddpm-cifar10-32"):
        load_pixel_diffusion(tmp_path / "missing")
    with pytest.raises(MissingWeightsError, match="Hugging Face cache"):
        load_pixel_diffusion("nobody-has/this-model")
    save_components(tmp_path / "no_weights", scheduler=EulerDiscreteScheduler())
    tiny_unet().save_config(tmp_path / "no_weights" / "unet")
    with pytest.raises(MissingWeightsError, match="weights of 'unet'"):
        load_pixel_diffusion(tmp_path / "no_weights")


def test_class_conditional_unet_validates_labels(tmp_path, z):
    folder = save_components(tmp_path, unet=tiny_unet(num_class_embeds=5), scheduler=EulerDiscreteScheduler())
    with pytest.raises(ValueError, match="needs null_class="):
        load_pixel_diffusion(folder, guidance_scale=2.0)
    guided = load_pixel_diffusion(folder, guidance_scale=2.0, null_class=4)
    plain = load_pixel_diffusion(folder)
    sigma = torch.tensor([1.0, 2.0])
    with torch.no_grad():
        d_cond, d_uncond, d_guided = plain(z, sigma, torch.tensor([1, 2])), plain(z, sigma, torch.tensor([4])), guided(z, sigma, torch.tensor([1, 2]))
    assert_same(d_guided, d_uncond + 2.0 * (d_cond - d_uncond))
    with pytest.raises(ValueError, match="class-conditional"):
        plain(z, sigma)
    with pytest.raises(ValueError, match=r"lie in \[0, 5\)"):
        plain(z, sigma, torch.tensor([0, 5]))
    with pytest.raises(ValueError, match="integer class ids"):
        plain(z, sigma, torch.tensor([0.0, 1.0]))


# ---- latent models ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ldm_folder(tmp_path_factory):
    torch.manual_seed(0)
    vqvae = VQModel(in_channels=3, out_channels=3, latent_channels=3, num_vq_embeddings=16, vq_embed_dim=3,
                    down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, **AE_BLOCKS)
    scheduler = EulerDiscreteScheduler(final_sigmas_type="sigma_min", **SD_BETAS)
    return save_components(tmp_path_factory.mktemp("ldm"), unet=tiny_unet(), vqvae=vqvae, scheduler=scheduler)


def test_unconditional_ldm_sampling_and_decode_match_diffusers(ldm_folder, z):
    denoiser = load_latent_diffusion(ldm_folder, latent_scaling_factor=0.5)
    assert denoiser.shape == (3, 8, 8) and denoiser.image_shape == (3, 16, 16)
    sigmas = grid(denoiser.schedule)
    with torch.no_grad():
        latents = euler(denoiser, z * sigmas[0].float(), sigmas)
        images = denoiser.decode(latents)
    scheduler = EulerDiscreteScheduler.from_pretrained(ldm_folder, subfolder="scheduler")
    theirs = diffusers_euler(denoiser.net, scheduler, z * scheduler.init_noise_sigma, timesteps=TIMESTEPS)
    assert_same(latents, theirs)
    with torch.no_grad():
        expected = denoiser.autoencoder.decode(latents / 0.5).sample.clamp(-1, 1)
    torch.testing.assert_close(images, expected)
    assert images.shape == (2, 3, 16, 16) and images.abs().max() <= 1


def test_decode_is_differentiable_with_checkpointing(ldm_folder, z):
    denoiser = load_latent_diffusion(ldm_folder, gradient_checkpointing=True)
    latents = z.clone().requires_grad_()
    denoiser.decode(latents, clamp=False).sum().backward()
    assert latents.grad is not None and latents.grad.abs().sum() > 0
    with pytest.raises(ValueError, match=r"latents must have shape \[B, 3, 8, 8\]"):
        denoiser.decode(torch.zeros(1, 4, 8, 8))


def test_family_mismatch_errors(pixel_folder, ldm_folder):
    with pytest.raises(ValueError, match="vqvae .*use load_latent_diffusion"):
        load_pixel_diffusion(ldm_folder)
    with pytest.raises(ValueError, match="no autoencoder .*use load_pixel_diffusion"):
        load_latent_diffusion(pixel_folder)
    with pytest.raises(ValueError, match="not a Stable Diffusion v1.x pipeline"):
        load_stable_diffusion(ldm_folder)


def test_guided_dit_matches_dit_pipeline(tmp_path):
    torch.manual_seed(0)
    transformer = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                        num_layers=1, sample_size=8, patch_size=2, num_embeds_ada_norm=1000).eval()
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, **AE_BLOCKS)
    scheduler = DPMSolverMultistepScheduler(solver_order=2, final_sigmas_type="sigma_min")
    save_components(tmp_path, transformer=transformer, vae=vae, scheduler=scheduler)
    denoiser = load_latent_diffusion(tmp_path, guidance_scale=4.0)
    assert denoiser.condition_kind == "class" and denoiser.n_classes == 1000 and int(denoiser.unconditional) == 1000

    pipe = DiTPipeline(transformer=transformer, vae=vae, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    labels = [3, 7]
    expected = pipe(class_labels=labels, guidance_scale=4.0, num_inference_steps=5,
                    generator=torch.Generator().manual_seed(0), output_type="np").images
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))  # the pipeline's x_vp at sigma_max
    sigmas = grid(denoiser.schedule, pipe.scheduler.timesteps.tolist())
    with torch.no_grad():
        latents = dpmpp(denoiser, z / alpha(sigmas[0]), sigmas, order=2, cond=torch.tensor(labels))
        images = denoiser.decode(latents * alpha(sigmas[-1]))  # the pipeline decodes x_vp at sigma_min
    ours = ((images + 1) / 2).permute(0, 2, 3, 1).numpy()
    assert_same(ours, expected)


# ---- Stable Diffusion ------------------------------------------------------------------------------
def tiny_clip_tokenizer(folder) -> CLIPTokenizer:
    """A CLIP BPE tokenizer over lowercase letters with a few merges, written from scratch."""
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    tokens = ["<|startoftext|>", "<|endoftext|>", *letters, *(f"{c}</w>" for c in letters), "ca", "cat</w>", "do", "dog</w>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\nc a\nca t</w>\nd o\ndo g</w>\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=12)


@pytest.fixture(scope="module")
def sd_pipeline(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd")
    tokenizer = tiny_clip_tokenizer(root / "tokenizer_src")
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32,
                                                num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=12,
                                                bos_token_id=0, eos_token_id=1, pad_token_id=1))
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16,
                                attention_head_dim=4, norm_num_groups=4)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, **AE_BLOCKS)
    scheduler = EulerDiscreteScheduler(final_sigmas_type="sigma_min", **SD_BETAS)
    pipe = StableDiffusionPipeline(vae=vae.eval(), text_encoder=text_encoder.eval(), tokenizer=tokenizer, unet=unet.eval(),
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(root / "pipeline")
    return pipe, root / "pipeline"


def test_stable_diffusion_guided_euler_and_decode_match_pipeline(sd_pipeline):
    pipe, folder = sd_pipeline
    denoiser = load_stable_diffusion(folder)
    assert denoiser.guidance_scale == 7.5 and denoiser.condition_kind == "text"
    assert denoiser.shape == (4, 8, 8) and denoiser.image_shape == (3, 16, 16)
    prompts = ["a cat", "dog"]
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    final = {}

    def keep_latents(pipeline, step, timestep, tensors):
        final["latents"] = tensors["latents"]
        return tensors

    expected = pipe(prompts, timesteps=TIMESTEPS, guidance_scale=7.5, latents=z, output_type="pt",
                    callback_on_step_end=keep_latents).images
    cond = denoiser.encode_prompts(prompts)
    assert cond.shape == (2, 12, 16)
    sigmas = grid(denoiser.schedule)
    with torch.no_grad():
        latents = euler(denoiser, z * sigmas[0].float(), sigmas, cond=cond)
        images = denoiser.decode(latents)
    assert_same(latents, final["latents"])
    assert_same((images + 1) / 2, expected)


def test_stable_diffusion_negative_prompt_is_the_unconditional_branch(sd_pipeline):
    _, folder = sd_pipeline
    guided = load_stable_diffusion(folder, guidance_scale=3.0, negative_prompt="dog")
    plain = load_stable_diffusion(folder, guidance_scale=1.0)
    x, sigma = torch.randn(1, 4, 8, 8), torch.tensor([2.0])
    cond, negative = plain.encode_prompts(["a cat", "dog"]).chunk(2)
    with torch.no_grad():
        d_cond, d_neg, d_guided = plain(x, sigma, cond), plain(x, sigma, negative), guided(x, sigma, cond)
    assert_same(d_guided, d_neg + 3.0 * (d_cond - d_neg))
    with pytest.raises(ValueError, match="text-conditional"):
        plain(x, sigma)
    with pytest.raises(ValueError, match=r"prompt embeddings \[B, L, 16\]"):
        plain(x, sigma, torch.tensor([1]))
    with pytest.raises(ValueError, match="sequence of strings"):
        plain.encode_prompts("a cat")


def test_stable_diffusion_single_file_errors(tmp_path):
    with pytest.raises(MissingWeightsError, match="stable-diffusion-v1-5"):
        load_stable_diffusion(tmp_path / "v1-5-pruned-emaonly.safetensors")
    (tmp_path / "model.pkl").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=r"expected one of \('.safetensors', '.ckpt'\)"):
        load_stable_diffusion(tmp_path / "model.pkl")
    (tmp_path / "broken.safetensors").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="could not build Stable Diffusion v1.x from the single file"):
        load_stable_diffusion(tmp_path / "broken.safetensors", single_file_config=tmp_path)


# ---- prompts ---------------------------------------------------------------------------------------
def test_load_prompts_from_coco_json_and_text(tmp_path):
    coco = {"images": [], "annotations": [{"image_id": 1, "id": 10, "caption": " A cat. "},
                                          {"image_id": 2, "id": 11, "caption": "A dog."},
                                          {"image_id": 1, "id": 12, "caption": "Another cat."}]}
    (tmp_path / "captions_val2014.json").write_text(json.dumps(coco))
    assert load_prompts(tmp_path / "captions_val2014.json") == ["A cat.", "A dog."]
    assert load_prompts(tmp_path / "captions_val2014.json", one_per_image=False) == ["A cat.", "A dog.", "Another cat."]
    (tmp_path / "prompts.txt").write_text("a red car\n\n  a blue house  \n")
    assert load_prompts(tmp_path / "prompts.txt") == ["a red car", "a blue house"]


def test_load_prompts_rejects_wrong_formats(tmp_path):
    (tmp_path / "list.json").write_text(json.dumps(["a cat"]))
    with pytest.raises(ValueError, match="is not an MS-COCO captions JSON"):
        load_prompts(tmp_path / "list.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_prompts(tmp_path / "bad.json")
    (tmp_path / "prompts.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match="must be an MS-COCO captions .json or a .txt"):
        load_prompts(tmp_path / "prompts.csv")
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(ValueError, match="holds no prompts"):
        load_prompts(tmp_path / "empty.txt")
    with pytest.raises(FileNotFoundError, match="captions_val2014.json from https://cocodataset.org"):
        load_prompts(tmp_path / "missing.json")
