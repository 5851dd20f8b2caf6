"""The documentation site as a reader sees it: built with `mkdocs build --strict`, served on
loopback and loaded in headless Chromium (Debian's `chromium`). The home page, a how-to page with
its figures and an API page render, every file they request is served (no 404: no missing image,
stylesheet or script), and a screenshot of each is kept in outputs/docs-screenshots/.

Without mkdocs or Chromium the test is skipped, unless PERFORMER_REQUIRE_DOCS=1 (CI) makes that a
failure."""

import functools
import http.server
import os
import shutil
import subprocess
import sys
import threading

import pytest

from .conftest import ROOT

SCREENSHOTS = ROOT / "outputs" / "docs-screenshots"
PAGES = {  # page -> what its rendered DOM must hold
    "": ["modeling-performer", "Quick start"],
    "benchmarks/": ["Benchmarks", 'src="../figures/chat_decode.png"', "teacher / student"],
    "api/": ["API reference", "PerformerConfig", "causal_linear_attention"],
}


def _require(condition: bool, reason: str):
    if not condition:
        if os.environ.get("PERFORMER_REQUIRE_DOCS") == "1":
            pytest.fail(reason)
        pytest.skip(reason)


def _browser():
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    _require(subprocess.run([sys.executable, "-c", "import mkdocs, material, mkdocstrings"]).returncode == 0,
             'mkdocs is not installed (pip install ".[docs]")')
    folder = tmp_path_factory.mktemp("site")
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(folder)], cwd=ROOT,
                          capture_output=True, text=True, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    requests = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def log_request(self, code="-", size="-"):
            requests.append((self.path, int(code) if str(code).isdigit() else code))

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/", requests
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.strip("/") or "home")
def test_page_renders_in_a_browser_with_nothing_missing(site, page):
    browser = _browser()
    _require(browser is not None, "no Chromium (apt-get install chromium)")
    base, requests = site
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    shot = SCREENSHOTS / f"{page.strip('/') or 'home'}.png"
    shot.unlink(missing_ok=True)
    flags = [browser, "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
             "--virtual-time-budget=5000", "--window-size=1280,1600"]
    before = len(requests)
    dom = subprocess.run([*flags, "--dump-dom", base + page], capture_output=True, text=True, timeout=120).stdout
    subprocess.run([*flags, f"--screenshot={shot}", base + page], capture_output=True, timeout=120)
    loaded = requests[before:]
    for expected in PAGES[page]:
        assert expected in dom, f"{page or 'home'}: {expected!r} is not on the rendered page"
    assert any(path.endswith(".css") for path, _ in loaded), "the browser fetched no stylesheet"
    missing = [(path, code) for path, code in loaded if code != 200 and code != 304]
    assert not missing, f"{page or 'home'}: requests that failed: {missing}"
    if "figures/" in "".join(PAGES[page]):
        assert any(path.endswith("figures/chat_decode.png") and code in (200, 304) for path, code in loaded)
    assert shot.exists() and shot.stat().st_size > 10_000, "no screenshot"
