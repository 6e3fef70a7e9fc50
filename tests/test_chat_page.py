"""The chat page at / in a real headless Chromium (Debian's chromium and chromium-driver, driven by
Selenium): it streams a reply from /v1/chat/completions, shows tokens/s, and Stop ends a reply
and frees its sequence on the server.

The server runs a tiny random model slowed to a few milliseconds per step, so that a reply is
still streaming when the test presses Stop.
"""

import shutil
import time

import pytest

pytest.importorskip("fastapi", reason="the server needs its extra (pip install -e '.[server]')")
webdriver = pytest.importorskip("selenium.webdriver", reason="the page test needs selenium (pip install -e '.[test]')")

import rwkvcpu  # noqa: E402
import rwkvcpu.server  # noqa: E402
from generate_fakes import tiny_v7_file  # noqa: E402,F401 (fixture)

CHROMIUM, DRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
WAIT = 60

if not (shutil.which(CHROMIUM) and shutil.which(DRIVER)):
    pytest.skip("Chromium is not installed (apt-get install chromium chromium-driver; .ci/run does)",
                allow_module_level=True)


class Slow:
    """The model, with each step taking at least `delay` seconds (Model.step's contract otherwise)."""

    def __init__(self, model, delay):
        self._model, self._delay = model, delay

    def step(self, pool, batch):
        time.sleep(self._delay)
        return self._model.step(pool, batch)

    def __getattr__(self, name):
        return getattr(self._model, name)


@pytest.fixture(scope="module")
def server(tiny_v7_file):
    model = Slow(rwkvcpu.load(tiny_v7_file), 0.01)
    s = rwkvcpu.server.start(model, port=0, model_name="tiny")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    from selenium.webdriver.chrome.service import Service
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-quic", f"--user-data-dir={tmp_path_factory.mktemp('chromium')}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    driver.set_page_load_timeout(WAIT)
    yield driver
    driver.quit()


def wait_for(condition, what, timeout=WAIT):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def test_the_page_streams_a_reply_and_stop_ends_one(server, browser):
    from selenium.webdriver.common.by import By
    find = lambda css: browser.find_element(By.CSS_SELECTOR, css)  # noqa: E731
    browser.get(server.url + "/")
    wait_for(lambda: find("#model").text == "tiny", "the model name")

    # a short reply, streamed to the end
    find("#max_tokens").clear()
    find("#max_tokens").send_keys("12")
    find("#message").send_keys("Hello")
    find("#send").click()
    wait_for(lambda: not find("#send").get_attribute("disabled") and "tokens/s" in find("#stats").text
             and "…" not in find("#stats").text, "the reply to finish")
    replies = browser.find_elements(By.CSS_SELECTOR, ".msg.assistant .text")
    assert len(replies) == 1 and replies[0].text
    assert find("#stats").text.split()[0].isdigit()
    assert browser.find_elements(By.CSS_SELECTOR, ".msg.user .text")[0].text == "Hello"

    # a long reply, stopped while it streams
    find("#max_tokens").clear()
    find("#max_tokens").send_keys("2000")
    find("#message").send_keys("Tell me more")
    find("#send").click()
    wait_for(lambda: len(browser.find_elements(By.CSS_SELECTOR, ".msg.assistant .text")) == 2
             and browser.find_elements(By.CSS_SELECTOR, ".msg.assistant .text")[1].text, "the second reply to start")
    find("#stop").click()
    wait_for(lambda: "(stopped)" in find("#stats").text, "the page to show the reply stopped")
    assert browser.find_elements(By.CSS_SELECTOR, ".msg.assistant .text")[1].text.endswith("[stopped]")
    # the server let go of the sequence
    wait_for(lambda: server.scheduler.active == 0, "the server to free the stopped sequence", timeout=10)
    assert server.scheduler.pool.free == server.scheduler.max_batch
