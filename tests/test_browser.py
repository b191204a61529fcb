"""End to end in a real headless Chromium: the page uploads an image (file chooser
and drag-and-drop), shows the expected top result, "more like this" works, and an
upload error is shown on the page.

Needs Debian's ``chromium`` (or $CBIR_CHROMIUM) and the ``playwright`` Python
package (its bundled browsers are never used or downloaded). Skipped with the
reason when either is missing; ``.ci/run`` installs both.

The screenshot of the final page is always taken; with ``CBIR_UPDATE_SCREENSHOT=1``
it is also copied to ``docs/screenshot.png`` (the README's), so an ordinary test
run never rewrites a tracked file.
"""

from __future__ import annotations

import os
import shutil
import threading
from pathlib import Path

import pytest
from conftest import REPO
from test_server import build_index

pytestmark = pytest.mark.slow

CHROMIUM = Path(os.environ.get("CBIR_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
N_IMAGES = 12
TIMEOUT_MS = 20_000


@pytest.fixture
def live_server(tmp_path, tiny_embedder):
    """(base URL, images folder) of a real HTTP server on a free loopback port."""
    from cbir_cli.search.searcher import Searcher
    from cbir_cli.serve.app import create_app, make_http_server, server_url

    folder, index_dir = tmp_path / "images", tmp_path / "index"
    build_index(folder, index_dir, tiny_embedder, N_IMAGES)
    server = make_http_server(create_app(Searcher.open(index_dir, embedder=tiny_embedder)), "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server_url(server), folder
    server.close()
    thread.join(5)


@pytest.fixture
def page(tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright Python package is not installed")
    if not CHROMIUM.is_file():
        pytest.skip(f"Chromium not found at {CHROMIUM} (apt-get install chromium, or set $CBIR_CHROMIUM)")
    with sync_api.sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"), executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS,
            viewport={"width": 1180, "height": 760},
        )
        try:
            tab = context.pages[0] if context.pages else context.new_page()
            tab.set_default_timeout(TIMEOUT_MS)
            yield tab
        finally:
            context.close()


def top_name(page) -> str:
    return page.locator('.result[data-rank="1"] .name').inner_text()


def wait_for_results_of(page, query_name: str) -> None:
    page.wait_for_function(
        "name => document.getElementById('status').textContent.endsWith('results for ' + name)", arg=query_name
    )


def test_upload_shows_the_same_image_first_and_more_like_this_works(live_server, page, tmp_path):
    url, folder = live_server
    page.goto(url)
    page.wait_for_function("document.getElementById('health').textContent.startsWith('12 images')")
    assert "test_tiny" in page.locator("#health").inner_text()
    page.fill("#k", "6")

    # 1. file chooser upload
    page.set_input_files("#file", str(folder / "img_005.jpg"))
    wait_for_results_of(page, "img_005.jpg")
    assert page.locator(".result").count() == 6
    assert top_name(page) == "img_005.jpg"
    assert page.locator('.result[data-rank="1"] .score').inner_text() == "1.000"
    assert page.locator('.result[data-rank="1"] .rank').inner_text() == "#1"
    # thumbnails really load (decoded by the browser, not broken-image icons)
    page.wait_for_function("[...document.querySelectorAll('.result img')].every(i => i.complete && i.naturalWidth > 0)")

    # 2. click the second result: "more like this" puts it first
    second = page.locator('.result[data-rank="2"]')
    second_name = second.locator(".name").inner_text()
    assert second_name != "img_005.jpg"
    second.click()
    wait_for_results_of(page, second_name)
    assert top_name(page) == second_name

    # 3. drag and drop a file onto the drop zone
    page.evaluate(
        """async () => {
            const blob = await (await fetch('/api/images/' + 9)).blob();
            const dt = new DataTransfer();
            dt.items.add(new File([blob], 'dropped.jpg', {type: 'image/jpeg'}));
            document.getElementById('dropzone').dispatchEvent(
                new DragEvent('drop', {dataTransfer: dt, bubbles: true, cancelable: true}));
        }"""
    )
    wait_for_results_of(page, "dropped.jpg")
    assert top_name(page) == "img_009.jpg"

    # 4. a non-image upload shows the server's reason, no results
    page.set_input_files("#file", files=[{"name": "notes.txt", "mimeType": "text/plain", "buffer": b"hello"}])
    page.wait_for_selector("#status.error")
    assert "notes.txt: not a recognised image format" in page.locator("#status").inner_text()
    assert page.locator(".result").count() == 0

    # 5. the README screenshot: a successful search with all thumbnails loaded
    page.mouse.move(0, 0)  # no hover effect on a card in the picture
    page.fill("#k", "12")
    page.set_input_files("#file", str(folder / "img_003.jpg"))
    wait_for_results_of(page, "img_003.jpg")
    assert top_name(page) == "img_003.jpg" and page.locator(".result").count() == N_IMAGES
    page.wait_for_function("[...document.querySelectorAll('.result img')].every(i => i.complete && i.naturalWidth > 0)")
    shot = tmp_path / "screenshot.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000
    if os.environ.get("CBIR_UPDATE_SCREENSHOT") == "1":
        (REPO / "docs").mkdir(exist_ok=True)
        shutil.copyfile(shot, REPO / "docs" / "screenshot.png")


def drag(page, start: tuple[float, float], end: tuple[float, float], on: str = "#query-img") -> None:
    """Press at ``start`` and release at ``end``, in fractions of element ``on``."""
    rect = page.locator(on).bounding_box()
    page.mouse.move(rect["x"] + start[0] * rect["width"], rect["y"] + start[1] * rect["height"])
    page.mouse.down()
    page.mouse.move(rect["x"] + end[0] * rect["width"], rect["y"] + end[1] * rect["height"], steps=8)
    page.mouse.up()


def wait_for_top(page, name: str) -> None:
    page.wait_for_function(
        "name => { const top = document.querySelector('.result[data-rank=\"1\"] .name');"
        " return top && top.textContent === name && document.getElementById('status').textContent"
        ".startsWith('4 results'); }", arg=name)


def test_drawing_a_region_searches_with_it_and_moving_it_searches_again(live_server, page, tmp_path):
    """Two indexed photos side by side, uploaded: a rectangle drawn over the right
    one finds it first; dragged onto the left one, that one comes first; a corner
    resizes it, and each change searches again."""
    from conftest import make_image
    from PIL import Image

    url, _ = live_server
    both = Image.new("RGB", (640, 240))
    both.paste(make_image(3).resize((320, 240)), (0, 0))
    both.paste(make_image(8).resize((320, 240)), (320, 0))
    both.save(tmp_path / "two-photos.png")
    page.goto(url)
    page.wait_for_function("document.getElementById('health').textContent.startsWith('12 images')")
    page.fill("#k", "4")
    page.set_input_files("#file", str(tmp_path / "two-photos.png"))
    wait_for_results_of(page, "two-photos.png")
    assert page.locator("#box").is_hidden()

    drag(page, (0.53, 0.06), (0.97, 0.94))  # draw over the right photo
    wait_for_top(page, "img_008.jpg")
    assert "region 53%–97%" in page.locator("#region").inner_text()

    drag(page, (0.75, 0.5), (0.25, 0.5), on="#query-img")  # move it onto the left photo
    wait_for_top(page, "img_003.jpg")
    assert "region 3%–47%" in page.locator("#region").inner_text()

    before = page.locator("#box").bounding_box()
    rect = page.locator("#query-img").bounding_box()
    handle = page.locator('#box .handle[data-corner="se"]').bounding_box()
    with page.expect_response(lambda r: r.url.endswith("/api/search") and r.request.method == "POST") as answer:
        page.mouse.move(handle["x"] + 4, handle["y"] + 4)
        page.mouse.down()
        page.mouse.move(rect["x"] + 0.49 * rect["width"], rect["y"] + 0.99 * rect["height"], steps=6)
        page.mouse.up()
    # The search ran again, with the resized region.
    assert answer.value.json()["query"]["box"].endswith(",0.49,0.99")
    after = page.locator("#box").bounding_box()  # grown to (almost) the whole left photo
    assert after["width"] > before["width"] + 5 and after["height"] > before["height"] + 5
    assert "region 3%–49% × 6%–99%" in page.locator("#region").inner_text()
    page.wait_for_function("document.getElementById('status').textContent.startsWith('4 results')")
    wait_for_top(page, "img_003.jpg")

    page.mouse.move(0, 0)
    page.wait_for_function("[...document.querySelectorAll('.result img')].every(i => i.complete && i.naturalWidth > 0)")
    shot = tmp_path / "box-search.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    if os.environ.get("CBIR_UPDATE_SCREENSHOT") == "1":
        shutil.copyfile(shot, REPO / "docs" / "box-search.png")

    page.click("#clear-box")
    page.wait_for_function("document.getElementById('box').hidden")


def test_the_dedup_report_page_shows_every_group_with_its_thumbnails(page, tmp_path, tiny_embedder):
    """The HTML page of ``cbir dedup --report`` in a real browser: every group, every
    thumbnail loads. Its screenshot is the README's (``docs/dedup-report.png``)."""
    from conftest import make_image
    from test_dedup import N_DISTINCT, TINY_THRESHOLD, plant

    from cbir_cli.pipeline.options import ExtractOptions
    from cbir_cli.pipeline.sync import index_folder
    from cbir_cli.search.dedup import find_duplicates
    from cbir_cli.search.gallery import write_dedup_report
    from cbir_cli.search.searcher import Searcher

    folder = tmp_path / "photos"
    expected = plant(folder, [make_image(i, size=(320, 240)) for i in range(N_DISTINCT)],
                     [f"img_{i:03d}.jpg" for i in range(N_DISTINCT)])
    index_folder(folder, tmp_path / "index", options=ExtractOptions(workers=0), embedder=tiny_embedder)
    result = find_duplicates(Searcher.open(tmp_path / "index", embedder=tiny_embedder), TINY_THRESHOLD)
    index = write_dedup_report(tmp_path / "report", result)
    page.set_viewport_size({"width": 900, "height": 700})
    page.goto(index.as_uri())
    assert page.locator("h3").count() == len(expected)
    assert page.locator("figure.keep").count() == len(expected) and page.locator("figure.dup").count() == 12
    page.wait_for_function("[...document.images].every(i => i.complete && i.naturalWidth > 0)")
    shot = tmp_path / "dedup-report.png"
    page.screenshot(path=str(shot))
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    if os.environ.get("CBIR_UPDATE_SCREENSHOT") == "1":
        shutil.copyfile(shot, REPO / "docs" / "dedup-report.png")
