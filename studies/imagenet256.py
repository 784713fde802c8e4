"""LD3 on class-conditional ImageNet 256×256 with a guided latent model (guidance scale 2.0).

    python studies/imagenet256.py --checkpoint checkpoints/DiT-XL-2-256   # or set LD3_IMAGENET256_CHECKPOINT
    ray submit ray_cluster.yaml studies/imagenet256.py -- --address auto   # on a cluster (docs/cluster.md)
    python studies/imagenet256.py --smoke-test   # a tiny random DiT + KL autoencoder, on the CPU, for CI

The paper's model is CompVis' LDM-4 ImageNet (cin256), which has no diffusers format. This study takes a
diffusers class-conditional latent pipeline folder instead: a DiT (``transformer/``, e.g.
facebook/DiT-XL-2-256 with its KL-f8 ``vae/``; null class = 1000) or a UNet2DModel with a class embedding
(give its unconditional label with --null-class). Classifier-free guidance uses scale 2.0 as in the paper,
so FIDs are not directly comparable with the paper's LDM numbers. Class labels: every class equally often
over the 100 teacher samples in a seeded random order (or --class-labels). The loss sees decoded images.
Recipe: pipeline.model_studies.latent_study (UniPC bh2-3 and iPNDM-4 at NFE 4/5/6/7; teacher UniPC bh2-3,
NFE 20, time-uniform; 50 + 50 samples; train batch 1; rounds 2 + 3; LPIPS).
"""

from __future__ import annotations

import sys

from pipeline.model_studies import ModelStudy, SmokeCheckpoint, latent_study
from pipeline.models.spec import ModelSpec

STUDY = latent_study("imagenet256", ModelSpec("diffusers_latent", "dit-xl-2-256-cfg2", {"guidance_scale": 2.0}))
SCRIPT = ModelStudy(
    study=STUDY,
    description=__doc__.splitlines()[0],
    env_var="LD3_IMAGENET256_CHECKPOINT",
    default_checkpoint="checkpoints/DiT-XL-2-256",
    how_to_get="on a machine with internet access run `huggingface-cli download facebook/DiT-XL-2-256 "
               "--local-dir checkpoints/DiT-XL-2-256` (or save another class-conditional latent pipeline there)",
    image_shape=(3, 256, 256),
    smoke_checkpoint=SmokeCheckpoint("tiny_latent_pipeline", {"class_conditional": True}),
)
make_config = SCRIPT.make_config
main = SCRIPT.main

if __name__ == "__main__":
    sys.exit(main())
