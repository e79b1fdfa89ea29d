"""Screenshots of a study as a researcher sees it: MLflow's runs table, one run's samples, optuna-dashboard.

    python -m sorabench.devtools.screenshots [--outputs outputs] [--study conditioning_ablation] [--out docs/img]

Starts `mlflow ui` and `optuna-dashboard` on the study's stores (127.0.0.1, free ports), opens the addresses a sweep
prints in Debian's headless Chromium (`apt-get install chromium`), driven by Playwright (`pip install -e
'.[screenshots]'`: the Python package only; it uses /usr/bin/chromium and downloads no browser), and writes a PNG and
the page's visible text (`<name>.txt`) per page. The README's "Comparing runs" pictures are made by this command, so
they show what the code does now; `tests/test_screenshots.py` runs it on a tiny sweep and reads the text.
"""

from __future__ import annotations

import argparse
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

CHROMIUM_ARGS = [  # as root, offline: no sandbox, no background connections that this closed network refuses
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync",
]


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def server(cmd: list[str], url: str, timeout: float = 120.0):
    """Run a web server until the block ends; wait until `url` answers."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + timeout
        while True:
            try:
                urllib.request.urlopen(url, timeout=2).close()
                break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    err = proc.stderr.read()[-2000:] if proc.poll() is not None else "no answer"
                    raise RuntimeError(f"{cmd[0]} did not start at {url}: {err}")
                time.sleep(0.5)
        yield
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


def study_pages(outputs: Path, study: str, mlflow_port: int, dashboard_port: int) -> dict[str, tuple[str, str]]:
    """{screenshot name: (address, text the page shows once loaded)}: the runs table the sweep prints and the
    per-strategy view, a child run's samples, the dashboard's trials."""
    import mlflow
    import optuna

    from sorabench.tracking import SHARED_VIEW_KEY, experiment_url

    uri = f"sqlite:///{outputs.resolve()}/mlflow.db"
    client = mlflow.MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name(study)
    if experiment is None:
        raise SystemExit(f"--study={study!r}: no such MLflow experiment in {uri}")
    eid, base = experiment.experiment_id, f"http://127.0.0.1:{mlflow_port}"
    views = {"mlflow_runs": SHARED_VIEW_KEY, "mlflow_by_strategy": f"{SHARED_VIEW_KEY}-by-strategy"}
    pages = {name: (experiment_url(uri, eid, view=key).replace("http://127.0.0.1:5000", base), "seed")
             for name, key in views.items()}
    children = client.search_runs([eid], "tags.`mlflow.parentRunId` != ''", order_by=["attributes.start_time ASC"],
                                  max_results=1)
    if children:
        run = children[0].info.run_id
        steps = sorted(a.path for a in client.list_artifacts(run, "samples"))
        if steps:
            pages["mlflow_samples"] = (f"{base}/#/experiments/{eid}/runs/{run}/artifacts/{steps[-1]}/samples.png"
                                       "?workflowType=machine_learning", "samples.png")
    study_id = optuna.storages.RDBStorage(f"sqlite:///{outputs.resolve()}/optuna.db").get_study_id_from_name(study)
    # "Trials (List)": each trial with its params (the grid cell) and its named objective
    dashboard = f"http://127.0.0.1:{dashboard_port}/dashboard/studies/{study_id}"
    pages["optuna_dashboard"] = (f"{dashboard}/trials", "Parameter")
    pages["optuna_history"] = (dashboard, "Hyperparameter Importance")  # the objective by name, params ranked
    return pages


def shoot(browser, url: str, expect: str, png: Path, size=(1600, 860)) -> str:
    """A PNG of `url` once `expect` shows on it (MLflow's assistant panel closed), and the page's visible text."""
    page = browser.new_page(viewport={"width": size[0], "height": size[1]})
    try:
        page.goto(url)
        page.get_by_text(expect).first.wait_for(timeout=60_000)
        time.sleep(2)  # the remaining requests (metrics, images) and the layout settle
        close = page.get_by_role("button", name="Close")  # MLflow 3.17's "MLflow Assistant" side panel
        if close.count():
            close.last.click()
            time.sleep(1)
        png.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(png))
        text = page.inner_text("body")
    finally:
        page.close()
    png.with_suffix(".txt").write_text(text)
    return text


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--outputs", type=Path, default=Path("outputs"), help="a sweep's outputs= folder")
    ap.add_argument("--study", default="conditioning_ablation")
    ap.add_argument("--out", type=Path, default=Path("docs/img"))
    args = ap.parse_args(argv)
    for db in ("mlflow.db", "optuna.db"):
        if not (args.outputs / db).is_file():
            raise SystemExit(f"--outputs={args.outputs}: no {db} (run a sweep with outputs={args.outputs} first)")
    if chromium() is None:
        raise SystemExit("chromium not found: apt-get install chromium")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        raise SystemExit("playwright not installed: pip install -e '.[screenshots]'") from None
    bindir = Path(sys.executable).parent
    if not (bindir / "optuna-dashboard").exists():
        raise SystemExit("optuna-dashboard not installed: pip install -e '.[dashboard]'")
    mport, dport = free_port(), free_port()
    pages = study_pages(args.outputs, args.study, mport, dport)
    stores = {"mlflow": f"sqlite:///{args.outputs.resolve()}/mlflow.db",
              "optuna": f"sqlite:///{args.outputs.resolve()}/optuna.db"}
    servers = {
        "mlflow": ([str(bindir / "mlflow"), "ui", "--backend-store-uri", stores["mlflow"], "--host", "127.0.0.1",
                    "--port", str(mport), "--workers", "1"], f"http://127.0.0.1:{mport}/health"),
        "optuna": ([str(bindir / "optuna-dashboard"), stores["optuna"], "--host", "127.0.0.1", "--port", str(dport),
                    "--quiet"], f"http://127.0.0.1:{dport}/api/studies"),
    }
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium(), args=CHROMIUM_ARGS)
        for name, (cmd, health) in servers.items():
            with server(cmd, health):
                for shot, (url, expect) in pages.items():
                    if shot.startswith(name):
                        shoot(browser, url, expect, args.out / f"{shot}.png")
                        print(f"{args.out / shot}.png  <-  {url}")
        browser.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
