"""ray_cluster.yaml and ray_cluster.local.yaml: Ray's own validator, the fields the pipeline relies on, and their
shell commands run for real (cluster/setup_node.sh writing the environment file every node sources, and
cluster/start_mlflow.sh starting the head's MLflow server). tests/test_cluster_launcher.py runs `ray up`."""

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
LOCAL_CONFIG_FILE = REPO / "ray_cluster.local.yaml"
SETUP_SCRIPT = "~/ld3/cluster/setup_node.sh"
MLFLOW_SCRIPT = "~/ld3/cluster/start_mlflow.sh"
DOCS_FILE = REPO / "docs" / "cluster.md"
VENV_BIN = str(Path(sys.executable).parent)


@pytest.fixture()
def config() -> dict:
    return yaml.safe_load(CONFIG_FILE.read_text())


@pytest.fixture(params=[CONFIG_FILE, LOCAL_CONFIG_FILE], ids=["aws", "local"])
def any_config(request) -> dict:
    return yaml.safe_load(request.param.read_text())


def command_with(commands: list[str], *needles: str) -> str:
    matches = [c for c in commands if all(n in c for n in needles)]
    assert len(matches) == 1, f"expected one command containing {needles}, found {len(matches)}"
    return matches[0]


def run_bash(command: str, env: dict, timeout: float = 60) -> subprocess.CompletedProcess:
    result = subprocess.run(["bash", "-c", command], env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{command} failed:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}"
    return result


def base_env(home: Path) -> dict:
    return {"HOME": str(home), "PATH": f"{VENV_BIN}:/usr/bin:/bin", "MLFLOW_ENABLE_TELEMETRY": "false",
            "DO_NOT_TRACK": "1", "RAY_USAGE_STATS_ENABLED": "0"}


# --- Ray's own validation ------------------------------------------------------------------------


def test_config_passes_rays_cluster_config_validator(config):
    """What `ray up` does before talking to AWS: merge the provider defaults, then validate the schema."""
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    assert prepared["available_node_types"]["gpu_worker"]["max_workers"] == 8


def test_local_config_passes_rays_cluster_config_validator():
    """The on-premise config, prepared as `ray up` does: one node type, as many workers as listed IPs."""
    local = yaml.safe_load(LOCAL_CONFIG_FILE.read_text())
    prepared = prepare_config(copy.deepcopy(local))
    validate_config(prepared)
    (node_type,) = prepared["available_node_types"].values()
    assert node_type["max_workers"] == len(local["provider"]["worker_ips"]) > 0
    assert local["auth"]["ssh_user"] and local["auth"]["ssh_private_key"]


def test_both_configs_share_the_study_setup(config):
    """The same scripts, mounted the same way, prepare the nodes and the head of both clusters."""
    local = yaml.safe_load(LOCAL_CONFIG_FILE.read_text())
    for cluster in (config, local):
        assert [c.split("bash ", 1)[-1] for c in cluster["setup_commands"]] == [
            "~/ld3/cluster/setup_node.sh", "~/ld3/cluster/fetch_weights.sh"]
        assert f"bash {MLFLOW_SCRIPT}" in cluster["head_start_ray_commands"]
        assert cluster["rsync_filter"] == config["rsync_filter"]
        assert cluster["rsync_exclude"] == config["rsync_exclude"]
    (aws_mount, _), = config["file_mounts"].items()
    (local_mount, _), = local["file_mounts"].items()
    assert aws_mount == "/home/" + config["auth"]["ssh_user"] + "/ld3" and local_mount == "~/ld3"


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


def test_the_repository_is_mounted_and_installed_with_constraints(any_config):
    (remote, local), = any_config["file_mounts"].items()
    assert (REPO / local).resolve() == REPO and (REPO / "pyproject.toml").is_file()
    assert remote.endswith("/ld3") and command_with(any_config["setup_commands"], SETUP_SCRIPT)
    script = (REPO / "cluster" / "setup_node.sh").read_text()
    assert 'pip install -q -c "$repo/constraints.txt" "$repo[models]" "ray[default]"' in script
    assert ".gitignore" in any_config["rsync_filter"] and (REPO / ".gitignore").is_file()


def test_ray_start_commands_parse_with_the_installed_ray(any_config):
    from ray.scripts.scripts import start

    for commands in (any_config["head_start_ray_commands"], any_config["worker_start_ray_commands"]):
        line = command_with(commands, "ray start")
        args = shlex.split(line.split("ray start", 1)[1].replace("$RAY_HEAD_IP", "10.0.0.1"))
        start.make_context("start", args)  # raises on unknown or malformed options


# --- The shell commands, run for real ------------------------------------------------------------


def with_settings(command: str, script: str, settings: str) -> str:
    """A YAML command that runs ``script``, with ``settings`` (VAR=value ...) given after the YAML's own."""
    return command.replace(f"bash {script}", f"{settings} bash {script}")


def env_file_values(config: dict, home: Path, head_ip: str | None) -> dict:
    """Run the config's setup command on a fake node (its home is ``home``, the repository mounted at ~/ld3,
    this test's venv already complete) and read back the environment file it wrote."""
    env = base_env(home) | ({"RAY_HEAD_IP": head_ip} if head_ip else {})
    (home / "ld3").symlink_to(REPO)
    setup = with_settings(command_with(config["setup_commands"], SETUP_SCRIPT), SETUP_SCRIPT,
                          f"LD3_INSTALL=no LD3_VENV={sys.prefix}")
    for _ in range(2):  # setup commands run again on every `ray up`
        run_bash(setup, env)
    names = ["LD3_STORAGE", "LD3_CACHE_DIR", "LD3_STORAGE_DIR", "LD3_MLFLOW_PORT", "MLFLOW_BACKEND_STORE_URI",
             "MLFLOW_TRACKING_URI", "PYTHONPATH"]
    out = run_bash("source ~/.ld3_env && " + " && ".join(f'echo "${n}"' for n in names), env).stdout
    bashrc = (home / ".bashrc").read_text()
    assert bashrc.count("source ~/.ld3_env") == 1 and bashrc.count(f"source {sys.prefix}/bin/activate") == 1
    return dict(zip(names, out.splitlines(), strict=True))


def test_setup_without_storage_fails_with_a_clear_message(tmp_path):
    (tmp_path / "ld3").symlink_to(REPO)
    result = subprocess.run(["bash", "-c", f"LD3_INSTALL=no bash {SETUP_SCRIPT}"], env=base_env(tmp_path),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and "set LD3_STORAGE" in result.stderr
    assert not (tmp_path / ".ld3_env").exists()


def test_local_setup_points_every_node_at_the_shared_folder(tmp_path):
    local = yaml.safe_load(LOCAL_CONFIG_FILE.read_text())
    values = env_file_values(local, tmp_path, head_ip=local["provider"]["head_ip"])
    storage = values["LD3_STORAGE"]
    assert storage.startswith("/") and values["LD3_CACHE_DIR"] == storage + "/teacher-cache"
    assert values["MLFLOW_TRACKING_URI"] == f"http://{local['provider']['head_ip']}:{values['LD3_MLFLOW_PORT']}"
    assert values["PYTHONPATH"] == f"{tmp_path}/ld3"  # the synced checkout is the code that runs


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
    """cluster/start_mlflow.sh with S3 swapped for a local folder and a head with a public address: the
    server answers requests addressed to the head, runs land in the SQLite database, artifacts in the
    artifact destination, and a restart (the next `ray up`) stops the old server."""
    import mlflow

    port = free_port()
    storage = tmp_path / "storage"
    (tmp_path / "ld3").symlink_to(REPO)
    env = base_env(tmp_path) | {"LD3_STORAGE": storage.as_uri(), "LD3_MLFLOW_PORT": str(port),
                                "MLFLOW_BACKEND_STORE_URI": f"sqlite:///{tmp_path}/mlflow/mlflow.db",
                                "MLFLOW_TRACKING_URI": f"http://192.0.2.2:{port}"}  # not private: allowed explicitly
    start = command_with(config["head_start_ray_commands"], MLFLOW_SCRIPT)
    pid_file = tmp_path / "mlflow" / "server.pid"
    first_group = None
    try:
        run_bash(start, env, timeout=200)
        first_group = int(pid_file.read_text())
        client = mlflow.MlflowClient(tracking_uri=f"http://127.0.0.1:{port}")
        run = client.create_run(client.create_experiment("cluster-check"))
        client.log_param(run.info.run_id, "slack_radius", 0.03)
        client.log_text(run.info.run_id, '{"sigmas": [80.0, 0.002]}', "schedule.json")
        assert (tmp_path / "mlflow" / "mlflow.db").is_file()
        assert list(storage.rglob("schedule.json")), "artifact did not reach the artifact destination"
        request = urllib.request.Request(f"http://127.0.0.1:{port}/api/2.0/mlflow/experiments/search"
                                         "?max_results=5", headers={"Host": f"192.0.2.2:{port}"})
        with urllib.request.urlopen(request, timeout=10) as response:  # as workers address the head
            assert b"cluster-check" in response.read()
        run_bash(start, env, timeout=200)  # what a second `ray up` does
        assert int(pid_file.read_text()) != first_group and port_answers(port)
        for _ in range(50):
            try:
                os.killpg(first_group, 0)
            except ProcessLookupError:
                break
            time.sleep(0.2)
        else:
            pytest.fail("the restart left the first server running")
    finally:
        for group in {first_group, int(pid_file.read_text()) if pid_file.is_file() else None} - {None}:
            try:  # only the process groups this test started
                os.killpg(group, signal.SIGKILL)
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
        assert {"ray_cluster.yaml", "ray_cluster.local.yaml"} & set(words), command
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

    from pipeline.cli import build_parser

    values = env_file_values(config, tmp_path, head_ip="10.0.0.1")
    for script, script_args in documented_submissions():
        for name in re.findall(r"\$(\w+)", " ".join(script_args)):
            assert name in values, f"docs use ${name}, which the cluster's environment file does not define"
        study = runpy.run_path(str(REPO / script))
        parser = study["SCRIPT"].parser() if "SCRIPT" in study else build_parser(script)  # the GMM: plain CLI
        parser.parse_args(script_args)  # raises SystemExit on an unknown flag


def test_documented_studies_exist_and_their_checkpoints_are_on_every_node(any_config):
    import runpy

    from ld3.models.edm import EDM_RELEASE_URL

    assert command_with(any_config["setup_commands"], "~/ld3/cluster/fetch_weights.sh")
    fetches = (REPO / "cluster" / "fetch_weights.sh").read_text().replace("\\\n", " ")
    for script, _ in documented_submissions():
        assert (REPO / script).is_file(), f"docs submit {script}, which is not in the repository"
        study = runpy.run_path(str(REPO / script))
        if "SCRIPT" not in study:  # the GMM is built in: no weights
            continue
        default = Path(study["SCRIPT"].default_checkpoint)
        # `ray submit` runs the script from the home folder, where the setup puts the file on every node
        assert re.search(rf"fetch {re.escape(EDM_RELEASE_URL + default.name)}\s+~/{re.escape(str(default))}\n",
                         fetches), f"cluster/fetch_weights.sh does not put {default} on the nodes"


def test_documented_paths_exist_on_the_head(config):
    from pipeline.cli import build_parser

    home = "/home/" + config["auth"]["ssh_user"]  # `ray submit` runs the study from the home folder
    assert build_parser("docs").get_default("exports_dir") == "exports"
    rsyncs = [shlex.split(c) for c in documented_commands()
              if c.startswith("ray rsync-down ray_cluster.yaml")]
    remote_paths = {words[3] for words in rsyncs}
    assert remote_paths == {f"{home}/exports", f"{home}/mlflow/mlflow.db"}
    assert "sqlite:///$HOME/mlflow/mlflow.db" in (REPO / "cluster" / "setup_node.sh").read_text()
