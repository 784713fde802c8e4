"""The project's own trained diffusion model: class-conditional 8×8 handwritten digits.

Pretrained checkpoints cannot be downloaded everywhere this project runs, so it trains and ships a small
one, to show LD3 correcting the errors of a *trained* network on any machine (docs/digits.md):

- :mod:`ld3.digits.data`: scikit-learn's bundled 8×8 digits (1,797 images, 10 classes), scaled to [-1, 1],
  split once (seeded) into a training and a held-out part;
- :mod:`ld3.digits.networks`: the denoiser's UNet and the evaluation classifier, pure torch;
- :mod:`ld3.digits.checkpoint`: safetensors weights + JSON config, sha256-verified on load;
- :mod:`ld3.digits.denoiser`: the EDM-preconditioned denoiser ``D(x, σ, cond)`` (classifier-free guidance);
- :mod:`ld3.digits.quality`: a Fréchet distance in the classifier's feature space and its accuracy on
  class-conditional samples — an FID *analogue* for this domain, not FID;
- :mod:`ld3.digits.train`: ``python -m ld3.digits.train --out DIR`` retrains both networks (seeded).
"""
