"""A real browser runs notebooks in JupyterLab: 01's slice viewer draws a brain; in 05 a click on the
annotator's *Learn* saves a label version and redraws the Dice plot.

Starts ``jupyter lab --no-browser`` on a free port with a token, in a temporary
folder holding a copy of the notebook (so autosave never touches the repo),
drives headless Chromium (Debian ``chromium`` + ``chromium-driver``) with
selenium through *Run > Run All Cells*, waits for every cell and the widgets,
and saves screenshots to ``tests/artifacts/notebooks/`` (ignored by git). With
``SPADKIT_UPDATE_DOCS=1`` the annotator's also replaces ``docs/notebook_annotator.png``
(the README's picture).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
ARTEFACTS = ROOT / "tests" / "artifacts" / "notebooks"
DOCS_SCREENSHOT = ROOT / "docs" / "notebook_annotator.png"
CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--window-size=1400,1800",
)
#: JupyterLab settings: no news/update checks (offline), every cell kept in the DOM.
LAB_SETTINGS = {
    "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {"fetchNews": "false", "checkForUpdates": False},
    "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {"windowingMode": "none"},
}
SERVER_START_S, RUN_ALL_S = 90, 240
#: Notebook 05 computes features and learns 7 rounds: ~2 min on 2 busy cores.
RUN_ALL_05_S = 400
#: Input prompt of a cell that has run, e.g. "[7]:" ("[*]:" while running, "[ ]:" before).
DONE_PROMPT = re.compile(r"^\[\d+\]:?$")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(CHROMIUM is None or CHROMEDRIVER is None, reason="needs Debian's chromium and chromium-driver: run `make sysdeps`"),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def jupyter_lab(tmp_path, request):
    """``open(name)``: the URL (with token) of a JupyterLab page on a copy of ``notebooks/<name>`` in a temporary
    folder. The kernel's ``SPADKIT_TUTORIAL_DIR`` is ``tmp_path / "tutorial"``."""
    root = tmp_path / "root"
    root.mkdir()
    for notebook in NOTEBOOKS.glob("*.ipynb"):
        shutil.copy(notebook, root / notebook.name)
    settings = tmp_path / "lab-settings"
    for name, values in LAB_SETTINGS.items():
        (settings / name).parent.mkdir(parents=True, exist_ok=True)
        (settings / name).write_text(json.dumps(values))
    env = dict(
        os.environ,
        JUPYTER_CONFIG_DIR=str(tmp_path / "config"),
        JUPYTER_RUNTIME_DIR=str(tmp_path / "runtime"),
        JUPYTERLAB_SETTINGS_DIR=str(settings),
        JUPYTERLAB_WORKSPACES_DIR=str(tmp_path / "workspaces"),
        SPADKIT_TUTORIAL_DIR=str(tmp_path / "tutorial"),
    )
    port, token = _free_port(), secrets.token_hex(16)
    log = (tmp_path / "jupyter.log").open("w")
    server = subprocess.Popen(
        [
            sys.executable, "-m", "jupyter", "lab", "--no-browser", "--ip=127.0.0.1", f"--port={port}", f"--IdentityProvider.token={token}",
            f"--ServerApp.root_dir={root}", "--ServerApp.terminals_enabled=False", "--LabApp.extension_manager=readonly",
            *(["--allow-root"] if os.geteuid() == 0 else []),
        ],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + SERVER_START_S
        while True:
            try:
                with urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=2):
                    break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"jupyter lab did not start:\n{(tmp_path / 'jupyter.log').read_text()[-3000:]}")
                time.sleep(0.5)
        yield lambda name: f"{base}/lab/tree/{name}?token={token}"
    finally:
        server.send_signal(signal.SIGTERM)  # the server shuts its kernels down on SIGTERM
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)  # our own session: the server and its kernel
            server.wait()
        log.close()


@pytest.fixture
def browser(tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def _code_cells(notebook: Path) -> int:
    return sum(cell["cell_type"] == "code" for cell in json.loads(notebook.read_text(encoding="utf-8"))["cells"])


def _looks_like_a_brain_slice(png: Path) -> None:
    """The screenshot shows a picture with a black background and bright anatomy, not a blank or grey box."""
    shot = np.asarray(Image.open(png).convert("L"), dtype=np.float64)
    dark = (shot < 20).mean()
    assert shot.shape[0] > 200 and shot.shape[1] > 200, shot.shape
    assert 0.05 < dark < 0.9 and shot.std() > 30, f"{png.name} looks blank (dark fraction {dark:.2f}, std {shot.std():.1f})"


class Page:
    """The browser on one notebook: run every cell, wait for conditions, save screenshots."""

    def __init__(self, browser, url: str, notebook: str):
        self.browser, self.cells = browser, _code_cells(NOTEBOOKS / notebook)
        ARTEFACTS.mkdir(parents=True, exist_ok=True)
        browser.get(url)

    def until(self, condition, seconds: float, what: str):
        from selenium.common.exceptions import TimeoutException
        from selenium.webdriver.support.ui import WebDriverWait

        try:
            return WebDriverWait(self.browser, seconds, poll_frequency=0.5).until(condition)
        except TimeoutException:
            self.browser.save_screenshot(str(ARTEFACTS / "failure.png"))
            pytest.fail(f"timed out after {seconds} s waiting for {what}; screenshot {ARTEFACTS / 'failure.png'}")

    def run_all(self, seconds: float) -> None:
        """*Run > Run All Cells*; wait until every code cell has run; fail on any error output."""
        from selenium.webdriver.common.by import By
        from selenium.webdriver.support import expected_conditions as ec

        def finished(driver) -> bool:
            prompts = [p.text.strip() for p in driver.find_elements(By.CSS_SELECTOR, ".jp-CodeCell .jp-InputPrompt")]
            return len(prompts) == self.cells and all(DONE_PROMPT.match(p) for p in prompts)

        self.until(ec.presence_of_element_located((By.CSS_SELECTOR, ".jp-NotebookPanel .jp-Cell")), SERVER_START_S, "the notebook")
        self.until(lambda d: "Idle" in d.find_element(By.ID, "jp-main-statusbar").text, SERVER_START_S, "an idle kernel")
        next(m for m in self.browser.find_elements(By.CSS_SELECTOR, ".lm-MenuBar-item") if m.text.strip() == "Run").click()
        self.until(ec.element_to_be_clickable((By.CSS_SELECTOR, '.lm-Menu-item[data-command="runmenu:run-all"]')), 10, "Run > Run All Cells").click()
        self.until(finished, seconds, f"all {self.cells} code cells to run")
        errors = self.browser.find_elements(By.CSS_SELECTOR, '.jp-RenderedText[data-mime-type="application/vnd.jupyter.error"]')
        assert errors == [], [e.text[:500] for e in errors]

    def show(self, element) -> None:
        self.browser.execute_script("arguments[0].scrollIntoView({block: 'start'})", element)
        time.sleep(0.5)


def _drawn(driver, selector: str, count: int) -> bool:
    """Whether the page holds ``count`` images matching ``selector``, each decoded (wider than 100 px)."""
    from selenium.webdriver.common.by import By

    images = driver.find_elements(By.CSS_SELECTOR, selector)
    return len(images) == count and all(driver.execute_script("return arguments[0].naturalWidth", i) > 100 for i in images)


def test_run_all_cells_in_jupyterlab_shows_the_slice_viewer(jupyter_lab, browser):
    from selenium.webdriver.common.by import By

    page = Page(browser, jupyter_lab("01_load_and_look.ipynb"), "01_load_and_look.ipynb")
    page.run_all(RUN_ALL_S)
    viewers = page.until(
        lambda d: _drawn(d, ".spadkit-slice-viewer img", 3) and d.find_elements(By.CSS_SELECTOR, ".spadkit-slice-viewer"), 60, "the three slice viewers to draw"
    )
    viewer = viewers[0]
    page.show(viewer)
    browser.save_screenshot(str(ARTEFACTS / "01_load_and_look.png"))
    viewer.screenshot(str(ARTEFACTS / "01_slice_viewer_coronal.png"))
    _looks_like_a_brain_slice(ARTEFACTS / "01_slice_viewer_coronal.png")

    # a user's click goes to the kernel and a new picture comes back
    image = viewer.find_element(By.TAG_NAME, "img")
    before = image.get_attribute("src")
    next(b for b in viewer.find_elements(By.CSS_SELECTOR, "button") if b.text.strip() == "axial").click()
    page.until(lambda d: image.get_attribute("src") != before, 30, "the viewer to redraw after clicking 'axial'")
    time.sleep(0.5)
    viewer.screenshot(str(ARTEFACTS / "01_slice_viewer_axial.png"))
    _looks_like_a_brain_slice(ARTEFACTS / "01_slice_viewer_axial.png")
    assert "axial" in viewer.find_element(By.CSS_SELECTOR, "button.mod-active").text


@pytest.mark.timeout(RUN_ALL_05_S + SERVER_START_S + 120)
def test_notebook_05_learn_click_saves_a_version_and_updates_the_plot(jupyter_lab, browser, tmp_path):
    from selenium.webdriver.common.by import By

    from spadkit.io.omezarr import OMEZarrStore
    from spadkit.notebook.tutorial import CASE

    page = Page(browser, jupyter_lab("05_active_learning.ipynb"), "05_active_learning.ipynb")
    page.run_all(RUN_ALL_05_S)
    annotator = page.until(lambda d: _drawn(d, ".spadkit-annotator img", 2) and d.find_element(By.CSS_SELECTOR, ".spadkit-annotator"), 60, "the annotator")
    store = OMEZarrStore(str(tmp_path / "tutorial" / "mni152.zarr"))
    label_name = (tmp_path / "tutorial" / "label_name.txt").read_text()
    versions = len(store.label_versions(CASE, label_name))
    status = annotator.find_element(By.CSS_SELECTOR, ".widget-html-content")
    assert "suggested:" in status.text, status.text  # the last cell went to the next suggested slice
    slice_image, plot = annotator.find_elements(By.CSS_SELECTOR, "img")
    before = slice_image.get_attribute("src"), plot.get_attribute("src")

    page.show(annotator)
    next(b for b in annotator.find_elements(By.CSS_SELECTOR, "button") if b.text.strip() == "Learn").click()
    page.until(lambda d: "learned" in status.text, 90, "the status to report the learned round")
    page.until(lambda d: (slice_image.get_attribute("src"), plot.get_attribute("src")) != before, 30, "the slice and the Dice plot to redraw")
    assert f"label version {versions + 1}" in status.text, status.text
    entries = OMEZarrStore(str(tmp_path / "tutorial" / "mni152.zarr")).label_versions(CASE, label_name)
    assert len(entries) == versions + 1 and "correction" in entries[-1]["message"]

    time.sleep(0.5)
    shot = ARTEFACTS / "05_annotator_after_learn.png"
    annotator.screenshot(str(shot))
    browser.save_screenshot(str(ARTEFACTS / "05_active_learning.png"))
    slice_image.screenshot(str(ARTEFACTS / "05_annotator_slice.png"))
    _looks_like_a_brain_slice(ARTEFACTS / "05_annotator_slice.png")
    if os.environ.get("SPADKIT_UPDATE_DOCS"):  # refresh the README's picture (a tracked file: never by default)
        shutil.copy(shot, DOCS_SCREENSHOT)
