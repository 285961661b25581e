"""`loracli queue run`: bad jobs up front, failures do not stop it, re-runs skip finished jobs."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

from tests.smoke.conftest import CONFIG


def job(folder: Path, name: str, text: str) -> Path:
    path = folder / f"{name}.toml"
    path.write_text(text)
    return path


def queue(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "loracli", "queue", "run", *args], cwd=cwd,
                          capture_output=True, text=True)


def test_six_jobs_two_invalid_one_failing(smoke_project):
    root = smoke_project.parent
    short = CONFIG.replace("max_train_epochs = 3", "max_train_epochs = 1")
    jobs = [
        job(root, "a-good", short.replace('output_name = "smoke"', 'output_name = "a"')),
        job(root, "b-typo", short.replace("network_dim = 4", "network_dimm = 4")),
        job(root, "c-good", short.replace('output_name = "smoke"', 'output_name = "c"')),
        job(root, "d-nodata", short.replace('train_data_dir = "data"', 'train_data_dir = "missing"')),
        job(root, "e-nan", short.replace("learning_rate = 1e-3", "learning_rate = 1e30")
            .replace("max_train_epochs = 1", "max_train_epochs = 4")),
        job(root, "f-good", short.replace('output_name = "smoke"', 'output_name = "f"')),
    ]
    first = queue(root, *map(str, jobs), "--json")
    assert first.returncode == 4, first.stderr
    results = {Path(j["config"]).stem: j for j in json.loads(first.stdout)}
    assert {k: v["status"] for k, v in results.items()} == {
        "a-good": "finished", "b-typo": "invalid", "c-good": "finished", "d-nodata": "invalid",
        "e-nan": "failed", "f-good": "finished"}
    assert "network.network_dimm" in results["b-typo"]["error"] and "missing" in results["d-nodata"]["error"]
    assert "at step" in results["e-nan"]["error"]
    for name in ("a-good", "c-good", "f-good"):
        assert Path(results[name]["output"]).is_file()
    assert len({r["run_dir"] for r in results.values() if r["run_dir"]}) == 4  # one folder per run
    assert first.stderr.index("invalid: ") < first.stderr.index("job 1/6")  # reported before training

    again = queue(root, *map(str, jobs))
    assert again.returncode == 4
    assert again.stdout.count("skip (finished)") == 3
    assert "3 finished, 1 failed, 2 invalid" in again.stdout
    status = subprocess.run([sys.executable, "-m", "loracli", "queue", "status", "--json"], cwd=root,
                            capture_output=True, text=True)
    assert status.returncode == 0 and len(json.loads(status.stdout)) == 6


def test_webhook_receives_the_result(smoke_project):
    received: list[dict] = []

    class Hook(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 (http.server's naming)
            received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Hook)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        cfg = job(smoke_project.parent, "one", CONFIG.replace("max_train_epochs = 3", "max_train_epochs = 1"))
        done = queue(smoke_project.parent, str(cfg), "--webhook", f"http://127.0.0.1:{server.server_port}/hook")
        assert done.returncode == 0, done.stderr
    finally:
        server.shutdown()
    assert len(received) == 1
    assert received[0]["event"] == "finished" and received[0]["status"] == "finished"
    assert received[0]["config"] == str(cfg.resolve()) and received[0]["steps"] == received[0]["total_steps"]
