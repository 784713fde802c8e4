"""ray_cluster.yaml: Ray's own validator, the fields the pipeline relies on, and its shell commands run for real
(the environment file every node sources, and the MLflow server the head starts)."""

import copy
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

REPO = Path(__file__).resolve().parents[1]
CONFIG_FILE = REPO / "ray_cluster.yaml"
DOCS_FILE = REPO / "docs" / "cluster.md"
VENV_BIN = str(Path(sys.executable).parent)


@pytest.fixture()
def config() -> dict:
    return yaml.safe_load(CONFIG_FILE.read_text())


def command_with(commands: list[str], *needles: str) -> str:
    matches = [c for c in commands if all(n in c for n in needles)]
    assert len(matches) == 1, f"expected one command containing {needles}, found {len(matches)}"
    return matches[0]


def run_bash(command: str, env: dict, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", command], env=env, capture_output=True, text=True, timeout=timeout,
                          check=True)


def base_env(home: Path) -> dict:
    return {"HOME": str(home), "PATH": f"{VENV_BIN}:/usr/bin:/bin", "MLFLOW_ENABLE_TELEMETRY": "false",
            "DO_NOT_TRACK": "1", "RAY_USAGE_STATS_ENABLED": "0"}


# --- Ray's own validation ------------------------------------------------------------------------


def test_config_passes_rays_cluster_config_validator(config):
    """What `ray up` does before talking to AWS: merge the provider defaults, then validate the schema."""
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    assert prepared["available_node_types"]["gpu_worker"]["max_workers"] == 8


@pytest.mark.parametrize("breakage", ["unknown_top_level_key", "fractional_gpu_resource", "bad_head_type"])
def test_validator_rejects_broken_variants(config, breakage):
    """The validation above is not vacuous: small mistakes in this file are caught."""
    broken = copy.deepcopy(config)
    if breakage == "unknown_top_level_key":
        broken["env"] = {"MLFLOW_TRACKING_URI": "http://head:5000"}
    elif breakage == "fractional_gpu_resource":
        broken["available_node_types"]["gpu_worker"]["resources"]["GPU"] = 0.5
    else:
        broken["head_node_type"] = "no_such_type"
    with pytest.raises((jsonschema.ValidationError, ValueError)):
        validate_config(prepare_config(broken))


# --- Fields the pipeline relies on ---------------------------------------------------------------


def test_node_types_give_a_cpu_head_and_autoscaling_gpu_workers(config):
    nodes = config["available_node_types"]
    head = nodes[config["head_node_type"]]
    assert head["resources"].get("CPU") == 0 and not head["resources"].get("GPU")
    workers = [n for name, n in nodes.items() if name != config["head_node_type"]]
    assert any(w["resources"].get("GPU", 0) >= 1 and w["max_workers"] > w.get("min_workers", 0) for w in workers)
    for node in nodes.values():
        assert node["node_config"]["ImageId"].startswith(("ami-", "resolve:ssm:"))  # not Ray's outdated default
    for worker in workers:  # workers read and write the S3 cache and Tune storage
        assert "IamInstanceProfile" in worker["node_config"]


def test_the_repository_is_mounted_and_installed_with_constraints(config):
    (remote, local), = config["file_mounts"].items()
    assert (REPO / local).resolve() == REPO and (REPO / "pyproject.toml").is_file()
    install = command_with(config["setup_commands"], "pip install", "-c ")
    constraints = re.search(r"-c (\S+)", install).group(1)
    assert constraints == f"{remote}/constraints.txt" and (REPO / "constraints.txt").is_file()
    assert f'"{remote}[models]"' in install and '"ray[default]"' in install
    assert ".gitignore" in config["rsync_filter"] and (REPO / ".gitignore").is_file()


def test_ray_start_commands_parse_with_the_installed_ray(config):
    from ray.scripts.scripts import start

    for commands in (config["head_start_ray_commands"], config["worker_start_ray_commands"]):
        line = command_with(commands, "ray start")
        args = shlex.split(line.split("ray start", 1)[1].replace("$RAY_HEAD_IP", "10.0.0.1"))
        start.make_context("start", args)  # raises on unknown or malformed options


# --- The shell commands, run for real ------------------------------------------------------------


def env_file_values(config: dict, home: Path, head_ip: str | None) -> dict:
    env = base_env(home) | ({"RAY_HEAD_IP": head_ip} if head_ip else {})
    write = command_with(config["setup_commands"], "~/.ld3_env", "printf")
    for _ in range(2):  # setup commands run again on every `ray up`
        run_bash(write, env)
    names = ["LD3_STORAGE", "LD3_CACHE_DIR", "LD3_STORAGE_DIR", "LD3_MLFLOW_PORT", "MLFLOW_BACKEND_STORE_URI",
             "MLFLOW_TRACKING_URI"]
    out = run_bash("source ~/.ld3_env && " + " && ".join(f'echo "${n}"' for n in names), env).stdout
    assert (home / ".bashrc").read_text().count("source ~/.ld3_env") == 1
    return dict(zip(names, out.splitlines()))


def test_setup_writes_shared_storage_and_tracking_uri_for_workers(config, tmp_path):
    values = env_file_values(config, tmp_path, head_ip="10.1.2.3")
    storage = values["LD3_STORAGE"]
    assert storage.startswith("s3://")
    assert values["LD3_CACHE_DIR"].startswith(storage + "/") and values["LD3_STORAGE_DIR"].startswith(storage + "/")
    assert values["MLFLOW_TRACKING_URI"] == f"http://10.1.2.3:{values['LD3_MLFLOW_PORT']}"
    assert values["MLFLOW_BACKEND_STORE_URI"] == f"sqlite:///{tmp_path}/mlflow/mlflow.db"


def test_setup_on_the_head_uses_its_own_address(config, tmp_path):
    from ray.util import get_node_ip_address

    values = env_file_values(config, tmp_path, head_ip=None)
    assert values["MLFLOW_TRACKING_URI"] == f"http://{get_node_ip_address()}:{values['LD3_MLFLOW_PORT']}"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def port_answers(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
            return True
    except OSError:
        return False


@pytest.mark.timeout(240)
def test_head_starts_an_mlflow_server_with_a_database_and_artifact_store(config, tmp_path):
    """The head's MLflow commands, with S3 swapped for a local folder: the server answers, runs land in the
    SQLite database, artifacts in the artifact destination, and a restart stops the old server."""
    import mlflow

    port = free_port()
    storage = tmp_path / "storage"
    env = base_env(tmp_path) | {"LD3_STORAGE": storage.as_uri(), "LD3_MLFLOW_PORT": str(port),
                                "MLFLOW_BACKEND_STORE_URI": f"sqlite:///{tmp_path}/mlflow/mlflow.db"}
    commands = config["head_start_ray_commands"]
    stop, start, wait = (command_with(commands, "kill"), command_with(commands, "mlflow server"),
                         command_with(commands, "/health"))
    assert "--backend-store-uri" in start and "--artifacts-destination" in start and "0.0.0.0" in start
    pid_file = tmp_path / "mlflow" / "server.pid"
    try:
        run_bash(stop, env)
        run_bash(start, env)
        run_bash(wait, env, timeout=150)
        client = mlflow.MlflowClient(tracking_uri=f"http://127.0.0.1:{port}")
        run = client.create_run(client.create_experiment("cluster-check"))
        client.log_param(run.info.run_id, "slack_radius", 0.03)
        client.log_text(run.info.run_id, '{"sigmas": [80.0, 0.002]}', "schedule.json")
        assert (tmp_path / "mlflow" / "mlflow.db").is_file()
        assert list(storage.rglob("schedule.json")), "artifact did not reach the artifact destination"
        run_bash(stop, env)  # what a second `ray up` does first
        for _ in range(50):
            if not port_answers(port):
                break
            time.sleep(0.2)
        assert not port_answers(port)
    finally:
        if pid_file.is_file():  # only the process group this test started
            try:
                os.killpg(int(pid_file.read_text()), signal.SIGKILL)
            except ProcessLookupError:
                pass


# --- The documented workflow matches the config and the study CLI --------------------------------


def documented_commands(program: str = "ray") -> list[str]:
    """Shell commands of the docs that start with ``program`` (continuation lines joined, comments cut)."""
    text = DOCS_FILE.read_text().replace("\\\n", " ")
    lines = [line.split("  #")[0].strip() for line in text.splitlines()]
    return [line for line in lines if line.startswith(program + " ")]


def test_documented_ray_commands_parse_with_the_installed_ray_cli():
    from ray.scripts.scripts import cli

    commands = documented_commands()
    assert {shlex.split(c)[1] for c in commands} >= {"up", "submit", "attach", "dashboard", "rsync-down", "down"}
    for command in commands:
        words = shlex.split(command)
        assert "ray_cluster.yaml" in words, command
        cli.commands[words[1]].make_context(words[1], words[2:])  # raises on unknown options or arguments


def test_documented_iam_setup_creates_the_workers_instance_profile(config):
    profile = config["available_node_types"]["gpu_worker"]["node_config"]["IamInstanceProfile"]["Name"]
    aws = " ".join(documented_commands("aws"))
    assert f"create-instance-profile --instance-profile-name {profile}" in aws
    assert f"role/{profile}" in aws  # the head may pass this role to the workers it launches


def documented_submissions() -> list[tuple[str, list[str]]]:
    """(study script, its arguments) of every documented `ray submit`."""
    submissions = []
    for command in documented_commands():
        words = shlex.split(command)
        if words[1] == "submit":
            script = next(w for w in words if w.endswith(".py"))
            submissions.append((script, words[words.index("--") + 1:] if "--" in words else []))
    assert submissions, "docs/cluster.md shows no `ray submit`"
    return submissions


def test_documented_study_flags_are_known_to_the_study_cli(config, tmp_path):
    import runpy

    values = env_file_values(config, tmp_path, head_ip="10.0.0.1")
    for script, script_args in documented_submissions():
        for name in re.findall(r"\$(\w+)", " ".join(script_args)):
            assert name in values, f"docs use ${name}, which the cluster's environment file does not define"
        parser = runpy.run_path(str(REPO / script))["SCRIPT"].parser()
        parser.parse_args(script_args)  # raises SystemExit on an unknown flag


def test_documented_studies_exist_and_their_checkpoints_are_on_every_node(config):
    import runpy

    from ld3.models.edm import EDM_RELEASE_URL

    setup = " ".join(config["setup_commands"])
    for script, _ in documented_submissions():
        assert (REPO / script).is_file(), f"docs submit {script}, which is not in the repository"
        default = Path(runpy.run_path(str(REPO / script))["SCRIPT"].default_checkpoint)
        # `ray submit` runs the script from the home folder, where the setup puts the file on every node
        assert f"mkdir -p ~/{default.parent} && cd ~/{default.parent}" in setup
        assert f"{EDM_RELEASE_URL}{default.name} &&" in setup and f"mv {default.name}.part {default.name}" in setup


def test_documented_paths_exist_on_the_head(config):
    from pipeline.cli import build_parser

    home = "/home/" + config["auth"]["ssh_user"]  # `ray submit` runs the study from the home folder
    assert build_parser("docs").get_default("exports_dir") == "exports"
    rsyncs = [shlex.split(c) for c in documented_commands() if c.startswith("ray rsync-down")]
    remote_paths = {words[3] for words in rsyncs}
    assert remote_paths == {f"{home}/exports", f"{home}/mlflow/mlflow.db"}
    assert "~/mlflow/mlflow.db" in command_with(config["setup_commands"], "MLFLOW_BACKEND_STORE_URI").replace(
        "$HOME", "~")
