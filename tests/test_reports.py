"""report.html (test.py, train.py --folds all) and the runs table (runs.py): self-contained pages a user opens
offline; one test renders them in a real headless browser."""
import re
from pathlib import Path
from types import SimpleNamespace

import pytest

import runs
import train
from tests.helpers import evaluate, read_history, run_dirs, write_config
from tests.task_data import make_task_set
from tests.test_tasks import task_config

CHROMIUM = Path("/usr/bin/chromium")
BROWSER_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def experiment(data_slice, tmp_path_factory):
    """Two runs that differ in their learning rate (the first tested), and a two-fold run group."""
    from tests.helpers import make_config

    base = tmp_path_factory.mktemp("reports")
    config = make_config(data_slice, base / "saved", epochs=2, limit_train_batches=3)
    made = [train.main(["-c", str(write_config(config, base / "config.json")), "--lr", str(lr)]).run_dir
            for lr in (0.003, 0.01)]
    tested = evaluate(["-r", made[0] / "model_best.pth"])
    config["data_loader"]["args"]["n_folds"] = 2
    config["trainer"]["epochs"] = 1
    assert train.main(["-c", str(write_config(config, base / "config.json")), "--folds", "all"]) == 0
    group = run_dirs(base / "saved")[-1]
    return SimpleNamespace(base=base, runs=made, tested=tested, group=group)


def self_contained(page):
    """Nothing a browser would fetch: no script, style or image from elsewhere."""
    return not re.search(r"(src|href)\s*=\s*['\"](?!data:)|@import|url\(", page)


def test_test_py_writes_a_self_contained_report(experiment):
    assert experiment.tested == 0 and experiment.tested.out / "report.html" in experiment.tested.files
    page = (experiment.tested.out / "report.html").read_text()
    for section in ("Learning curves", "Scores per class", "Confusion matrix", "Reliability", "Most confidently wrong"):
        assert f"<h2>{section}" in page
    assert page.count("<img") == 12 and page.count("data:image/png;base64,") == 12 and self_contained(page)


def test_a_fold_group_gets_a_report_of_its_out_of_fold_predictions(experiment):
    page = (experiment.group / "report.html").read_text()
    assert "<h3>fold0</h3>" in page and "<h3>fold1</h3>" in page and "<h2>Confusion matrix" in page
    assert self_contained(page)


@pytest.mark.parametrize("kind, section", [("multilabel", "F1 against the threshold"),
                                           ("regression", "Predicted against true")])
def test_multilabel_and_regression_reports(kind, section, tmp_path):
    data = make_task_set(tmp_path / "data", n_train=48, n_test=16)
    config = task_config(kind, data, tmp_path / "saved", epochs=1)
    made = train.main(["-c", str(write_config(config, tmp_path / "config.json"))])
    tested = evaluate(["-r", made.run_dir / "model_best.pth", "-o", "data_loader.args.test_csv=test_labels.csv"])
    page = (tested.out / "report.html").read_text()
    assert f"<h2>{section}" in page and "<svg" in page and self_contained(page)


def test_runs_table_shows_what_each_run_changed_and_how_it_scored(experiment, capsys):
    assert runs.main([str(experiment.base / "saved" / "tiny")]) == 0
    lines = capsys.readouterr().out.splitlines()
    first, second = (next(line for line in lines if line.split()[0] == run.name) for run in experiment.runs)
    assert lines.index(second) < lines.index(first), "newest first"
    history = read_history(experiment.runs[0])
    best = max(history, key=lambda row: float(row["val_accuracy"]))
    metrics = (experiment.tested.out / "metrics.json").read_text()
    assert "optimizer.args.lr=0.003" in first and "optimizer.args.lr=0.01" in second
    assert f"val_accuracy  {float(best['val_accuracy']):.4f}  {best['epoch']} " in first
    assert re.search(r'"accuracy": ([0-9.]+)', metrics).group(1)[:6] in first
    assert any(line.split()[0] == experiment.group.name and "out-of-fold" in line for line in lines)
    assert (experiment.base / "saved" / "tiny" / "runs.html").exists()


def test_runs_table_of_a_run_group_and_of_nothing(experiment, tmp_path, capsys):
    """(The table of a study: tests/test_tune.py.)"""
    assert runs.main([str(experiment.group)]) == 0
    assert {line.split()[0] for line in capsys.readouterr().out.splitlines()[1:]} == {".", "fold0", "fold1"}
    (tmp_path / "empty").mkdir()
    assert runs.main([str(tmp_path / "empty")]) == 2
    assert capsys.readouterr().err.strip() == f"error: {tmp_path / 'empty'}: no runs in it (folders with config.json)"


def test_runs_table_reads_damaged_files_of_a_run_folder_as_empty_cells(experiment, tmp_path):
    """A run folder is data: a damaged metrics.json and a history.csv that is a FIFO leave cells empty, no more."""
    import os
    import shutil
    import subprocess
    import sys

    run = tmp_path / "copied" / "run"
    shutil.copytree(experiment.runs[0], run)
    (run / "test-model_best" / "metrics.json").write_text("{")
    (run / "history.csv").unlink()
    os.mkfifo(run / "history.csv")
    proc = subprocess.run([sys.executable, str(Path(runs.__file__)), str(tmp_path / "copied")], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    header, row = proc.stdout.splitlines()[:2]
    assert row.split()[0] == "run" and "best" in header


def render(browser, path, shot):
    """Open `path`, click the first column header when it has one, screenshot it; returns the console errors, page
    errors and requests that left the file."""
    page = browser.new_page()
    errors = []
    page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.on("request", lambda request: None if request.url.startswith(("file:", "data:")) else
            errors.append(request.url))
    page.goto(path.as_uri())
    if page.locator("th").count():
        page.click("th >> nth=0")
    page.screenshot(path=str(shot), full_page=True)
    page.close()
    return errors


def test_report_and_runs_table_render_in_a_headless_browser(experiment, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    if not CHROMIUM.exists():
        pytest.skip(f"no browser at {CHROMIUM}")
    import numpy as np
    from PIL import Image

    assert runs.main([str(experiment.base / "saved" / "tiny")]) == 0
    pages = [experiment.tested.out / "report.html", experiment.group / "report.html",
             experiment.base / "saved" / "tiny" / "runs.html"]
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=BROWSER_ARGS)
        try:
            for i, path in enumerate(pages):
                errors = render(browser, path, tmp_path / f"{i}.png")
                assert errors == [], f"{path}: {errors}"
                assert np.asarray(Image.open(tmp_path / f"{i}.png").convert("L")).std() > 5, f"{path} is blank"
        finally:
            browser.close()
