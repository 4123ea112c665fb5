"""The chat page in a real headless Chromium (Debian's /usr/bin/chromium through playwright) against the app
served by `python app.py --model tiny.pth`: two messages stream in, each gets its stats line, retry re-answers
the last message from the cached state (prefill 0), and undo puts the message back in the box."""

from __future__ import annotations

import re
import shutil

import pytest

from app_harness import chat_stats, free_port, running_app

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run"]
TIMEOUT_MS = 90_000
MAX_NEW_TOKENS = 160  # about half a second of streaming on the CPU fast path (48 tokens once finished in one update)
pytestmark = pytest.mark.skipif(shutil.which(CHROMIUM) is None, reason="needs Debian's chromium")

# Watches one answer: records every distinct text of the last answer bubble (streaming evidence) and sets
# __done once the stats line, blanked while the answer streams, shows a `prefill` line again.
WATCH_ANSWER = """() => {
  window.__seen = new Set(); window.__cleared = false; window.__done = false;
  const timer = setInterval(() => {
    const bots = document.querySelectorAll('#chat [data-testid="bot"]');
    if (bots.length) window.__seen.add(bots[bots.length - 1].innerText);
    const stats = document.querySelector('#stats').innerText;
    if (!stats.includes('prefill')) window.__cleared = true;
    else if (window.__cleared) { window.__done = true; clearInterval(timer); }
  }, 5);
}"""



@pytest.fixture(scope="module")
def server(make_checkpoint, tmp_path_factory):
    tiny = make_checkpoint("5.2", n_layer=2, n_embd=128)
    with running_app(["--model", str(tiny.path), "--device", "cpu"], tmp_path_factory.mktemp("browser")) as app:
        yield app


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture(scope="module")
def page(server, browser):
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(server.url, wait_until="domcontentloaded")
    page.wait_for_selector("#message textarea")
    page.wait_for_function("document.querySelector('#model-status').innerText.includes('ready')")
    page.click("text=Generation")  # shorter answers keep the test quick (still a dozen updates or more)
    set_number(page, "#max-new-tokens input[type=number]", str(MAX_NEW_TOKENS))
    yield page
    page.close()


def set_number(page, selector: str, value: str, attempts: int = 5) -> None:
    """Type `value` into a number box of an accordion just opened. The box can be drawn again while the accordion
    opens, which puts its old value back (seen in about half the runs), so the value is typed until it stays."""
    for _ in range(attempts):
        page.fill(selector, value)
        page.keyboard.press("Tab")
        page.wait_for_timeout(300)
        if page.input_value(selector) == value:
            return
    raise AssertionError(f"{selector} did not keep {value!r}")


def send(page, text: str) -> str:
    """Type `text`, press Enter, wait for the stats line of its answer; returns that line."""
    page.evaluate(WATCH_ANSWER)
    page.fill("#message textarea", text)
    page.keyboard.press("Enter")
    page.wait_for_function("window.__done")
    return page.inner_text("#stats")


def texts(page, role: str) -> list[str]:
    return [element.inner_text() for element in page.query_selector_all(f'#chat [data-testid="{role}"]')]


def test_two_messages_stream_and_retry_reads_nothing(page):
    first = send(page, "Hello there")
    assert chat_stats(first) > 0
    assert len(page.evaluate("[...window.__seen].filter(t => t.trim())")) >= 2  # it grew while streaming
    assert page.input_value("#message textarea") == ""  # the box was cleared for the next message

    second = send(page, "Tell me about dragons")
    assert chat_stats(second) > 0
    assert texts(page, "user") == ["Hello there", "Tell me about dragons"]
    answers = texts(page, "bot")
    assert len(answers) == 2 and all(answer.strip() for answer in answers)
    assert re.search(r"· \d+ tok at \d+ tok/s · state [\d.]+ MB · .* · cpu fp32", second)

    page.evaluate(WATCH_ANSWER)
    page.click("#retry")
    page.wait_for_function("window.__done")
    assert chat_stats(page.inner_text("#stats")) == 0
    assert texts(page, "user") == ["Hello there", "Tell me about dragons"]
    assert len(texts(page, "bot")) == 2

    page.click("#undo")
    page.wait_for_function("document.querySelectorAll('#chat [data-testid=\"user\"]').length == 1")
    assert page.input_value("#message textarea") == "Tell me about dragons"


def test_overlong_message_is_refused_and_kept_in_the_box(page):
    from rwkv_chat import limits
    text = "y" * (limits.MAX_MESSAGE_CHARS + 1)
    before = texts(page, "user")
    page.fill("#message textarea", text)
    page.keyboard.press("Enter")
    page.wait_for_selector("text=/the limit is/")
    assert page.input_value("#message textarea") == text
    assert texts(page, "user") == before


def test_editing_a_message_answers_it_again_from_there(page):
    from playwright.sync_api import TimeoutError as PlaywrightTimeout
    send(page, "Original question")
    for _ in range(10):  # a click just as the event completes can be lost in the chat's last re-render: again
        page.query_selector_all('#chat button[aria-label="Edit"]')[0].click()
        try:
            page.wait_for_selector("#chat textarea", timeout=3000)
            break
        except PlaywrightTimeout:
            pass
    page.fill("#chat textarea", "Edited question")
    page.evaluate(WATCH_ANSWER)
    page.click('#chat button[aria-label="Submit"]')
    page.wait_for_function("window.__done")
    assert texts(page, "user")[-1] == "Edited question"
    assert chat_stats(page.inner_text("#stats")) > 0


def test_loading_another_precision_starts_a_new_conversation(page):
    send(page, "Before switching")
    page.get_by_label("bf16").check()
    page.click("#load")
    page.wait_for_function("document.querySelector('#model-status').innerText.includes('cpu bf16')")
    assert "ready" in page.inner_text("#model-status")
    assert texts(page, "user") == []
    assert "cpu bf16" in send(page, "After switching")


def test_what_a_person_types_is_shown_as_typed(page):
    typed = "<b>bold?</b> **stars** <img src=http://127.0.0.1:9/x.png> a_b"
    send(page, typed)
    assert texts(page, "user")[-1] == typed
    assert page.query_selector_all('#chat [data-testid="user"] img, #chat [data-testid="user"] b') == []


def test_a_tab_finds_its_chat_again_after_a_reload_and_after_a_server_restart(browser, make_checkpoint, tmp_path):
    """The tab keeps its conversation id (encrypted, in local storage); a restart on the same port and data
    directory shows the chat with its settings, and the next turn continues it."""
    tiny = make_checkpoint("5.2", n_layer=2, n_embd=128)
    args = ["--model", str(tiny.path), "--device", "cpu"]
    data, port = {"RWKV_DATA_DIR": str(tmp_path / "data")}, free_port()

    def opened(page, url):
        page.goto(url, wait_until="domcontentloaded")
        page.wait_for_selector("#message textarea")
        page.wait_for_function("document.querySelector('#model-status').innerText.includes('ready')")

    context = browser.new_context(viewport={"width": 1400, "height": 1000})  # its own local storage
    try:
        page = context.new_page()
        page.set_default_timeout(TIMEOUT_MS)
        with running_app(args, tmp_path / "first", data, port=port) as first:
            opened(page, first.url)
            page.click("text=Generation")
            set_number(page, "#max-new-tokens input[type=number]", "8")
            send(page, "Remember the word <b>kettle</b>")
            answers = texts(page, "bot")
            page.reload(wait_until="domcontentloaded")
            page.wait_for_function("document.querySelectorAll('#chat [data-testid=\"user\"]').length == 1")
            assert texts(page, "user") == ["Remember the word <b>kettle</b>"] and texts(page, "bot") == answers
            page.click("text=Generation")
            assert page.input_value("#max-new-tokens input[type=number]") == "8"  # its settings came back
        with running_app(args, tmp_path / "second", data, port=port) as second:
            opened(page, second.url)
            page.wait_for_function("document.querySelectorAll('#chat [data-testid=\"user\"]').length == 1")
            assert texts(page, "bot") == answers
            before = page.inner_text("#stats")
            page.fill("#message textarea", "What was it?")
            page.keyboard.press("Enter")
            page.wait_for_function(  # the new answer's stats line (the restored one had a prefill count too)
                "document.querySelectorAll('#chat [data-testid=\"user\"]').length == 2 && "
                "document.querySelector('#stats').innerText.includes('prefill') && "
                f"document.querySelector('#stats').innerText != {before!r}")
            stats = page.inner_text("#stats")
            page.get_by_text("Conversation", exact=True).click()
            assert "Conversation id" in page.inner_text("#conversation-info")
            assert texts(page, "user") == ["Remember the word <b>kettle</b>", "What was it?"]
            assert chat_stats(stats) > 0  # a new process: the saved tokens were read again
            page.click("#delete")
            page.wait_for_function("document.querySelectorAll('#chat [data-testid=\"user\"]').length == 0")
            opened(page, second.url)
            page.wait_for_timeout(1000)  # time for the page's restore step, which finds nothing now
            assert texts(page, "user") == []
    finally:
        context.close()
