"""LD3 on FFHQ 64×64 with EDM's VP model (the paper's results: FFHQ EDM 64²).

    python studies/ffhq.py --checkpoint edm-ffhq-64x64-uncond-vp.pkl   # or set LD3_FFHQ_CHECKPOINT
    ray submit ray_cluster.yaml studies/ffhq.py -- --address auto   # on a cluster (docs/cluster.md)
    python studies/ffhq.py --smoke-test   # a tiny random EDM-style network, on the CPU, for CI

The checkpoint is the EDM release pickle; it embeds Python source that runs when loaded, so it loads only
with --trust-checkpoint-code (or LD3_TRUST_CHECKPOINT_CODE=1): use it only for the official file.
Recipe: pipeline.model_studies.pixel_study (UniPC bh1-3 and iPNDM-4 at NFE 4/6/8/10; teacher UniPC-3,
NFE 20, EDM rho=7; 50 + 50 samples; LPIPS). A class-conditional pickle gets class labels (--class-labels).
"""

from __future__ import annotations

import sys

from ld3.checkpoint_sources import EDM_RELEASE_URL
from pipeline.model_studies import ModelStudy, SmokeCheckpoint, pixel_study
from pipeline.models.spec import ModelSpec

STUDY = pixel_study("ffhq", ModelSpec("edm", "edm-ffhq-64x64-uncond-vp"))
SCRIPT = ModelStudy(
    study=STUDY,
    description=__doc__.splitlines()[0],
    env_var="LD3_FFHQ_CHECKPOINT",
    default_checkpoint="checkpoints/edm-ffhq-64x64-uncond-vp.pkl",
    how_to_get=f"download edm-ffhq-64x64-uncond-vp.pkl from {EDM_RELEASE_URL} on a machine with internet access",
    image_shape=(3, 64, 64),
    smoke_checkpoint=SmokeCheckpoint("tiny_edm_pickle", {"image_shape": (3, 64, 64)}),
)
make_config = SCRIPT.make_config
main = SCRIPT.main

if __name__ == "__main__":
    sys.exit(main())
