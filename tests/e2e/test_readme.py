"""The README's query examples, as written, against `glm-ray serve` (what `make serve` runs) on the
default ports, and Ctrl-C shutting it down cleanly."""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

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
    proc = subprocess.Popen([sys.executable, "-m", "glm_ray.cli", "serve"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env={**os.environ, "RAY_AUTH_MODE": "disabled"},
                            start_new_session=True)
    lines = []
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line and proc.poll() is not None:
            break
        lines.append(line)
        if "Ctrl-C to stop." in line:
            break
    else:
        proc.kill()
    if proc.poll() is not None or "Ctrl-C to stop." not in "".join(lines):
        proc.kill()
        pytest.fail("glm-ray serve did not come up:\n" + "".join(lines[-40:]))
    yield proc, "".join(lines)
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)


def _run(cmd: list[str]) -> str:
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_readme_examples_work_as_written(served):
    proc, banner = served
    assert "http://127.0.0.1:8000/v1" in banner and "127.0.0.1:9000" in banner
    examples = readme_examples()
    completion = _run(["bash", "-c", examples["curl"]])
    assert '"object": "text_completion"' in completion or '"object":"text_completion"' in completion
    assert _run([sys.executable, "-c", examples["openai"]]).strip()
    assert _run([sys.executable, "-c", examples["grpc"]]).strip()  # streamed Generate and Chat text

    proc.send_signal(signal.SIGINT)  # Ctrl-C
    assert proc.wait(timeout=120) == 0
    assert "shutting down" in proc.stdout.read()
