"""``granger-mpi plot`` and ``report`` on a real run with a real rank failure, and the page in
headless Debian chromium (installed with apt-get when missing and run as root; else skipped
with the reason)."""

import base64
import os
import re
import shutil
import subprocess
from io import BytesIO

import numpy as np
import pytest

from conftest import granger, run_command, write_job

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
CHARTS = ("loss_accuracy_vs_step.png", "loss_accuracy_vs_time.png", "throughput.png",
          "recoveries.png", "time_per_rank.png")


@pytest.fixture(scope="module")
def failed_run(small_dataset, tmp_path_factory):
    """A 3-rank ULFM run of 64 steps in which world rank 2 is killed at step 20; per-rank
    time windows every 16 steps."""
    tmp = tmp_path_factory.mktemp("report")
    run_dir = tmp / "run"
    job = write_job(tmp / "job.toml", dataset=small_dataset, run_dir=run_dir,
                    data={"test_path": str(small_dataset.with_name("small-test.h5"))},
                    output={"timing_every_steps": 16})
    run = granger("run", job, "-n", "3", "--inject-failure", "rank=2,step=20", timeout=240)
    assert run.returncode == 0, run.output
    assert (run_dir / "COMPLETE").exists(), run.output
    return run_dir


def check_png(data, min_width=400, min_height=200):
    """A decodable PNG of a real chart: big enough, and not one flat colour."""
    from PIL import Image
    assert data[:8] == PNG_SIGNATURE, "not a PNG"
    image = Image.open(BytesIO(data))
    image.load()
    assert image.width >= min_width and image.height >= min_height, image.size
    pixels = np.asarray(image.convert("RGB")).reshape(-1, 3)
    non_white = np.mean(np.any(pixels < 240, axis=1))
    rgb = pixels.astype(np.uint32)   # one integer per pixel: unique(axis=0) sorts rows, far slower
    colours = np.unique((rgb[:, 0] << 16) | (rgb[:, 1] << 8) | rgb[:, 2]).size
    assert non_white > 0.01 and colours > 30, f"blank-looking image: {non_white:.3%} ink, {colours} colours"
    return image


def test_plot_writes_every_chart_and_an_index_of_them(failed_run, tmp_path):
    out = tmp_path / "charts"
    run = granger("plot", failed_run, "--out", out, timeout=120)
    assert run.returncode == 0, run.output
    for name in CHARTS:
        assert str(out / name) in run.stdout, run.output
        check_png((out / name).read_bytes())
    index = (out / "index.txt").read_text()
    assert "1 recovery event(s)" in index and "time_per_rank.png" in index, index
    assert "not plotted" not in index, index


def test_plot_works_while_the_run_holds_metrics_open(failed_run, tmp_path):
    """A live run's rank 0 keeps metrics.h5 open for writing; plotting must not be refused."""
    import h5py
    run_dir = tmp_path / "live"
    shutil.copytree(failed_run, run_dir)
    with h5py.File(run_dir / "metrics.h5", "a"):
        run = granger("plot", run_dir, timeout=120)
    assert run.returncode == 0, run.output
    assert (run_dir / "plots" / "throughput.png").is_file()


def test_plot_and_report_refuse_missing_or_empty_run_dirs(tmp_path):
    import h5py
    from granger_mpi.observe import metrics
    empty = tmp_path / "empty"
    empty.mkdir()
    no_steps = tmp_path / "no-steps"
    no_steps.mkdir()
    with h5py.File(no_steps / "metrics.h5", "w") as f:
        for name, dtype in metrics.FIELDS.items():
            f.create_dataset(name, (0,), dtype, maxshape=(None,))
    cases = {tmp_path / "absent": "not found", empty: "no metrics.h5", no_steps: "no steps recorded"}
    for command in ("plot", "report"):
        for path, expected in cases.items():
            run = granger(command, path, timeout=60)
            assert run.returncode == 2, run.output
            lines = run.stderr.strip().splitlines()
            assert len(lines) == 1 and expected in lines[0] and str(path) in lines[0], run.output
    assert not list(empty.iterdir()), "a refused run directory got files"


def _chromium():
    """Path of Debian's chromium, installed with apt-get if missing (root only)."""
    found = shutil.which("chromium")
    if found is None and os.geteuid() == 0:
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        subprocess.run(["apt-get", "install", "-y", "-q", "chromium"], env=env, timeout=600,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        found = shutil.which("chromium")
    if found is None:
        pytest.skip("headless check skipped: Debian's chromium is not installed and could not be "
                    "installed here (apt-get install chromium, as root)")
    return found


def screenshot(page, shot, width=1200, height=3000):
    """Open ``page`` in headless chromium; return (screenshot bytes, console lines)."""
    run = run_command([_chromium(), "--headless", "--no-sandbox", "--disable-gpu",
                       "--enable-logging=stderr", "--v=0", f"--screenshot={shot}",
                       f"--window-size={width},{height}", page.resolve().as_uri()], timeout=120)
    assert run.returncode == 0, run.output
    assert shot.is_file(), run.output
    # The report has no scripts, so any console message at all means something went wrong.
    console = [line for line in (run.stdout + run.stderr).splitlines()
               if "CONSOLE" in line or "Uncaught" in line]
    return shot.read_bytes(), console


def test_console_check_catches_a_broken_page(tmp_path):
    """The check below can fail: a page with a script error is caught."""
    page = tmp_path / "broken.html"
    page.write_text("<html><body><p>x</p><script>not_defined();</script></body></html>")
    _, console = screenshot(page, tmp_path / "broken.png", 400, 300)
    assert any("Uncaught ReferenceError" in line for line in console), console


def test_report_is_self_contained_and_renders_in_chromium(failed_run, tmp_path):
    page = tmp_path / "report.html"
    run = granger("report", failed_run, "--out", page, timeout=120)
    assert run.returncode == 0, run.output
    text = page.read_text()
    # Self-contained: every image inline, nothing fetched from elsewhere.
    sources = re.findall(r'src="([^"]*)"', text)
    assert len(sources) == len(CHARTS), sources
    for src in sources:
        assert src.startswith("data:image/png;base64,"), src[:60]
        check_png(base64.b64decode(src.split(",", 1)[1]))
    assert "http://" not in text and "https://" not in text and "<script" not in text
    # What the page must say: configuration, summary, completion, the event, the ranks.
    assert (failed_run / "job.toml").read_text().split("\n")[0] in text
    for expected in ("final accuracy", "Completion record", "rank failure", "world size after",
                     "Ranks (last published status)", "FAILED", "Time per rank"):
        assert expected in text, expected
    shot, console = screenshot(page, tmp_path / "report.png")
    assert not console, "chromium console messages:\n" + "\n".join(console)
    image = check_png(shot, 1000, 2000)
    # The charts were drawn: the plots' dark blue line is in the screenshot.
    pixels = np.asarray(image.convert("RGB")).reshape(-1, 3).astype(int)
    blue = np.sum(np.abs(pixels - [8, 81, 156]).sum(axis=1) < 40)
    assert blue > 500, f"only {blue} pixels of the charts' line colour: images not rendered?"
