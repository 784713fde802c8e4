"""Models: the picklable ``ModelSpec`` and its builder registry (registry), the builders of every family
(families: the embedded GMM and digits model, EDM pickles, diffusers, Stable Diffusion), checkpoint digests
(checkpoints) and the tiny random checkpoints of ``--smoke-test`` (smoke).

Importing the package registers every family's builder."""

from pipeline.models import families  # noqa: F401 - registers the builders of the paper's families
