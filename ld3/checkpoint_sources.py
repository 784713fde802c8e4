"""Where the pretrained checkpoints come from, and the switch that lets a checkpoint run the code it embeds: plain
strings with no torch behind them, so a study script's ``--help`` and its errors name them without loading a model
library (``ld3.models.edm`` and ``ld3.models.stable_diffusion`` use them), and the error of a weights file that
is not on disk (``MissingWeightsError``, also ``ld3.losses.MissingWeightsError``)."""

EDM_RELEASE_URL = "https://nvlabs-fi-cdn.nvidia.com/edm/pretrained/"
SD_EXAMPLE_REPO = "stable-diffusion-v1-5/stable-diffusion-v1-5"  # a Stable Diffusion v1.x pipeline on the Hugging Face hub
TRUST_ENV_VAR = "LD3_TRUST_CHECKPOINT_CODE"  # "1": EDM pickles may run their embedded source (ld3.models.edm)
TRUST_FLAG = "--trust-checkpoint-code"  # the study scripts' flag that sets TRUST_ENV_VAR
WEIGHTS_DTYPE_NAMES = ("float32", "bfloat16", "float16")  # torch dtypes the diffusers families may load weights in


class MissingWeightsError(FileNotFoundError):
    """A pretrained weights file is not on disk (nothing is downloaded implicitly)."""
