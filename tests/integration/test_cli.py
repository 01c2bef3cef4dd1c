"""The `gateway` command as users run it: real processes, real output."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import urllib.request
import sys
from pathlib import Path

import openai
import pytest
import yaml

from tests.images import decode_data_url, open_image

ROOT = Path(__file__).resolve().parents[2]


def gateway(*args: str, env: dict | None = None, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args], capture_output=True, text=True, timeout=60, cwd=ROOT, env={**os.environ, **(env or {})}, **kw
    )


def test_check_config_accepts_the_example():
    done = gateway("check-config", "--config", "config/gateway.example.yaml", env={"UPSTREAM_API_KEY": "x"})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith(": ok")


def test_check_config_names_every_problem_by_key_path(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "server: {port: 99999}\n"
        "teams:\n"
        "  - name: a\n"
        "    limits: {requests_per_minute: -1}\n"
        "  - name: b\n"
        "    limts: {}\n"
    )
    done = gateway("check-config", "--config", str(bad))
    assert done.returncode == 1
    assert "server.port" in done.stderr
    assert "teams[0].limits.requests_per_minute: must be a positive integer" in done.stderr
    assert "teams[1].limts: unknown key" in done.stderr and "limits" in done.stderr


def test_config_path_comes_from_the_environment(tmp_path):
    path = tmp_path / "env.yaml"
    path.write_text("server: {port: 8080}\n")
    done = gateway("check-config", env={"GATEWAY_CONFIG": str(path)})
    assert done.returncode == 0 and str(path) in done.stdout


def test_keys_new_prints_a_key_whose_hash_line_authenticates(tmp_path):
    done = gateway("keys", "new", "--team", "design")
    assert done.returncode == 0
    key = re.search(r"^\s+(gw-design-\S+)$", done.stdout, re.M).group(1)
    line = re.search(r'"(sha256:[0-9a-f]{64})"', done.stdout).group(1)
    from gateway.config.loader import parse
    from gateway.http.auth import Authenticator

    config = parse({"teams": [{"name": "design", "keys": [line]}]})
    request = type("R", (), {"headers": {"Authorization": f"Bearer {key}"}})()
    assert Authenticator(config).team(request).name == "design"
    assert gateway("keys", "new", "--team", "bad name!").returncode != 0


def test_serve_refuses_several_workers_on_the_embedded_store(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"store": {"url": "memory://"}}))
    done = gateway("serve", "--config", str(path), "--workers", "2")
    assert done.returncode != 0 and "needs a shared store" in done.stderr


def test_demo_prints_a_working_key_and_snippets_for_chat_images_and_links(tmp_path):
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway", "demo", "--port", "0"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=ROOT
    )
    try:
        lines = []
        while not any(line.startswith("Ctrl-C") for line in lines):
            line = proc.stdout.readline()
            assert line, "demo exited early: " + "".join(lines)
            lines.append(line)
        text = "".join(lines)
        url = re.search(r"Demo gateway on (http://\S+)", text).group(1)
        key = re.search(r'Team "demo" key: (\S+)', text).group(1)
        assert "curl" in text and "openai.OpenAI" in text
        client = openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0)
        r = client.chat.completions.create(model="google/gemini-3-pro-image-preview", messages=[{"role": "user", "content": "a demo"}])
        image = r.choices[0].message.model_extra["images"][0]["image_url"]["url"]
        assert open_image(decode_data_url(image)).format == "JPEG"
        # the Images API and image links, as the demo prints them
        assert "client.images.generate(" in text and "client.images.edit(" in text
        assert '"response_format": "url"' in text and "X-Image-Delivery: url" in text
        link = client.images.generate(prompt="a demo", response_format="url").data[0].url
        with urllib.request.urlopen(link) as resp:  # no key
            assert open_image(resp.read()).format == "JPEG"
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(20) == 0


def test_simulate_prints_where_it_listens():
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway", "simulate", "--port", "0", "--api-key", "k"], stdout=subprocess.PIPE, text=True, cwd=ROOT
    )
    try:
        assert re.match(r"simulator listening on http://127\.0\.0\.1:\d+$", proc.stdout.readline().strip())
    finally:
        proc.terminate()
        assert proc.wait(20) == 0
    bad = gateway("simulate", "--fault", "nonsense=1")
    assert bad.returncode != 0 and "unknown fault item" in bad.stderr


def test_check_config_warns_of_a_key_written_in_the_file(tmp_path):
    path = tmp_path / "literal.yaml"
    path.write_text("upstream:\n  api_key: sk-live-123\n")
    done = gateway("check-config", "--config", str(path))
    assert done.returncode == 0 and done.stdout.strip().endswith(": ok"), done.stderr
    assert "warning: upstream.api_key: a secret written in the file" in done.stderr
    assert "sk-live-123" not in done.stderr + done.stdout


@pytest.mark.parametrize("workers", [1, 2])
def test_serve_logs_the_literal_key_warning_once(tmp_path, workers, request):
    """One line, from the supervisor when there are workers (they share its stderr)."""
    store = request.getfixturevalue("redis_server").url if workers > 1 else "memory://"
    path = tmp_path / "literal.yaml"
    path.write_text(yaml.safe_dump({"upstream": {"api_key": "sk-live-123"}, "store": {"url": store}}))
    from gateway.server import free_port

    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway", "serve", "--config", str(path), "--host", "127.0.0.1",
         "--port", str(free_port("127.0.0.1")), "--workers", str(workers)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert "listening on" in proc.stdout.readline()
    finally:
        proc.terminate()
        _, stderr = proc.communicate(timeout=60)
    assert stderr.count("upstream.api_key: a secret written in the file") == 1, stderr
    assert "sk-live-123" not in stderr
