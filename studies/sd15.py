"""LD3 on Stable Diffusion v1.5, text-to-image 512×512 with guidance scale 7.5.

    python studies/sd15.py --checkpoint checkpoints/stable-diffusion-v1-5 --prompts captions_val2014.json
    ray submit ray_cluster.yaml studies/sd15.py -- --address auto   # on a cluster (docs/cluster.md)
    python studies/sd15.py --smoke-test   # a tiny random CLIP + UNet + VAE pipeline, on the CPU, for CI

The checkpoint is a diffusers Stable Diffusion v1.x pipeline folder (or a single v1.x .safetensors file).
Prompts come from an MS-COCO captions JSON (one caption per image, in file order) or a text file with one
prompt per line: the first 25 train, the next 25 validate. The unconditional branch is the empty prompt.
Latents are 4×64×64, decoded to 512×512 for the loss; each network call is recomputed in the backward pass
(gradient checkpointing) so LD3 fits one GPU (ld3.models.base: ~9 GiB in float32).
Recipe: pipeline.model_studies.latent_study (UniPC bh2-3 and iPNDM-4 at NFE 4/5/6/7; teacher UniPC bh2-3,
NFE 20, time-uniform; train batch 1; rounds 2 + 3; LPIPS).
"""

from __future__ import annotations

import sys
from dataclasses import replace

from pipeline.model_studies import ModelStudy, SmokeCheckpoint, latent_study
from pipeline.models.spec import ModelSpec

_LATENT = latent_study("sd15", ModelSpec("stable_diffusion", "stable-diffusion-v1-5-cfg7.5",
                                         {"guidance_scale": 7.5, "gradient_checkpointing": True}))
STUDY = replace(
    _LATENT,
    teacher=replace(_LATENT.teacher, num_samples=50, batch_size=5),  # 25 + 25 prompts
    num_train=25,
    num_validation=25,
    trainer=replace(_LATENT.trainer, val_batch_size=5),
    search=replace(_LATENT.search, train_batch_sizes=(1,)),
    gpus_per_trial=1.0,
    asha_grace_epochs=2.0,  # phase 1 (two rounds)
    eval_batch_size=5,
)
SCRIPT = ModelStudy(
    study=STUDY,
    description=__doc__.splitlines()[0],
    env_var="LD3_SD15_CHECKPOINT",
    default_checkpoint="checkpoints/stable-diffusion-v1-5",
    how_to_get="on a machine with internet access run `huggingface-cli download stable-diffusion-v1-5/stable-diffusion-v1-5 "
               "--local-dir checkpoints/stable-diffusion-v1-5`",
    image_shape=(3, 512, 512),
    smoke_checkpoint=SmokeCheckpoint("tiny_stable_diffusion_pipeline"),
    prompts_env_var="LD3_SD15_PROMPTS",
    default_prompts="checkpoints/captions_val2014.json",  # annotations/ of https://cocodataset.org's 2014 captions
)
make_config = SCRIPT.make_config
main = SCRIPT.main

if __name__ == "__main__":
    sys.exit(main())
