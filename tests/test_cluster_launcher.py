"""The user's cluster commands run for real: `ray up`, `ray submit` of the GMM smoke study and `ray down` of
the README, on ray_cluster.local.yaml (Ray's on-premise provider), with this machine as the head over SSH.

The test starts its own sshd for root on a free port of 127.0.0.1 (its own config, keys and home folder; the
system's sshd and root's ~/.ssh are untouched) inside a PID namespace of its own, so that the `ray stop` of
`ray up` and `ray down` sees only this head's processes (outside one, it stops every Ray on the machine),
and killing the namespace's first process ends everything started over SSH (Ray head, MLflow server). The
concrete config keeps ray_cluster.local.yaml's commands and only overrides settings: the head, the login,
this run's venv and checkout instead of a download, tmp folders, free ports."""

import os
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from hashlib import sha256
from pathlib import Path

import psutil
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
LOCAL_CONFIG = REPO / "ray_cluster.local.yaml"
README = REPO / "README.md"
VENV = Path(sys.prefix)
RAY = str(Path(sys.executable).parent / "ray")
SSHD = shutil.which("sshd") or "/usr/sbin/sshd"
TOOLS = (SSHD, "ssh", "ssh-keygen", "rsync", "nc", "unshare", "curl")
QUIET = {"RAY_USAGE_STATS_ENABLED": "0", "MLFLOW_ENABLE_TELEMETRY": "false", "DO_NOT_TRACK": "1"}
STEP_TIMEOUT_S = 420

missing = [tool for tool in TOOLS if not shutil.which(tool)]
pytestmark = [
    pytest.mark.skipif(bool(missing), reason=f"needs {', '.join(missing)}: apt-get install -y openssh-server "
                                             "rsync netcat-openbsd curl (as .ci/run does)"),
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run sshd in a PID namespace of its own"),
    pytest.mark.skipif(not missing and subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", "true"],
                                                      capture_output=True).returncode != 0,
                       reason="PID namespaces are not permitted here (unshare --pid fails)"),
]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run(command: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(command, check=True, capture_output=True, text=True, **kwargs)


def wait_for_port(port: int, process: subprocess.Popen, log: Path, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, f"sshd exited: {log.read_text()[-2000:]}"
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    pytest.fail(f"sshd did not listen on port {port}: {log.read_text()[-2000:]}")


def kill_by_pid(processes: list[psutil.Process]) -> None:
    for process in processes:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(processes, timeout=10)


def ssh_clients_of(port: int) -> list[psutil.Process]:
    """The launcher's SSH connections through the proxy to ``port`` (ControlMaster clients outlive a command)."""
    needle = f"nc 127.0.0.1 {port}"
    return [p for p in psutil.process_iter(["cmdline"]) if needle in " ".join(p.info["cmdline"] or [])]


def namespace_processes(unshare: subprocess.Popen) -> list[psutil.Process]:
    """The head's processes: sshd (the namespace's first process) and everything started over SSH."""
    try:
        return psutil.Process(unshare.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


@pytest.fixture()
def ssh_head():
    """sshd for root on a free port of 127.0.0.1, with a key made here, in its own PID namespace.

    The namespace is the head "machine": `ray stop` (run by `ray up` and `ray down`) sees and stops only the
    processes in it, and killing its first process ends all of them. Sessions get a home folder of their own
    (HOME and the working folder), so nothing is written to root's real home.
    """
    root = Path(tempfile.mkdtemp(prefix="ld3-up-"))  # short: Ray's socket paths live below it
    home = root / "home"
    home.mkdir()
    (home / ".profile").write_text('cd "$HOME"\n')  # a login starts in the home folder, as on a real node
    (root / "ray").mkdir()
    port = free_port()
    cluster_name = f"ld3-test-{os.getpid()}"
    for name in ("client_key", "host_key"):
        run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", name, "-f", str(root / name)])
    shutil.copy(root / "client_key.pub", root / "authorized_keys")
    config = root / "sshd_config"
    config.write_text(f"""Port {port}
ListenAddress 127.0.0.1
HostKey {root}/host_key
PidFile {root}/sshd.pid
AuthorizedKeysFile {root}/authorized_keys
AllowUsers root
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
SetEnv HOME={home} RAY_TMPDIR={root}/ray
""")  # RAY_TMPDIR: this head's `ray_current_cluster`, what `--address auto` reads, is its own
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege separation folder
    log = root / "sshd.log"
    unshare = subprocess.Popen(["unshare", "--pid", "--fork", "--mount-proc", SSHD, "-D", "-e", "-f", str(config)],
                               stdout=subprocess.DEVNULL, stderr=log.open("w"))
    try:
        wait_for_port(port, unshare, log)
        yield {"root": root, "home": home, "port": port, "key": root / "client_key", "unshare": unshare,
               "cluster_name": cluster_name}
    finally:
        kill_by_pid(namespace_processes(unshare)[:1])  # the namespace's first process: the kernel ends the rest
        unshare.wait(timeout=30)
        kill_by_pid(ssh_clients_of(port))
        shutil.rmtree(root, ignore_errors=True)
        for control_dir in Path("/tmp").glob(f"ray_ssh_*/{sha256(cluster_name.encode()).hexdigest()[:10]}"):
            shutil.rmtree(control_dir, ignore_errors=True)  # the launcher's SSH ControlPath folder for this cluster


def ray_processes(unshare: subprocess.Popen) -> list[list[str]]:
    """Command lines of the head's Ray daemons."""
    commands = []
    for process in namespace_processes(unshare):
        try:
            commands.append(process.cmdline())
        except psutil.NoSuchProcess:
            pass
    return [c for c in commands if any(name in " ".join(c) for name in ("raylet", "gcs_server"))]


def concrete_config(template: dict, head: dict, ports: dict) -> dict:
    """ray_cluster.local.yaml for this machine: same commands, this run's settings."""
    config = yaml.safe_load(yaml.safe_dump(template))
    root = head["root"]
    config["cluster_name"] = head["cluster_name"]
    config["provider"].update(head_ip="127.0.0.1", worker_ips=[])
    config["auth"] = {"ssh_user": "root", "ssh_private_key": str(head["key"]),
                      "ssh_proxy_command": f"nc 127.0.0.1 {head['port']}"}  # the launcher has no SSH port key
    settings = (f"LD3_STORAGE={root}/storage LD3_VENV={VENV} LD3_INSTALL=no "
                f"LD3_MLFLOW_PORT={ports['mlflow']}")
    setup = "bash ~/ld3/cluster/setup_node.sh"
    assert sum(setup in c for c in config["setup_commands"]) == 1
    config["setup_commands"] = [c.replace(setup, f"{settings} {setup}") for c in config["setup_commands"]
                                if "fetch_weights.sh" not in c]  # no network here; the GMM needs no weights
    ray_ports = (f"--port={ports['gcs']} --dashboard-port={ports['dashboard']} "
                 f"--dashboard-agent-listen-port={ports['agent']}")  # later options win: free ports here
    starts = [c for c in config["head_start_ray_commands"] if "ray start --head" in c]
    assert len(starts) == 1
    config["head_start_ray_commands"] = [f"{c} {ray_ports}" if c in starts else c
                                         for c in config["head_start_ray_commands"]]
    return config


def readme_commands() -> dict[str, list[str]]:
    """The README's `ray up`, GMM `ray submit` and `ray down` lines (run with either cluster file)."""
    section = README.read_text().split("## On a cluster", 1)[1].split("\n## ", 1)[0]
    commands = {}
    lines = [line.split("  #")[0] for line in section.replace("\\\n", " ").splitlines()]
    for words in (shlex.split(line) for line in lines if line.startswith("ray ")):
        if "ray_cluster.yaml" in words and (words[1] != "submit" or "studies/gmm.py" in words):
            commands[words[1]] = words[1:]
    assert {"up", "submit", "down"} <= commands.keys(), "README shows no ray up, GMM ray submit and ray down"
    return commands


def launcher(words: list[str], config_file: Path, head: dict, timeout: float) -> str:
    """A README `ray` command with the concrete local config for the README's cluster file, answered `-y`."""
    args = [str(config_file) if w == "ray_cluster.yaml" else w for w in words]
    if args[0] in ("up", "down"):
        args.insert(1, "-y")
    local_tmp = str(head["root"] / "launcher")  # the launcher's lock, state and config cache on this side
    env = os.environ | QUIET | {"RAY_TMPDIR": local_tmp, "TMPDIR": local_tmp}
    result = subprocess.run([RAY, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"ray {' '.join(args)} failed:\n{output[-6000:]}"
    return output


def test_ray_up_submit_down_on_this_machine(ssh_head):
    from mlflow import MlflowClient

    from pipeline.recording.exports import load_schedule

    ports = {name: free_port() for name in ("mlflow", "gcs", "dashboard", "agent")}
    config_file = ssh_head["root"] / "cluster.yaml"
    config_file.write_text(yaml.safe_dump(concrete_config(yaml.safe_load(LOCAL_CONFIG.read_text()), ssh_head,
                                                          ports)))
    (ssh_head["root"] / "launcher").mkdir()
    commands = readme_commands()
    home, storage = ssh_head["home"], ssh_head["root"] / "storage"

    launcher(commands["up"], config_file, ssh_head, STEP_TIMEOUT_S)
    assert ray_processes(ssh_head["unshare"]), "ray up started no Ray head"

    output = launcher(commands["submit"], config_file, ssh_head, STEP_TIMEOUT_S)
    sessions = list((ssh_head["root"] / "ray" / "ray").glob("session_2*"))
    assert len(sessions) == 1, f"the study started a Ray of its own instead of joining the cluster: {sessions}"

    exports = list((home / "exports").rglob("*.json"))
    assert exports, f"no exported schedule in ~/exports:\n{output[-3000:]}"
    assert list((storage / "teacher-cache").rglob("*.parquet")), "teacher cache is not in LD3_STORAGE"
    assert (home / "mlflow" / "mlflow.db").is_file()
    client = MlflowClient(tracking_uri=f"http://127.0.0.1:{ports['mlflow']}")
    experiment = client.get_experiment_by_name("gmm-smoke")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    nested = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert {r.info.status for r in nested} <= {"FINISHED", "KILLED"}  # KILLED: a trial that ASHA stopped
    assert any(r.data.tags.get("kind") == "trial" and r.info.status == "FINISHED" for r in nested)
    assert list((storage / "mlflow-artifacts").rglob("*")), "no artifact reached the artifact store"
    for path in exports:  # valid schedules, traced to this cluster's runs and teacher cache
        schedule = load_schedule(path)
        assert schedule.provenance.mlflow_run_id in {r.info.run_id for r in runs}
        assert list((storage / "teacher-cache").glob(schedule.provenance.teacher_cache_key + "*"))

    launcher(commands["down"], config_file, ssh_head, STEP_TIMEOUT_S)
    assert not ray_processes(ssh_head["unshare"]), "ray down left Ray running"
