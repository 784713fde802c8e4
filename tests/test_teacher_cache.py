"""Teacher cache: Ray-generated Parquet teacher data equals the in-process solve, is content-addressed,
published only when complete, and verified on load."""

from __future__ import annotations

import shutil
import sys
import threading
from dataclasses import replace
from pathlib import Path

import pytest
import ray
import torch

from pipeline.errors import CacheCorruptError, TeacherGenerationError
from pipeline.models.registry import LoadedModel, build_gmm, register_model_builder
from pipeline.models.spec import ModelSpec
from pipeline.teacher.cache import TeacherCache, cache_key, load_teacher
from pipeline.teacher.dataset import TeacherDataset
from pipeline.teacher.solve import TeacherConfig, solve_teacher

N = 10
CONFIG = TeacherConfig(
    nfe=8,
    num_samples=N,
    seed_offset=100,
    conditions=tuple(i % 4 for i in range(N)),
    keep_trajectory=True,
    batch_size=3,
    concurrency=2,
)
# Builders defined here reach the Ray actors by value (this test module is not importable there).
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
FAMILY = "test_gmm"  # the embedded GMM under a family the tests may re-register
register_model_builder(FAMILY, build_gmm, replace=True)
SPEC = ModelSpec(FAMILY, "gmm-seed0", {"seed": 0})


@pytest.fixture(scope="module")
def reference():
    """The same teacher solved in-process, all samples in one batch."""
    model = SPEC.build("cpu", CONFIG.torch_dtype)
    return solve_teacher(model, CONFIG, CONFIG.sample_seeds(), CONFIG.sample_conditions())


@pytest.fixture(scope="module")
def generated(local_ray, tmp_path_factory):
    """One dataset generated with 2 actors and batches of 3 (shared by the read-only tests)."""
    cache = TeacherCache(tmp_path_factory.mktemp("cache"))
    return cache, cache.get_or_generate(SPEC, CONFIG)


def assert_matches_reference(data, reference):
    assert torch.equal(data.sample_id, torch.arange(N))
    assert data.seed.tolist() == CONFIG.sample_seeds()
    assert data.condition.tolist() == list(CONFIG.conditions)
    for name in ("z", "y", "trajectory"):
        got, expected = getattr(data, name), getattr(reference, name)
        assert got.dtype == expected.dtype and torch.equal(got, expected), name
    assert torch.equal(data.trajectory_sigmas, reference.trajectory_sigmas)


# ---- key and configuration (no Ray) -------------------------------------------------------------


def test_key_changes_with_everything_that_changes_the_data_and_nothing_else():
    base = cache_key(SPEC, CONFIG)
    same_data = [
        replace(CONFIG, batch_size=7, concurrency=1, num_cpus_per_actor=2.0),
        replace(CONFIG, seeds=tuple(range(100, 100 + N)), seed_offset=0),
    ]
    for config in same_data:
        assert cache_key(SPEC, config) == base
    other_data = [
        replace(CONFIG, nfe=10),
        replace(CONFIG, solver="ipndm"),
        replace(CONFIG, order=2),
        replace(CONFIG, discretization_kwargs={"rho": 5.0}),
        replace(CONFIG, dtype="float64"),
        replace(CONFIG, keep_trajectory=False),
        replace(CONFIG, seed_offset=101),
        replace(CONFIG, conditions=tuple((i + 1) % 4 for i in range(N))),
        replace(CONFIG, conditions=None),
    ]
    other_models = [
        ModelSpec(FAMILY, "gmm-seed0", {"seed": 1}),
        ModelSpec(FAMILY, "gmm-seed0", {"seed": 0, "shape": [3, 4, 4]}),
        ModelSpec(FAMILY, "gmm-seed0", {"seed": 0}, checkpoint_digest="ab12"),
        ModelSpec("gmm", "gmm-seed0", {"seed": 0}),
    ]
    keys = [cache_key(SPEC, c) for c in other_data] + [cache_key(m, CONFIG) for m in other_models]
    assert base not in keys and len(set(keys)) == len(keys)


@pytest.mark.parametrize(
    ("changes", "names"),
    [
        ({"solver": "rk45"}, "rk45"),
        ({"nfe": 0}, "nfe"),
        ({"order": 7}, "order"),
        ({"dtype": "int8"}, "dtype"),
        ({"seeds": (1, 2)}, "seeds"),
        ({"conditions": (1, 2, 3)}, "conditions"),
        ({"conditions": (1, "cat") * 5}, "conditions"),
        ({"discretization": "cosine"}, "cosine"),
        ({"concurrency": 0}, "concurrency"),
    ],
)
def test_bad_config_is_rejected_with_a_message_naming_it(changes, names):
    with pytest.raises(ValueError, match=names):
        replace(CONFIG, **changes)


def test_model_spec_kwargs_must_be_json():
    with pytest.raises(ValueError, match="kwargs"):
        ModelSpec("gmm", "gmm-bad", {"means": torch.zeros(2)})


def test_split_is_by_sample_id(reference):
    data = TeacherDataset(
        sample_id=torch.arange(N), seed=torch.arange(N) + 100, z=reference.z, y=reference.y, trajectory=None,
        trajectory_sigmas=None, condition=torch.arange(N) % 4, metadata={},
    )  # fmt: skip
    train, valid = data.split(6, 3)
    assert train.sample_id.tolist() == list(range(6)) and valid.sample_id.tolist() == [6, 7, 8]
    assert torch.equal(valid.z, reference.z[6:9]) and valid.condition.tolist() == [2, 3, 0]
    with pytest.raises(ValueError, match="num_train"):
        data.split(N)


# ---- generation with Ray -----------------------------------------------------------------------------


def test_rows_equal_the_in_process_solve_bit_for_bit(generated, reference):
    cache, entry = generated
    assert not entry.hit and len(entry.files) == 4  # ceil(10 / 3) parts
    data = entry.load()
    assert_matches_reference(data, reference)
    # The trajectory starts at x_T = sigma_max z and follows the teacher's descending grid.
    assert torch.equal(data.trajectory[:, 0], 80.0 * data.z)
    assert data.trajectory_sigmas[0] == 80.0 and bool((data.trajectory_sigmas.diff() < 0).all())


def test_other_actor_count_batch_size_and_file_uri_give_identical_data(local_ray, generated, tmp_path, reference):
    _, first = generated
    config = replace(CONFIG, batch_size=10, concurrency=1)
    entry = TeacherCache(f"file://{tmp_path}").get_or_generate(SPEC, config)
    assert entry.key == first.key and entry.uri == f"file://{tmp_path}/{entry.key}" and len(entry.files) == 1
    assert (tmp_path / entry.key / "manifest.json").is_file()
    assert_matches_reference(entry.load(), reference)


def test_reading_back_gives_identical_tensors_and_metadata(generated):
    cache, entry = generated
    again = TeacherCache(cache.root).entry(entry.key)
    first, second = entry.load(), again.load()
    for name in ("sample_id", "seed", "z", "y", "trajectory", "trajectory_sigmas", "condition"):
        assert torch.equal(getattr(first, name), getattr(second, name)), name
    assert first.metadata == second.metadata == entry.manifest
    meta = entry.manifest
    assert meta["key"] == entry.key and meta["key_material"]["model"] == SPEC.describe()
    assert meta["columns"]["z"] == {"shape": [3, 8, 8], "dtype": "float32"}
    assert meta["columns"]["trajectory"]["shape"] == [8, 3, 8, 8] and len(meta["trajectory_sigmas"]) == 8
    assert {"torch", "pyarrow", "ray", "ld3", "ld3_source_sha256"} <= set(meta["versions"])


def test_ray_dataset_view_has_the_same_rows(generated):
    _, entry = generated
    data = entry.load()
    rows = sorted(entry.as_ray_dataset().take_all(), key=lambda r: r["sample_id"])
    assert [r["sample_id"] for r in rows] == list(range(N))
    assert torch.equal(torch.stack([torch.from_numpy(r["z"].copy()) for r in rows]), data.z)
    assert torch.equal(torch.stack([torch.from_numpy(r["y"].copy()) for r in rows]), data.y)


def _refusing_builder(**kwargs) -> LoadedModel:
    raise AssertionError("a cache hit must not build the model")


def test_second_request_is_a_hit_that_never_builds_the_model(generated):
    cache, entry = generated
    register_model_builder(FAMILY, _refusing_builder, replace=True)  # same spec and key, a model that cannot be built
    try:
        again = TeacherCache(cache.root).get_or_generate(SPEC, CONFIG)
        data = load_teacher(SPEC, CONFIG, root=cache.root)
    finally:
        register_model_builder(FAMILY, build_gmm, replace=True)
    assert again.hit and again.manifest == entry.manifest and data.metadata == entry.manifest


def _failing_on_one_batch(*, device, dtype, **kwargs) -> LoadedModel:
    model = build_gmm(device=device, dtype=dtype, **kwargs)

    def denoiser(x, sigma, cond=None):
        if x.shape[0] == 1:  # only the last batch (sample 9 alone) has one row: fail there, after others succeeded
            raise RuntimeError("injected actor failure")
        return model.denoiser(x, sigma, cond)

    return LoadedModel(denoiser=denoiser, schedule=model.schedule, shape=model.shape)


def test_failed_generation_publishes_nothing_and_the_next_request_regenerates(local_ray, tmp_path, reference):
    cache = TeacherCache(tmp_path)
    register_model_builder("test_flaky", _failing_on_one_batch, replace=True)
    spec = ModelSpec("test_flaky", "gmm-seed0", SPEC.kwargs)
    config = replace(CONFIG, concurrency=1)  # one actor; the one-row batch fails
    with pytest.raises(TeacherGenerationError, match="nothing was published") as failure:
        cache.get_or_generate(spec, config)
    assert "injected actor failure" in str(failure.value.__cause__)
    assert cache.lookup(spec, config) is None
    assert not list(tmp_path.rglob("manifest.json"))
    # A writer killed outright cannot clean up: plant what it would leave behind.
    leftover = tmp_path / cache_key(spec, config) / "attempt-killed" / "part-000000000.parquet"
    leftover.parent.mkdir(parents=True)
    leftover.write_bytes(b"PAR1 half a file")
    register_model_builder("test_flaky", build_gmm, replace=True)  # the fault is over; same spec, same key
    entry = cache.get_or_generate(spec, config)
    assert not entry.hit and not leftover.exists()
    assert len(list(Path(entry.folder).glob("attempt-*"))) == 1
    assert_matches_reference(entry.load(), reference)


def _prompt_gmm(*, device, dtype, **kwargs) -> LoadedModel:
    """The GMM conditioned on text: a stand-in encoder maps a prompt to class ``len(prompt) % 4``."""
    model = build_gmm(device=device, dtype=dtype, **kwargs)
    return replace(model, encode_condition=lambda prompts, device: torch.tensor([len(p) % 4 for p in prompts], device=device))


def test_concurrent_requests_for_one_key_generate_once(local_ray, tmp_path):
    register_model_builder("test_prompt_gmm", _prompt_gmm, replace=True)
    spec = ModelSpec("test_prompt_gmm", "gmm-seed0-prompts", {"seed": 0})
    prompts = ("a cat", "two dogs", "a red car", "sky")  # prompt conditions also travel through the cache
    config = TeacherConfig(num_samples=4, nfe=4, batch_size=4, conditions=prompts)
    cache = TeacherCache(tmp_path)
    entries: list = []
    threads = [threading.Thread(target=lambda: entries.append(cache.get_or_generate(spec, config))) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(e.hit for e in entries) == [False, True]
    assert entries[0].manifest == entries[1].manifest
    assert len(list((tmp_path / entries[0].key).glob("attempt-*"))) == 1
    data = entries[0].load()
    assert data.condition == prompts and data.metadata["condition"] == "prompt"
    assert torch.equal(data.y, solve_teacher(spec.build(), config, config.sample_seeds(), prompts).y)


# ---- corruption -----------------------------------------------------------------------------------------


@pytest.fixture
def copied(generated, tmp_path):
    """A private copy of the generated dataset, safe to damage."""
    cache, entry = generated
    shutil.copytree(Path(cache.base) / entry.key, tmp_path / entry.key)
    return TeacherCache(tmp_path).entry(entry.key)


def test_truncated_part_is_detected_and_named(copied):
    victim = Path(copied.files[1])
    victim.write_bytes(victim.read_bytes()[:-100])
    with pytest.raises(CacheCorruptError, match=f"{victim}.*truncated"):
        copied.load()
    with pytest.raises(CacheCorruptError, match=str(victim)):
        copied.as_ray_dataset()


def test_altered_part_is_detected_and_named(copied):
    victim = Path(copied.files[2])
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0x01  # one flipped bit, same size
    victim.write_bytes(bytes(data))
    with pytest.raises(CacheCorruptError, match=f"{victim}.*sha256"):
        copied.load()


def test_missing_part_and_damaged_manifest_are_detected(copied):
    Path(copied.files[0]).unlink()
    with pytest.raises(CacheCorruptError, match=str(copied.files[0])):
        copied.load()
    manifest = Path(copied.folder) / "manifest.json"
    manifest.write_text(manifest.read_text()[:50])
    with pytest.raises(CacheCorruptError, match=f"{manifest}.*unreadable"):
        TeacherCache(Path(copied.folder).parent).entry(copied.key)
