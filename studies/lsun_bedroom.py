"""LD3 on LSUN-Bedroom 256×256 with CompVis' latent diffusion model (LDM-4, VQ-f4).

    python studies/lsun_bedroom.py --checkpoint checkpoints/ldm-lsun-bedroom-256   # or set LD3_LSUN_BEDROOM_CHECKPOINT
    ray submit ray_cluster.yaml studies/lsun_bedroom.py -- --address auto   # on a cluster (docs/cluster.md)
    python studies/lsun_bedroom.py --smoke-test   # a tiny random UNet + VQ autoencoder, on the CPU, for CI

The checkpoint is a diffusers pipeline folder: ``unet/`` (UNet2DModel on 3×64×64 latents), ``vqvae/``
(VQModel, decoding to 3×256×256) and ``scheduler/`` (1000-step discrete VP schedule). CompVis publishes the
model only in its own format (latent-diffusion's models/ldm/lsun_beds256); diffusers' script
``scripts/conversion_ldm_uncond.py`` converts it into such a folder. The teacher and the loss see decoded images.
Recipe: pipeline.model_studies.latent_study (UniPC bh2-3 and iPNDM-4 at NFE 4/5/6/7; teacher UniPC bh2-3,
NFE 20, time-uniform; 50 + 50 samples; train batch 1; rounds 2 + 3; LPIPS).
"""

from __future__ import annotations

import sys

from pipeline.model_studies import ModelStudy, SmokeCheckpoint, latent_study
from pipeline.models.spec import ModelSpec

STUDY = latent_study("lsun_bedroom", ModelSpec("diffusers_latent", "ldm-lsun-bedroom-256-vq-f4"))
SCRIPT = ModelStudy(
    study=STUDY,
    description=__doc__.splitlines()[0],
    env_var="LD3_LSUN_BEDROOM_CHECKPOINT",
    default_checkpoint="checkpoints/ldm-lsun-bedroom-256",
    how_to_get="convert CompVis latent-diffusion's lsun_beds256 checkpoint (VQ-f4) into a diffusers pipeline folder "
               "(unet/, vqvae/, scheduler/) with diffusers' scripts/conversion_ldm_uncond.py",
    image_shape=(3, 256, 256),
    smoke_checkpoint=SmokeCheckpoint("tiny_latent_pipeline"),
)
make_config = SCRIPT.make_config
main = SCRIPT.main

if __name__ == "__main__":
    sys.exit(main())
