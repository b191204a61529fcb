"""End to end in a real headless Chromium: the page uploads an image (file chooser
and drag-and-drop), shows the expected top result, "more like this" works, and an
upload error is shown on the page; words search an index of a CLIP model
(issue 24) and the word box says why it is disabled on any other; the first impression (issue 26): an empty state
with nothing broken, the header in a user's words, a keyboard path through a
search, tiles with their folder and a name that opens the full image.

Needs Debian's ``chromium`` (or $CBIR_CHROMIUM) and the ``playwright`` Python
package (its bundled browsers are never used or downloaded). Skipped with the
reason when either is missing; ``.ci/run`` installs both.

Screenshots (1280x900) are always taken; with ``CBIR_UPDATE_SCREENSHOT=1`` they are
also saved, reduced to 256 colours, as the README's ``docs/web-empty.png``,
``docs/screenshot.png`` (results) and ``docs/box-search.png`` (a region), so an
ordinary test run never rewrites a tracked file.
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
VIEWPORT = {"width": 1280, "height": 900}
ALL_THUMBNAILS_LOADED = "[...document.querySelectorAll('.result img')].every(i => i.complete && i.naturalWidth > 0)"


def serve_index(tmp_path: Path, embedder):
    """(base URL, images folder) of a real HTTP server on a free loopback port."""
    from cbir_cli.search.rerank import RerankSettings
    from cbir_cli.search.searcher import Searcher
    from cbir_cli.serve.app import create_app, make_http_server, server_url

    folder, index_dir = tmp_path / "images", tmp_path / "index"
    build_index(folder, index_dir, embedder, N_IMAGES)
    # Re-ranked, as `cbir serve` searches.
    searcher = Searcher.open(index_dir, embedder=embedder, rerank=RerankSettings())
    server = make_http_server(create_app(searcher), "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server_url(server), folder
    server.close()
    thread.join(5)


@pytest.fixture
def live_server(tmp_path, tiny_embedder):
    """An index of the tiny CNN (no text tower)."""
    yield from serve_index(tmp_path, tiny_embedder)


@pytest.fixture
def clip_server(tmp_path, tiny_clip_embedder):
    """An index of the tiny CLIP model (random weights): it answers words."""
    yield from serve_index(tmp_path, tiny_clip_embedder)


@pytest.fixture
def page(tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright Python package is not installed")
    if not CHROMIUM.is_file():
        pytest.skip(f"Chromium not found at {CHROMIUM} (apt-get install chromium, or set $CBIR_CHROMIUM)")
    with sync_api.sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"), executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS,
            viewport=VIEWPORT,
        )
        try:
            tab = context.pages[0] if context.pages else context.new_page()
            tab.set_default_timeout(TIMEOUT_MS)
            yield tab
        finally:
            context.close()


def screenshot(page, tmp_path: Path, name: str) -> Path:
    """The viewport as a PNG; saved into docs/ (256 colours: a few tens of KB) with
    ``CBIR_UPDATE_SCREENSHOT=1``."""
    shot = tmp_path / name
    page.evaluate("document.activeElement && document.activeElement.blur()")  # no focus ring in the picture
    page.screenshot(path=str(shot))
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    if os.environ.get("CBIR_UPDATE_SCREENSHOT") == "1":
        from PIL import Image

        (REPO / "docs").mkdir(exist_ok=True)
        with Image.open(shot) as image:
            image.convert("RGB").quantize(256).save(REPO / "docs" / name, optimize=True)
    return shot


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
    page.wait_for_function(ALL_THUMBNAILS_LOADED)

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
    page.wait_for_function(ALL_THUMBNAILS_LOADED)
    assert screenshot(page, tmp_path, "screenshot.png").stat().st_size > 20_000


def focused(page) -> str:
    """What has the keyboard focus: #id, or tag.class[data-rank of its tile]."""
    return page.evaluate("""() => { const e = document.activeElement; if (e.id) return '#' + e.id;
        const tile = e.closest('.result'); return e.tagName.toLowerCase() + '.' + e.className
        + (tile ? '@' + tile.dataset.rank : ''); }""")


def test_first_impression_header_empty_state_keyboard_path_and_tiles(live_server, page, tmp_path):
    """Issue 26: before any search only what can be used is shown (no broken query
    image); the header speaks a user's words (details on hover and in /api/health);
    Tab reaches the drop zone, Enter opens it, then K, folder, score and every tile;
    a tile names its file and rank (alt text) and its folder; its name opens the full
    image, its picture searches for more like it."""
    url, folder = live_server
    page.goto(url)
    summary = "12 images · test_tiny · exact search, re-ranked"
    page.wait_for_function("s => document.getElementById('health').textContent === s", arg=summary)
    details = page.locator("#health").get_attribute("title")
    assert "flat; re-ranked: " in details and "test_tiny" in details
    health = page.evaluate("fetch('/api/health').then(r => r.json())")
    assert health["summary"] == summary and health["index_type"].startswith("flat; re-ranked")

    # 1. the empty state: the drop zone and a one-line hint; no image at all, so none broken
    assert page.locator("#query").is_hidden() and page.locator("#region").is_hidden()
    assert page.evaluate("[...document.images].filter(i => i.offsetParent !== null).length") == 0
    assert page.locator("#hint").inner_text() == "Choose or drop a photo to find the most similar images in the index."
    assert page.locator("#dropzone").is_visible()
    screenshot(page, tmp_path, "web-empty.png")

    # 2. the keyboard: Tab to the drop zone, Enter opens the file chooser. Playwright
    # starts intercepting choosers when the first listener is added, asynchronously:
    # a chooser opened before that is a native one the test never sees (the first
    # Enter failed now and then, a second always worked). Listen from here on.
    page.on("filechooser", lambda _chooser: None)
    page.evaluate("0")  # a round trip: the interception is on
    page.keyboard.press("Tab")
    assert focused(page) == "#dropzone"
    with page.expect_file_chooser() as chooser:
        page.keyboard.press("Enter")
    chooser.value.set_files(str(folder / "img_005.jpg"))
    wait_for_results_of(page, "img_005.jpg")
    assert page.locator("#query-img").get_attribute("alt") == "query: img_005.jpg"
    order = []
    for _ in range(7):
        page.keyboard.press("Tab")
        order.append(focused(page))
    assert order == ["#k", "#under", "#min-score", "button.picture@1", "a.name@1", "button.picture@2", "a.name@2"]
    second = page.locator('.result[data-rank="2"]')
    second_name = second.locator(".name").inner_text()
    assert second.locator("img").get_attribute("alt") == f"{second_name}, rank 2: search for more like it"
    page.keyboard.press("Shift+Tab")  # back to the second tile's picture: Enter searches with it
    assert focused(page) == "button.picture@2"
    page.keyboard.press("Enter")
    wait_for_results_of(page, second_name)
    assert top_name(page) == second_name

    # 3. scores follow the order; a tile shows its folder, full path on hover
    scores = [float(t.split()[0]) for t in page.locator(".result .score").all_inner_texts()]
    assert scores == sorted(scores, reverse=True)
    tile = page.locator('.result[data-rank="3"]')
    assert tile.locator(".folder").inner_text() == "…/images"
    assert tile.locator(".folder").get_attribute("title") == str(folder)

    # 4. the name opens the full image in a new tab; the picture searches for more like it
    third_id, third_name = tile.get_attribute("data-id"), tile.locator(".name").inner_text()
    with page.context.expect_page() as opened:
        tile.locator(".name").click()
    opened.value.wait_for_load_state()
    assert opened.value.url == f"{url.rstrip('/')}/api/images/{third_id}"
    opened.value.close()
    assert top_name(page) == second_name  # opening the image did not search
    tile.locator(".picture").click()
    wait_for_results_of(page, third_name)
    assert top_name(page) == third_name

    # 5. a phone-width window: nothing wider than the screen
    page.set_viewport_size({"width": 420, "height": 900})
    page.wait_for_function(ALL_THUMBNAILS_LOADED)
    assert page.evaluate("document.documentElement.scrollWidth") <= 420
    page.set_viewport_size(VIEWPORT)


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

    # The title says what was searched: a region of the upload, not the upload.
    assert page.locator("#status").inner_text() == "4 results for a region of two-photos.png"
    page.mouse.move(0, 0)
    page.wait_for_function(ALL_THUMBNAILS_LOADED)
    screenshot(page, tmp_path, "box-search.png")

    page.click("#clear-box")
    page.wait_for_function("document.getElementById('box').hidden")


def test_words_typed_and_entered_search_a_clip_index_alone_and_with_the_image(clip_server, page):
    """Issue 24: the word box is labelled and reached by Tab after the drop zone;
    Enter searches by the words (the order the JSON API gives), the status line and
    the title name them; with "and the image below" ticked, the image shown and the
    words make one query, named as such."""
    url, folder = clip_server
    page.goto(url)
    page.wait_for_function("!document.getElementById('words').disabled")
    assert page.evaluate("fetch('/api/health').then(r => r.json())")["has_text"] is True
    assert page.locator("label[for=words]").inner_text() == "Search by words"
    assert page.locator("#words-note").inner_text() == "Describe the picture you want; Enter searches."
    page.keyboard.press("Tab")
    assert focused(page) == "#dropzone"
    page.keyboard.press("Tab")
    assert focused(page) == "#words"
    page.keyboard.type("a yellow flower")
    page.keyboard.press("Enter")
    wait_for_results_of(page, "“a yellow flower”")
    assert page.title() == "cbir: “a yellow flower”"
    assert page.locator(".result").count() == N_IMAGES and page.locator("#query").is_hidden()
    shown = page.locator(".result").evaluate_all("tiles => tiles.map(t => Number(t.dataset.id))")
    api = page.evaluate("fetch('/api/search?text=a%20yellow%20flower&k=12').then(r => r.json())")
    assert shown == [hit["id"] for hit in api["results"]]

    # words with the image shown: one combined query
    page.set_input_files("#file", str(folder / "img_003.jpg"))
    wait_for_results_of(page, "img_003.jpg")
    assert page.title() == "cbir: img_003.jpg"
    page.check("#with-image")
    page.focus("#words")
    page.keyboard.press("Enter")
    wait_for_results_of(page, "img_003.jpg + “a yellow flower”")
    assert page.title() == "cbir: img_003.jpg + “a yellow flower”"
    assert page.locator("#query").is_visible()


def test_on_a_cnn_index_the_word_box_is_disabled_and_says_it_needs_a_clip_model(live_server, page):
    url, _ = live_server
    page.goto(url)
    page.wait_for_function("document.getElementById('words-note').textContent !== ''")
    assert page.locator("#words").is_visible() and page.locator("#words").is_disabled()
    assert page.locator("#words-go").is_disabled()
    note = page.locator("#words-note").inner_text()
    assert note == "Searching by words needs a CLIP model; this index uses test_tiny."
    assert page.evaluate("fetch('/api/health').then(r => r.json())")["has_text"] is False


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
