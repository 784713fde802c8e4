"""Model families of the pipeline (pipeline.models.families) and the study-script helpers
(pipeline.model_studies): checkpoint digests and their cache, family checks, builders on tiny random
checkpoints of every family, and the paper's defaults of the study scripts."""

from __future__ import annotations

import hashlib
import json
import os
import runpy
from collections import Counter
from pathlib import Path

import diffusers.models.modeling_utils  # noqa: F401 - binds diffusers' log handler to the session's stderr
import pytest
import torch

from ld3.losses import MissingWeightsError
from pipeline.model_studies import balanced_class_ids, parse_class_labels, smoke_variant
from pipeline.models.checkpoints import checkpoint_digest, checkpoint_spec, default_digest_cache
from pipeline.models.registry import MODEL_BUILDERS
from pipeline.models.smoke import (
    tiny_edm_pickle,
    tiny_latent_pipeline,
    tiny_pixel_pipeline,
    tiny_stable_diffusion_pipeline,
)
from pipeline.teacher.solve import TeacherConfig, solve_teacher

STUDIES_DIR = Path(__file__).resolve().parents[1] / "studies"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module", autouse=True)
def private_cache_home(tmp_path_factory):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("xdg")))
        yield


# ---- digests --------------------------------------------------------------------------------------
def test_file_digest_is_its_sha256_and_is_cached_by_path_size_and_mtime(tmp_path):
    weights = tmp_path / "net.pkl"
    weights.write_bytes(b"weights v1")
    cache = tmp_path / "digests.json"
    assert checkpoint_digest(weights, cache) == hashlib.sha256(b"weights v1").hexdigest()

    # A later call reads the cache: a planted value for the same path, size and mtime comes back unchanged.
    (stamp,) = json.loads(cache.read_text())
    cache.write_text(json.dumps({stamp: "planted"}))
    assert checkpoint_digest(weights, cache) == "planted"

    # New content (same size, new mtime) is hashed again, and the stale entry is replaced.
    weights.write_bytes(b"weights v2")
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))
    assert checkpoint_digest(weights, cache) == hashlib.sha256(b"weights v2").hexdigest()
    assert len(json.loads(cache.read_text())) == 1


def test_folder_digest_covers_the_component_files_only(tmp_path):
    folder = tmp_path / "pipe"
    (folder / "unet").mkdir(parents=True)
    (folder / "unet" / "config.json").write_text("{}")
    (folder / "unet" / "weights.safetensors").write_bytes(b"a")
    cache = tmp_path / "digests.json"
    first = checkpoint_digest(folder, cache)

    (folder / "v1-5-pruned.ckpt").write_bytes(b"not read by the folder loaders")
    (folder / ".cache").mkdir()
    (folder / ".cache" / "lock").write_text("")
    assert checkpoint_digest(folder, cache) == first

    (folder / "unet" / "weights.safetensors").write_bytes(b"b")
    assert checkpoint_digest(folder, cache) != first
    (folder / "unet" / "weights.safetensors").write_bytes(b"a")
    (folder / "unet" / "weights.safetensors").rename(folder / "unet" / "renamed.safetensors")
    assert checkpoint_digest(folder, cache) != first  # file names are part of the digest


def test_digest_errors_and_default_cache_location(tmp_path):
    with pytest.raises(MissingWeightsError, match="not found"):
        checkpoint_digest(tmp_path / "missing.pkl", tmp_path / "d.json")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no component files"):
        checkpoint_digest(tmp_path / "empty", tmp_path / "d.json")
    assert default_digest_cache() == Path(os.environ["XDG_CACHE_HOME"]) / "ld3" / "checkpoint-digests.json"


# ---- specs and builders ---------------------------------------------------------------------------
def test_the_paper_families_are_registered():
    assert {"edm", "diffusers_pixel", "diffusers_latent", "stable_diffusion"} <= set(MODEL_BUILDERS)


def test_checkpoint_spec_records_path_digest_and_options():
    pickle_file = tiny_edm_pickle((3, 8, 8))
    spec = checkpoint_spec("edm", pickle_file, model_id="tiny", autocast_bf16=True)
    assert spec.checkpoint_digest == hashlib.sha256(pickle_file.read_bytes()).hexdigest()
    assert dict(spec.kwargs) == {"checkpoint": str(pickle_file.resolve()), "autocast_bf16": True}
    loaded = spec.build()
    assert loaded.shape == (3, 8, 8) and loaded.decode is None and loaded.denoiser.autocast_bf16
    assert checkpoint_spec("edm", pickle_file).model_id == "edm-network-snapshot-tiny"


def test_checkpoint_spec_rejects_the_wrong_kind_of_checkpoint(tmp_path):
    with pytest.raises(ValueError, match="is a folder, but the edm family needs an EDM network pickle file"):
        checkpoint_spec("edm", tiny_pixel_pipeline())
    with pytest.raises(ValueError, match="must be a diffusers pipeline folder, got the file"):
        checkpoint_spec("diffusers_latent", tiny_edm_pickle((3, 8, 8)))
    with pytest.raises(MissingWeightsError, match="edm-ffhq-64x64-uncond-vp.pkl"):
        checkpoint_spec("edm", tmp_path / "edm-ffhq-64x64-uncond-vp.pkl")
    with pytest.raises(ValueError, match="unknown checkpoint family 'gmm'"):
        checkpoint_spec("gmm", tmp_path)


def test_pixel_and_latent_builders_wire_decode_memory_options_and_weight_dtype():
    pixel = checkpoint_spec("diffusers_pixel", tiny_pixel_pipeline(), gradient_checkpointing=True).build()
    assert pixel.decode is None and pixel.denoiser.gradient_checkpointing and pixel.shape == (3, 8, 8)

    latent = checkpoint_spec("diffusers_latent", tiny_latent_pipeline(), weights_dtype="bfloat16").build()
    assert latent.denoiser.net.dtype == torch.bfloat16 and latent.decode == latent.denoiser.decode
    x = torch.randn(2, *latent.shape)
    with torch.no_grad():
        images = latent.decode(latent.denoiser(x, torch.tensor([1.0, 3.0])))
    assert images.dtype == torch.float32 and images.shape == (2, 3, 16, 16)
    with pytest.raises(ValueError, match="weights_dtype must be one of"):
        checkpoint_spec("diffusers_latent", tiny_latent_pipeline(), weights_dtype="int8").build()


def test_class_conditional_latent_model_guides_and_takes_class_ids():
    model = checkpoint_spec("diffusers_latent", tiny_latent_pipeline(class_conditional=True), guidance_scale=2.0).build()
    cond = model.encode_condition([3, 7], "cpu")
    assert cond.dtype == torch.long and model.denoiser.guidance_scale == 2.0
    with pytest.raises(ValueError, match="integer class ids"):
        model.encode_condition(["a cat"], "cpu")


def test_stable_diffusion_teacher_solve_from_prompt_text():
    model = checkpoint_spec("stable_diffusion", tiny_stable_diffusion_pipeline()).build()
    embeddings = model.encode_condition(["a cat", "a dog"], "cpu")
    assert embeddings.shape == (2, 12, 16) and model.denoiser.guidance_scale == 7.5
    config = TeacherConfig(solver="unipc_bh2", nfe=4, discretization="time_uniform", num_samples=2, conditions=("a cat", "a dog"))
    batch = solve_teacher(model, config, seeds=[0, 1], conditions=["a cat", "a dog"])
    assert batch.z.shape == (2, 4, 8, 8) and batch.y.shape == (2, 3, 16, 16) and batch.y.abs().max() <= 1
    with pytest.raises(ValueError, match="sequence of strings"):
        model.encode_condition([1, 2], "cpu")


# ---- study-script helpers -------------------------------------------------------------------------
def test_balanced_class_ids_use_every_class_equally_often():
    ids = balanced_class_ids(25, 10, seed=0)
    assert set(Counter(ids).values()) == {2, 3} and set(ids) == set(range(10))
    assert ids == balanced_class_ids(25, 10, seed=0) and ids != balanced_class_ids(25, 10, seed=1)


def test_class_labels_flag_cycles_and_validates():
    assert parse_class_labels("1,5", 5, 10) == (1, 5, 1, 5, 1)
    for bad in ("", "a", "10", "-1"):
        with pytest.raises(ValueError, match="--class-labels"):
            parse_class_labels(bad, 5, 10)


def study(name: str):
    return runpy.run_path(str(STUDIES_DIR / f"{name}.py"))["STUDY"]


def test_study_scripts_carry_the_papers_defaults():
    for name in ("cifar10", "afhqv2", "ffhq"):
        s = study(name)
        assert [(c.name, c.order) for c in s.solvers] == [("unipc_bh1", 3), ("ipndm", 4)] and s.nfes == (4, 6, 8, 10)
        assert (s.teacher.solver, s.teacher.order, s.teacher.nfe, s.teacher.discretization) == ("unipc_bh1", 3, 20, "edm_rho")
        assert (s.num_train, s.num_validation, s.trainer.loss) == (50, 50, "lpips")
        assert (s.trainer.rounds_v1, s.trainer.rounds_v2, s.trainer.train_batch_size) == (2, 5, 2)
        assert s.trainer.derive(10, (3, 32, 32)).lr2 == pytest.approx(0.01)  # 0.1 / N
    for name in ("lsun_bedroom", "imagenet256", "sd15"):
        s = study(name)
        assert [c.name for c in s.solvers] == ["unipc_bh2", "ipndm"] and s.nfes == (4, 5, 6, 7)
        assert (s.trainer.rounds_v1, s.trainer.rounds_v2, s.trainer.train_batch_size) == (2, 3, 1)
        assert s.search.lr2_coef[0] < 0.001 < s.search.lr2_coef[1] and s.trainer.loss == "lpips"
    assert study("imagenet256").model.kwargs["guidance_scale"] == 2.0
    sd = study("sd15")
    assert sd.model.kwargs["guidance_scale"] == 7.5 and (sd.num_train, sd.num_validation, sd.teacher.num_samples) == (25, 25, 50)


def test_smoke_variant_is_tiny_and_runs_on_cpu():
    smoke = smoke_variant(study("sd15"))
    assert len(smoke.solvers) == 1 and len(smoke.nfes) == 1 and smoke.num_trials == 2
    assert smoke.trainer.loss == "l2" and smoke.gpus_per_trial == 0 and smoke.teacher.num_gpus_per_actor == 0
    assert smoke.teacher.num_samples == smoke.num_train + smoke.num_validation == 8
