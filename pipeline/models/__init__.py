"""Models: the picklable ``ModelSpec`` (spec: plain data, no torch), the builder registry (registry), the builders
of every family (families: the embedded GMM and digits model, EDM pickles, diffusers, Stable Diffusion; registered
when a spec is first resolved), checkpoint digests (checkpoints) and the tiny random checkpoints of
``--smoke-test`` (smoke)."""
