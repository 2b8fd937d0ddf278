"""`flexmoe report`'s page renders in a real browser (headless Chromium): the page loads and every
image on it decodes. Chromium is a CI dependency (scripts/ci-deps.sh): without it this test fails."""

import re
import shutil
import subprocess
from pathlib import Path

import matplotlib.image
import pytest

from flexmoe.cli.report import render_report

from .cli_helpers import varied_run_dir

pytestmark = pytest.mark.browser

# Runs after every image has loaded or failed: how many decoded, of how many.
IMAGE_CHECK = """<script>
window.addEventListener("load", () => {
  const images = [...document.images];
  const decoded = images.filter((image) => image.complete && image.naturalWidth > 0).length;
  document.body.dataset.images = `${decoded}/${images.length}`;
});
</script>"""


def _chromium(profile: Path, *args: str) -> str:
    """Headless Chromium's stdout for ``args``: no network, no GPU, a fresh profile."""
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    if binary is None:
        pytest.fail("chromium is not installed: run `bash scripts/ci-deps.sh` (apt-get install chromium)")
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run"]
    flags += ["--disable-background-networking", "--disable-component-update", "--disable-sync"]
    result = subprocess.run(
        [binary, *flags, f"--user-data-dir={profile}", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def _decoded_images(page: Path, profile: Path) -> tuple[int, int]:
    """``(images decoded, images on the page)`` of ``page`` as Chromium loads it."""
    checked = page.with_name("check.html")  # next to the page: the same relative image paths
    checked.write_text(page.read_text().replace("</body>", IMAGE_CHECK + "</body>"))
    dom = _chromium(profile, "--dump-dom", checked.as_uri())
    match = re.search(r'<body data-images="(\d+)/(\d+)"', dom)
    assert match, f"the page did not finish loading: {dom[:500]}"
    return int(match.group(1)), int(match.group(2))


def test_the_report_page_and_all_its_images_load_in_chromium(tmp_path):
    run = varied_run_dir(tmp_path / "run")
    page = render_report(run)
    images = re.findall(r'<img src="([^"]+)"', page.read_text())
    assert len(images) >= 8  # every kind of plot: the run has plans, drops and rerouting
    assert _decoded_images(page, tmp_path / "profile") == (len(images), len(images))

    screenshot = tmp_path / "page.png"
    _chromium(tmp_path / "profile", "--window-size=1200,1600", f"--screenshot={screenshot}", page.as_uri())
    pixels = matplotlib.image.imread(screenshot)
    assert pixels.shape[:2] == (1600, 1200) and pixels.std() > 0.05  # not a blank page

    (run / images[-1]).unlink()  # the check sees a broken image
    assert _decoded_images(page, tmp_path / "profile") == (len(images) - 1, len(images))
