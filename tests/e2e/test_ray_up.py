"""`ray up` cluster/local.yaml for real, on this machine, then `serve deploy`, HTTP and gRPC queries, `ray down`.

Ray's on-premise provider reaches its nodes over SSH, so the test runs a private sshd on 127.0.0.1 (Debian's
`openssh-server`, installed with apt-get when missing) and points a copy of cluster/local.yaml at it. It skips
only when sshd cannot be installed or started, and says why.

Isolation from the rest of the suite (whose Ray cluster may be up on this machine while this test runs):
- Everything lives in one short temp dir (Ray's socket paths must stay short): sshd's config, host key,
  authorized_keys, pid file and log; the SSH key; `home/`, the HOME of every SSH session (sshd's `SetEnv`), so
  Ray's remote `~/ray_bootstrap_config.yaml`, key copy, `~/.bashrc` and `~/.ray/auth_token` stay out of the real
  home; the head's Ray temp dir (`ray start --temp-dir`); the launcher's and the head's RAY_TMPDIR (else they
  share Ray's cluster state file and `ray down` loses the head).
- The stock start commands and `ray down` run `ray stop`, which ends EVERY Ray process on the machine. The SSH
  sessions' PATH starts with `home/bin`, where a `ray` wrapper makes `ray stop` end only the processes of this
  cluster's temp dir (its path in their command line, or RAY_TMPDIR=<it> in their environment, which sshd's
  `SetEnv` gives every process started over SSH); every other `ray` command is the real one.
- The head's ports are free ports picked here (all outside Ray's default worker range 10002-19999), its workers
  take ports the OS assigns (`--min-worker-port=0 --max-worker-port=0`), and nothing binds Ray's default ports
  (6379, 8265, 10001, 52365), so a cluster started with `ray.init()` elsewhere keeps them.
- A finalizer runs `ray down`, then ends whatever is left that carries this test's marker (in its command line or,
  for processes started over SSH, in its environment), stops sshd and removes the temp dir, pass or fail.
"""

from __future__ import annotations

import getpass
import hashlib
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from importlib.metadata import version
from pathlib import Path

import grpc
import pytest
import yaml

pytestmark = pytest.mark.slow

REPO = Path(__file__).parents[2]
VENV_BIN = Path(sys.executable).parent  # the venv this suite runs in: the "nodes" use it as installed
RAY = VENV_BIN / "ray"
SERVE = VENV_BIN / "serve"
API_KEY = "e2e-ray-up-key"
CLUSTER_SECRET = "e2e-ray-up-cluster-secret-0123456789"
PACKAGES = {"sshd": "openssh-server", "ssh": "openssh-client", "ssh-keygen": "openssh-client", "rsync": "rsync",
            "nc": "netcat-openbsd"}
WAIT_HEALTHY_S = 240


# --- processes -----------------------------------------------------------------------------------------------

def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:  # gone, or not ours to read
        return b""


def _ancestors() -> set[int]:
    pids, pid = set(), os.getpid()
    while pid > 1:
        pids.add(pid)
        stat = _read(f"/proc/{pid}/stat").decode(errors="replace")
        try:
            pid = int(stat.rsplit(")", 1)[1].split()[1])
        except (IndexError, ValueError):
            break
    return pids


def processes_with(marker: str, *, environ: bool = False) -> dict[int, str]:
    """pid -> command line of every process (not this one or its ancestors) whose command line, or with
    `environ` its environment, contains `marker`."""
    found, mine, needle = {}, _ancestors(), marker.encode()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) in mine:
            continue
        cmdline = _read(f"/proc/{entry}/cmdline")
        if needle in cmdline or (environ and needle in _read(f"/proc/{entry}/environ")):
            found[int(entry)] = cmdline.replace(b"\0", b" ").decode(errors="replace").strip()
    return found


def end_processes(marker: str, *, environ: bool = False, grace_s: float = 10) -> None:
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5)):
        for pid in processes_with(marker, environ=environ):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait_s
        while processes_with(marker, environ=environ) and time.monotonic() < deadline:
            time.sleep(0.2)


def describe(pids: dict[int, str], marker: str) -> dict[int, str]:
    """pid -> command line and the environment entries that name `marker`: what a failure message needs."""
    out = {}
    for pid, cmdline in pids.items():
        named = [e.decode(errors="replace") for e in _read(f"/proc/{pid}/environ").split(b"\0") if marker.encode() in e]
        out[pid] = f"{cmdline[:200]} | environment: {named}"
    return out


def wait_gone(marker: str, *, environ: bool = False, timeout_s: float = 30) -> dict[int, str]:
    deadline = time.monotonic() + timeout_s
    while (left := processes_with(marker, environ=environ)) and time.monotonic() < deadline:
        time.sleep(0.5)
    return left


# The `ray` first on the SSH sessions' PATH. Not a shell script: a stock Debian may lack pgrep. Command lines
# alone do not find every process of a cluster (Ray's agents retitle themselves `ray::DashboardAgent`, its
# client server names no temp dir); the sessions' environment does: sshd gives them RAY_TMPDIR=<temp dir>.
RAY_WRAPPER = '''#!{python}
"""`ray` for the e2e test's cluster only. `ray stop` ends the processes of this cluster's temp dir
({temp_dir}): those whose command line names it, or whose environment names the SSH sessions' home anywhere
(HOME, PATH=<home>/bin:..., _=<home>/bin/ray) or has RAY_TMPDIR set to it or the test's GLM_RAY_E2E_MARKER,
not every Ray process on the machine as the real one does. Ray's agents retitle themselves, and the title can
overwrite part of their environment (CI saw them keep only PATH and _): any one surviving entry is enough.
Anything else is the real `ray`."""
import os, signal, sys, time
TEMP_DIR, HOME, MARKER, REAL = {temp_dir!r}, {home!r}, {marker!r}, {real!r}
if sys.argv[1:2] != ["stop"]:
    os.execv(REAL, [REAL, *sys.argv[1:]])
def read(path):
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return b""
def ancestors():
    pids, pid = set(), os.getpid()
    while pid > 1:
        pids.add(pid)
        try:
            pid = int(read(f"/proc/{{pid}}/stat").rsplit(b")", 1)[1].split()[1])
        except (IndexError, ValueError):
            break
    return pids
def ours():
    mine = ancestors()
    return [int(pid) for pid in filter(str.isdigit, os.listdir("/proc")) if int(pid) not in mine and (
        TEMP_DIR.encode() in read(f"/proc/{{pid}}/cmdline")
        or HOME.encode() in read(f"/proc/{{pid}}/environ")
        or {{("RAY_TMPDIR=" + TEMP_DIR).encode(), ("GLM_RAY_E2E_MARKER=" + MARKER).encode()}}
        & set(read(f"/proc/{{pid}}/environ").split(b"\\0")))]
for sig, wait_s in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):  # the cluster is being thrown away
    for pid in ours():
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + wait_s
    while ours() and time.monotonic() < deadline:
        time.sleep(0.2)
print(f"ray stop (e2e wrapper): ended the processes of {{TEMP_DIR}}")
'''


# --- the machine: packages, ports, sshd ---------------------------------------------------------------------

def missing_tools() -> list[str]:
    return [tool for tool in PACKAGES if not (shutil.which(tool) or Path("/usr/sbin", tool).exists())]


def install_packages() -> str | None:
    """Installs the Debian packages the test needs; returns why it could not, or None."""
    missing = missing_tools()
    if not missing:
        return None
    packages = sorted({PACKAGES[tool] for tool in missing})
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return f"{', '.join(packages)} missing, and no apt-get as root to install them"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    log = []
    for cmd in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", "--no-install-recommends", *packages]):
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
        except subprocess.TimeoutExpired:
            return f"`{' '.join(cmd)}` timed out"
        log.append(r.stdout[-1500:] + r.stderr[-1500:])
        if r.returncode != 0 and cmd[1] == "install":
            return f"`{' '.join(cmd)}` failed:\n" + "\n".join(log)
    still = missing_tools()
    return f"{', '.join(still)} still missing after installing {', '.join(packages)}" if still else None


def free_port() -> int:
    """A free port outside Ray's worker range 10002-19999 (ephemeral ports are: this only makes sure)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if not 10002 <= port <= 19999:
            return port


def ssh_base(tmp: Path, port: int) -> list[str]:
    return ["ssh", "-i", str(tmp / "id_ed25519"), "-p", str(port), "-o", "BatchMode=yes",
            "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "-o", "ConnectTimeout=5",
            "-o", "LogLevel=ERROR", f"{getpass.getuser()}@127.0.0.1"]


def start_sshd(tmp: Path, port: int, env: dict[str, str]) -> tuple[subprocess.Popen | None, str]:
    """A private sshd on 127.0.0.1:port; returns it and "" or None and why it could not start."""
    sshd = shutil.which("sshd") or "/usr/sbin/sshd"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp / "ssh_host_ed25519_key")],
                   check=True)
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp / "id_ed25519")], check=True)
    shutil.copy(tmp / "id_ed25519.pub", tmp / "authorized_keys")
    set_env = " ".join(f"{k}={v}" for k, v in env.items())
    (tmp / "sshd_config").write_text(f"""\
Port {port}
ListenAddress 127.0.0.1
HostKey {tmp}/ssh_host_ed25519_key
PidFile {tmp}/sshd.pid
AuthorizedKeysFile {tmp}/authorized_keys
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
# no PAM (no login session bookkeeping); the keys live under world-writable /tmp
UsePAM no
StrictModes no
PrintMotd no
X11Forwarding no
SetEnv {set_env}
""")
    try:
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # sshd's privilege-separation directory
    except OSError as e:
        return None, f"cannot create /run/sshd: {e}"
    check = subprocess.run([sshd, "-t", "-f", str(tmp / "sshd_config")], capture_output=True, text=True)
    if check.returncode != 0:
        return None, f"sshd rejects its config: {check.stderr.strip()}"
    proc = subprocess.Popen([sshd, "-D", "-f", str(tmp / "sshd_config"), "-E", str(tmp / "sshd.log")],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return None, f"sshd exited with {proc.returncode}: {_read(str(tmp / 'sshd.log')).decode()[-2000:]}"
        r = subprocess.run([*ssh_base(tmp, port), "echo $HOME"], capture_output=True, text=True, timeout=30)
        if r.returncode == 0:
            if r.stdout.strip() != env["HOME"]:
                proc.kill()
                return None, f"sshd's SetEnv HOME did not apply (got {r.stdout.strip()!r}): OpenSSH < 7.8?"
            return proc, ""
        time.sleep(0.5)
    proc.kill()
    return None, f"cannot log in over ssh: {r.stderr.strip()}\n{_read(str(tmp / 'sshd.log')).decode()[-2000:]}"


# --- the cluster config ---------------------------------------------------------------------------------------

def cluster_config_for(tmp: Path, cluster_name: str, sshd_port: int, ports: dict[str, int], ray_temp: Path) -> dict:
    """cluster/local.yaml pointed at this machine's private sshd, its head on its own ports and temp dir."""
    cfg = yaml.safe_load((REPO / "cluster" / "local.yaml").read_text())
    cfg["cluster_name"] = cluster_name
    cfg["provider"].update(head_ip="127.0.0.1", worker_ips=[])
    # Ray has no ssh port setting: ssh reaches the private sshd through a ProxyCommand
    cfg["auth"] = {"ssh_user": getpass.getuser(), "ssh_private_key": str(tmp / "id_ed25519"),
                   "ssh_proxy_command": f"nc 127.0.0.1 {sshd_port}"}
    # glm-ray is already installed in this suite's venv, first on the sessions' PATH: no wheel to copy (the
    # Ray token's mount stays), and the install commands are replaced by a check that the "node" can import
    # glm-ray with the launcher's Ray.
    assert cfg["file_mounts"].get("~/.ray/auth_token") == "~/.ray/auth_token", cfg["file_mounts"]
    assert cfg["file_mounts"].get("~/.glm-ray") == "~/.glm-ray", cfg["file_mounts"]
    cfg["file_mounts"] = {"~/.ray/auth_token": "~/.ray/auth_token", "~/.glm-ray": "~/.glm-ray"}
    ray_version = json.dumps(version("ray"))
    cfg["setup_commands"] = [f"python -c 'import glm_ray, ray; assert ray.__version__ == {ray_version}'"]
    extra = (f" --dashboard-host=127.0.0.1 --dashboard-port={ports['dashboard']}"
             f" --ray-client-server-port={ports['client']} --dashboard-agent-listen-port={ports['agent']}"
             f" --temp-dir={ray_temp} --min-worker-port=0 --max-worker-port=0")
    head = []
    for cmd in cfg["head_start_ray_commands"]:
        if "ray start --head" in cmd:
            assert "--port=6379" in cmd, f"cluster/local.yaml's head start changed: {cmd}"
            cmd = cmd.replace("--port=6379", f"--port={ports['gcs']}") + extra
        head.append(cmd)
    cfg["head_start_ray_commands"] = head
    return cfg


def serve_config_file(path: Path, model_dir: Path, http_port: int, grpc_port: int) -> dict:
    """A Serve config file written by `glm-ray config`, its replicas asking for the head's custom resources
    (fractions: one node hosts them all here); returns it as data."""
    r = subprocess.run([str(VENV_BIN / "glm-ray"), "config", "--model", str(model_dir), "--http-port", str(http_port),
                        "--grpc-port", str(grpc_port), "--cluster-secret-file", "~/.glm-ray/cluster-secret",
                        "--set", "api_keys_file=~/.glm-ray/api-keys",
                        "--set", "attention_resources.resources.attention=0.1",
                        "--set", "expert_resources.resources.experts=0.1", "--out", str(path)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, f"glm-ray config failed: {r.stderr}"
    data = yaml.safe_load(path.read_text())
    app = data["applications"][0]
    assert app["import_path"] == "glm_ray.serving.app:build_app"
    assert app["args"]["attention_resources"]["resources"] == {"attention": 0.1}
    assert app["args"]["expert_resources"]["resources"] == {"experts": 0.1}
    assert data["http_options"]["port"] == http_port and data["grpc_options"]["port"] == grpc_port
    return data


# --- helpers over HTTP --------------------------------------------------------------------------------------

def http_get(url: str, headers: dict[str, str] | None = None, timeout: float = 5) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=timeout) as r:
            return r.status, r.read().decode(errors="replace")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")
    except (urllib.error.URLError, OSError) as e:
        return 0, str(e)


def run_logged(cmd: list[str], env: dict[str, str], log: Path, timeout: float) -> subprocess.CompletedProcess:
    with open(log, "a") as out:
        out.write(f"\n$ {shlex.join(cmd)}\n")
        out.flush()
        try:
            return subprocess.run(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                  timeout=timeout)
        except subprocess.TimeoutExpired:
            out.write(f"\n(timed out after {timeout} s)\n")
            return subprocess.CompletedProcess(cmd, 124)


def tail(path: Path, n: int = 60) -> str:
    return "\n".join(_read(str(path)).decode(errors="replace").splitlines()[-n:])


# --- the test -----------------------------------------------------------------------------------------------

@pytest.fixture
def local_cluster(request, tiny_model_dir):
    """A private sshd plus everything `ray up` needs; yields a namespace; tears it all down at the end."""
    why = install_packages()
    if why:
        pytest.skip(f"cannot install sshd and the tools ray up needs: {why}")
    # short: the head's Ray sockets live under it (a Unix socket path has ~107 bytes)
    tmp = Path(tempfile.mkdtemp(prefix="glmrayup-", dir="/tmp"))
    home, ray_temp, launcher_tmp = tmp / "home", tmp / "raytmp", tmp / "launcher"
    for d in (home / "bin", ray_temp, launcher_tmp / "home"):
        d.mkdir(parents=True)
    cluster_name = f"glm-ray-e2e-{tmp.name.removeprefix('glmrayup-')}"
    marker = str(tmp)  # in every command line of this test's processes, or (over SSH) in their environment
    launcher_env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    # TMPDIR too: `ray down` caches the prepared config in the temp dir (no --no-config-cache there); HOME: the
    # launcher's Ray token, ~/.ray/auth_token, which file_mounts copies to the head
    launcher_env.update(PATH=f"{VENV_BIN}:{os.environ['PATH']}", RAY_TMPDIR=str(launcher_tmp),
                        TMPDIR=str(launcher_tmp), HOME=str(launcher_tmp / "home"),
                        AUTOSCALER_NODE_START_WAIT_S="60", RAY_USAGE_STATS_ENABLED="0")
    state = {"up": False}
    sshd = None

    def teardown():
        if state["up"]:
            run_logged([str(RAY), "down", "-y", str(tmp / "cluster.yaml")], launcher_env, tmp / "launcher.log", 120)
        end_processes(marker, environ=True)
        if sshd is not None and sshd.poll() is None:
            sshd.terminate()
            try:
                sshd.wait(10)
            except subprocess.TimeoutExpired:
                sshd.kill()
        end_processes(marker, environ=True, grace_s=2)
        user_hash = hashlib.sha256(getpass.getuser().encode()).hexdigest()[:10]
        control = Path(f"/tmp/ray_ssh_{user_hash}", hashlib.sha256(cluster_name.encode()).hexdigest()[:10])
        shutil.rmtree(control, ignore_errors=True)  # the launcher's ssh ControlPath dir (fixed under /tmp)
        try:
            control.parent.rmdir()  # only if no other cluster of this user has one
        except OSError:
            pass
        if os.environ.get("GLM_RAY_E2E_KEEP"):  # to read sshd.log, launcher.log, raytmp/session_*/logs
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)

    request.addfinalizer(teardown)

    (home / ".bashrc").write_text(f"export PATH={home}/bin:{VENV_BIN}:$PATH\n")  # Debian's profile resets PATH
    wrapper = home / "bin" / "ray"
    wrapper.write_text(RAY_WRAPPER.format(python=sys.executable, temp_dir=str(ray_temp), home=str(home), marker=marker,
                                          real=str(RAY)))
    wrapper.chmod(0o755)
    ssh_env = {"HOME": str(home), "RAY_TMPDIR": str(ray_temp), "RAY_USAGE_STATS_ENABLED": "0",
               "GLM_RAY_E2E_MARKER": marker}

    sshd_port = free_port()
    sshd, why = start_sshd(tmp, sshd_port, ssh_env)
    if sshd is None:
        pytest.skip(f"cannot start a private sshd on 127.0.0.1:{sshd_port}: {why}")

    ports = {name: free_port() for name in ("gcs", "dashboard", "client", "agent", "http", "grpc")}
    cfg = cluster_config_for(tmp, cluster_name, sshd_port, ports, ray_temp)
    (tmp / "cluster.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))

    class Cluster:
        pass

    c = Cluster()
    c.tmp, c.home, c.ray_temp, c.marker, c.ports, c.model_dir = tmp, home, ray_temp, marker, ports, tiny_model_dir
    c.config, c.launcher_env, c.log, c.sshd = tmp / "cluster.yaml", launcher_env, tmp / "launcher.log", sshd
    c.mark_up = lambda up: state.update(up=up)
    yield c


def test_ray_up_serve_deploy_query_ray_down(local_cluster):
    c = local_cluster
    started = time.monotonic()

    # 1. ray up: the launcher is this machine, the head is this machine over SSH on loopback. First the
    # cluster's Ray token, on the launcher, as cluster/local.yaml says.
    r = run_logged([str(RAY), "get-auth-token", "--generate"], c.launcher_env, c.log, 60)
    launcher_token = Path(c.launcher_env["HOME"], ".ray", "auth_token")
    assert r.returncode == 0 and launcher_token.is_file(), tail(c.log)
    # the glm-ray secrets, on the launcher too, as cluster/local.yaml says: file_mounts copies them to the nodes,
    # and the Serve config points at them (the API key then comes from the file, not the command line)
    secrets_dir = Path(c.launcher_env["HOME"], ".glm-ray")
    secrets_dir.mkdir(mode=0o700)
    (secrets_dir / "cluster-secret").write_text(CLUSTER_SECRET + "\n")
    (secrets_dir / "api-keys").write_text(API_KEY + "\n")
    c.mark_up(True)
    r = run_logged([str(RAY), "up", "-y", "--no-config-cache", str(c.config)], c.launcher_env, c.log, 300)
    assert r.returncode == 0, f"ray up failed:\n{tail(c.log)}"
    up_s = time.monotonic() - started

    # Ray token auth is on for this cluster: the head got the launcher's token (in the SSH sessions' HOME), its
    # dashboard refuses a request without it, and `serve deploy` sends it (RAY_AUTH_MODE=token on the launcher)
    assert (c.home / ".ray" / "auth_token").read_text() == launcher_token.read_text()
    assert (c.home / ".glm-ray" / "cluster-secret").read_text().strip() == CLUSTER_SECRET
    dashboard = f"http://127.0.0.1:{c.ports['dashboard']}"
    deadline = time.monotonic() + 60
    while (status := http_get(f"{dashboard}/api/serve/applications/")[0]) == 0 and time.monotonic() < deadline:
        time.sleep(1)  # `ray start` may return before the dashboard listens
    assert status == 401, f"the dashboard answered {status} to a request without the cluster token"
    ray_auth = {"Authorization": f"Bearer {launcher_token.read_text().strip()}"}
    assert http_get(f"{dashboard}/api/serve/applications/", ray_auth)[0] == 200
    serve_env = {**c.launcher_env, "RAY_AUTH_MODE": "token"}

    # 2. serve deploy a Serve config file: replicas need the head's `attention` / `experts` resources
    serve_file = c.tmp / "serve.yaml"
    serve_config_file(serve_file, c.model_dir, c.ports["http"], c.ports["grpc"])
    r = run_logged([str(SERVE), "deploy", str(serve_file), "--address", dashboard], serve_env, c.log, 120)
    assert r.returncode == 0, f"serve deploy failed:\n{tail(c.log)}"

    # 3. /health is 503 until every expert group has a live replica; Serve's own status of the deployments may
    # lag behind it (the controller updates it on its own loop), so wait for both.
    health, deadline, last = f"http://127.0.0.1:{c.ports['http']}/health", time.monotonic() + WAIT_HEALTHY_S, ""
    while time.monotonic() < deadline:
        status, body = http_get(health)
        _, apps = http_get(f"{dashboard}/api/serve/applications/", ray_auth)
        if '"DEPLOY_FAILED"' in apps:
            pytest.fail(f"the application failed to deploy: {apps[-3000:]}")
        try:
            deployments = json.loads(apps)["applications"]["glm-ray"]["deployments"]
        except (ValueError, KeyError, TypeError):
            deployments = {}
        if status == 200 and deployments and all(d["status"] == "HEALTHY" for d in deployments.values()):
            break
        last = f"/health: {status} {body[:300]} | Serve: {apps[-1500:]}"
        time.sleep(2)
    else:
        pytest.fail(f"not healthy after {WAIT_HEALTHY_S} s: {last}")
    healthy_s = time.monotonic() - started

    # replicas asked for the node resources the head declares (it hosts them all here)
    assert {"Ingress", "ExpertRouter", "AttentionReplica", "ExpertGroup_0", "ExpertGroup_1"} <= set(deployments)
    options = {name: d["deployment_config"]["ray_actor_options"].get("resources") for name, d in deployments.items()}
    assert options["AttentionReplica"] == {"attention": 0.1}, options
    assert options["ExpertGroup_0"] == options["ExpertGroup_1"] == {"experts": 0.1}, options

    # 4. HTTP with the official openai client
    from openai import OpenAI

    client = OpenAI(base_url=f"http://127.0.0.1:{c.ports['http']}/v1", api_key=API_KEY, max_retries=0, timeout=60)
    completion = client.completions.create(model=c.model_dir.name, prompt="The capital of France is",
                                           max_tokens=8, temperature=0)
    text = completion.choices[0].text
    assert isinstance(text, str) and text
    assert completion.usage.prompt_tokens > 0 and completion.usage.completion_tokens > 0
    status, _ = http_get(f"http://127.0.0.1:{c.ports['http']}/v1/models")
    assert status == 401, f"a request without the API key got {status}"

    # 5. gRPC through Serve's gRPC proxy: Generation.Generate, server streaming
    from glm_ray.v1 import generate_pb2 as pb, generate_pb2_grpc as pb_grpc

    with grpc.insecure_channel(f"127.0.0.1:{c.ports['grpc']}") as channel:
        stub = pb_grpc.GenerationStub(channel)
        request = pb.GenerateRequest(prompt="The capital of France is",
                                     sampling=pb.SamplingOptions(max_tokens=8, temperature=0))
        replies = list(stub.Generate(request, metadata=[("authorization", f"Bearer {API_KEY}")], timeout=60))
        with pytest.raises(grpc.RpcError) as refused:
            list(stub.Generate(request, timeout=60))
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert replies and replies[-1].finish_reason in ("stop", "length")
    assert replies[-1].usage.completion_tokens == completion.usage.completion_tokens
    assert "".join(r.text for r in replies) == text  # greedy: the same text over both front ends

    # the dispatch plane's secret is the one in ~/.glm-ray/cluster-secret: an expert replica answers it and
    # refuses a call without it
    from glm_ray.experts.auth import SECRET_METADATA_KEY
    from glm_ray.v1 import experts_pb2 as epb, experts_pb2_grpc as epb_grpc

    status, body = http_get(f"http://127.0.0.1:{c.ports['http']}/v1/experts", {"Authorization": f"Bearer {API_KEY}"})
    assert status == 200, body
    address = json.loads(body)["replicas"]["0"][0]
    with grpc.insecure_channel(address) as channel:
        experts = epb_grpc.ExpertServiceStub(channel)
        assert experts.Ping(epb.PingRequest(), metadata=[(SECRET_METADATA_KEY, CLUSTER_SECRET)], timeout=30).num_calls
        with pytest.raises(grpc.RpcError) as refused:
            experts.Ping(epb.PingRequest(), timeout=30)
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    queried_s = time.monotonic() - started

    # 6. ray down: the wrapper's `ray stop` ends this cluster's processes, and only them
    r = run_logged([str(RAY), "down", "-y", str(c.config)], c.launcher_env, c.log, 120)
    assert r.returncode == 0, f"ray down failed:\n{tail(c.log)}"
    c.mark_up(False)
    left = wait_gone(str(c.ray_temp), environ=True)
    assert not left, f"processes of the cluster's temp dir left after ray down: {describe(left, c.marker)}"
    c.sshd.terminate()
    assert c.sshd.wait(10) is not None
    end_processes(str(c.tmp / "id_ed25519"), grace_s=5)  # the launcher's ssh ControlMaster (it idles 10 s)
    # the SSH sessions' processes (sshd gave them the marker variable, which outlives a retitle) end with sshd
    end_processes(f"GLM_RAY_E2E_MARKER={c.marker}", environ=True, grace_s=5)
    left = wait_gone(c.marker, environ=True)
    assert not left, f"processes of this test left after ray down and stopping sshd: {describe(left, c.marker)}"
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", c.ports["http"])) != 0, "Serve's HTTP port still answers"
    print(f"ray up {up_s:.0f} s, healthy at {healthy_s:.0f} s, queried at {queried_s:.0f} s, "
          f"down at {time.monotonic() - started:.0f} s")
