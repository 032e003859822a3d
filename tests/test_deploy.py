"""The scheduled deployments against a real `prefect server start` on 127.0.0.1: register, trigger, complete."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from foresight import warehouse

REPO = Path(__file__).resolve().parents[1]
PREFECT = str(Path(os.environ.get("VIRTUAL_ENV", REPO / ".venv")) / "bin" / "prefect")
if not Path(PREFECT).exists():
    import shutil

    PREFECT = shutil.which("prefect") or PREFECT

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    home = tmp_path_factory.mktemp("prefect-home")
    port = _free_port()
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_UI_ENABLED": "false",
           "PREFECT_LOGGING_LEVEL": "WARNING", "FORESIGHT_HOME": str(REPO)}
    log = open(home / "server.log", "w")  # noqa: SIM115 - closed in the teardown
    proc = subprocess.Popen([PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)], env=env,
                            stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + 180
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            raise RuntimeError(f"prefect server did not start:\n{(home / 'server.log').read_text()[-3000:]}")
        time.sleep(1)
    yield env
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


def _prefect(env: dict[str, str], *args: str, timeout: int = 300) -> str:
    proc = subprocess.run([PREFECT, *args], env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"prefect {' '.join(args)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return proc.stdout + proc.stderr


def test_deployments_register_with_schedules_and_a_run_completes(server, tiny_mimic, tmp_path):
    env = server
    _prefect(env, "work-pool", "create", "foresight-process", "--type", "process")
    _prefect(env, "--no-prompt", "deploy", "--all", "--prefect-file", "deploy/prefect.yaml")
    # the chain shares one warehouse: weekly training starts from the nightly ETL's (no raw files), with canaries,
    # and the Monday forecast picks the warehouse's last date (MIMIC-IV dates are shifted: "today" finds nobody)
    for name, cron, params in (
            ("etl/nightly-etl", "0 2 * * *", {"db": "work/warehouse.duckdb"}),
            ("pipeline/weekly-training", "0 3 * * 0", {"source": "warehouse", "input": "work/warehouse.duckdb",
                                                        "canaries": 5, "registry": "work/registry"}),
            ("forecast hospitalisation rates/monday-forecast", "0 6 * * 1", {"db": "work/warehouse.duckdb",
                                                                             "as_of": "latest",
                                                                             "registry": "work/registry"})):
        out = _prefect(env, "deployment", "inspect", name, "--output", "json")
        deployment = json.loads(out[out.index("{"):out.rindex("}") + 1])  # (stderr may add a warning line)
        assert [s["schedule"]["cron"] for s in deployment["schedules"]] == [cron], deployment["schedules"]
        assert {k: deployment["parameters"].get(k) for k in params} == params, deployment["parameters"]
    db = tmp_path / "scheduled.duckdb"
    out = _prefect(env, "deployment", "run", "etl/nightly-etl", "--param", f"input={tiny_mimic}",
                   "--param", f"db={db}")
    run_id = re.search(r"UUID:\s*([0-9a-f-]{36})", out).group(1)
    _prefect(env, "worker", "start", "--pool", "foresight-process", "--run-once", timeout=600)
    state = json.loads(subprocess.run(
        [str(Path(PREFECT).with_name("python")), "-c",
         "import asyncio, json, sys\nfrom prefect.client.orchestration import get_client\n"
         "async def main():\n    async with get_client() as c:\n        r = await c.read_flow_run(sys.argv[1])\n"
         "        print(json.dumps({'state': r.state.type.value}))\nasyncio.run(main())", run_id],
        env=env, capture_output=True, text=True, timeout=120).stdout.strip().splitlines()[-1])
    assert state["state"] == "COMPLETED", state
    with warehouse.connect(db, read_only=True) as con:
        assert con.execute("SELECT count(DISTINCT subject_id) FROM events").fetchall()[0][0] == 3
