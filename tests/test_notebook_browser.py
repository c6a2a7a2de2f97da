"""A real browser runs notebook 01 in JupyterLab: the slice viewer widget appears and draws a brain.

Starts ``jupyter lab --no-browser`` on a free port with a token, in a temporary
folder holding a copy of the notebook (so autosave never touches the repo),
drives headless Chromium (Debian ``chromium`` + ``chromium-driver``) with
selenium through *Run > Run All Cells*, waits for every cell and the viewer,
and saves screenshots to ``tests/artifacts/notebook_browser/`` (ignored by git).
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
NOTEBOOK = ROOT / "notebooks" / "01_load_and_look.ipynb"
ARTEFACTS = ROOT / "tests" / "artifacts" / "notebook_browser"
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
def jupyter_lab(tmp_path):
    """URL (with token) of a JupyterLab serving a temporary folder that holds a copy of notebook 01."""
    root = tmp_path / "root"
    root.mkdir()
    shutil.copy(NOTEBOOK, root / NOTEBOOK.name)
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
        yield f"{base}/lab/tree/{NOTEBOOK.name}?token={token}"
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


def test_run_all_cells_in_jupyterlab_shows_the_slice_viewer(jupyter_lab, browser):
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    ARTEFACTS.mkdir(parents=True, exist_ok=True)
    cells = _code_cells(NOTEBOOK)

    def finished(driver) -> bool:
        prompts = [p.text.strip() for p in driver.find_elements(By.CSS_SELECTOR, ".jp-CodeCell .jp-InputPrompt")]
        return len(prompts) == cells and all(DONE_PROMPT.match(p) for p in prompts)

    def drawn_viewers(driver):
        images = driver.find_elements(By.CSS_SELECTOR, ".spadkit-slice-viewer img")
        ready = len(images) == 3 and all(driver.execute_script("return arguments[0].naturalWidth", i) > 100 for i in images)
        return driver.find_elements(By.CSS_SELECTOR, ".spadkit-slice-viewer") if ready else False

    def until(condition, seconds: float, what: str):
        try:
            return WebDriverWait(browser, seconds, poll_frequency=0.5).until(condition)
        except TimeoutException:
            browser.save_screenshot(str(ARTEFACTS / "failure.png"))
            pytest.fail(f"timed out after {seconds} s waiting for {what}; screenshot {ARTEFACTS / 'failure.png'}")

    browser.get(jupyter_lab)
    until(ec.presence_of_element_located((By.CSS_SELECTOR, ".jp-NotebookPanel .jp-Cell")), SERVER_START_S, "the notebook")
    until(lambda d: "Idle" in d.find_element(By.ID, "jp-main-statusbar").text, SERVER_START_S, "an idle kernel")
    next(m for m in browser.find_elements(By.CSS_SELECTOR, ".lm-MenuBar-item") if m.text.strip() == "Run").click()
    until(ec.element_to_be_clickable((By.CSS_SELECTOR, '.lm-Menu-item[data-command="runmenu:run-all"]')), 10, "Run > Run All Cells").click()
    until(finished, RUN_ALL_S, f"all {cells} code cells to run")
    errors = browser.find_elements(By.CSS_SELECTOR, '.jp-RenderedText[data-mime-type="application/vnd.jupyter.error"]')
    assert errors == [], [e.text[:500] for e in errors]
    viewer = until(drawn_viewers, 60, "the three slice viewers to draw")[0]

    browser.execute_script("arguments[0].scrollIntoView({block: 'start'})", viewer)
    time.sleep(0.5)
    browser.save_screenshot(str(ARTEFACTS / "01_load_and_look.png"))
    viewer.screenshot(str(ARTEFACTS / "01_slice_viewer_coronal.png"))
    _looks_like_a_brain_slice(ARTEFACTS / "01_slice_viewer_coronal.png")

    # a user's click goes to the kernel and a new picture comes back
    image = viewer.find_element(By.TAG_NAME, "img")
    before = image.get_attribute("src")
    next(b for b in viewer.find_elements(By.CSS_SELECTOR, "button") if b.text.strip() == "axial").click()
    until(lambda d: image.get_attribute("src") != before, 30, "the viewer to redraw after clicking 'axial'")
    time.sleep(0.5)
    viewer.screenshot(str(ARTEFACTS / "01_slice_viewer_axial.png"))
    _looks_like_a_brain_slice(ARTEFACTS / "01_slice_viewer_axial.png")
    assert "axial" in viewer.find_element(By.CSS_SELECTOR, "button.mod-active").text
