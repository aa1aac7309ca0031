"""Debian's headless chromium driven by Selenium through chromium-driver, and the console's pages.

Nothing is downloaded: the browser and its driver are the apt packages ``chromium`` and
``chromium-driver`` (``make browser``, run by ``make test``), named by path so Selenium
Manager never looks for one of its own. Without them the browser tests fail, saying so (as
the Redis tests do without redis-server): they do not skip.
"""

import os
import shutil
import tempfile

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("CHROMEDRIVER", "/usr/bin/chromedriver")
WAIT_SEC = 20


def available():
    """Why the browser tests cannot run here, or None when they can."""
    for path in (CHROMIUM, CHROMEDRIVER):
        if not (os.path.exists(path) or shutil.which(path)):
            return f"{path} not installed (make browser)"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium not installed (make install)"
    return None


def chromium(width=1280, height=820):
    """A new headless chromium session with a profile of its own (its own sessionStorage)."""
    problem = available()
    if problem is not None:
        raise RuntimeError(f"the console's browser tests need chromium and chromium-driver: {problem}")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="console-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in (
        "--headless=new",
        "--no-sandbox",  # root in a container: chromium's sandbox needs user namespaces
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--disable-extensions",
        f"--window-size={width},{height}",
        f"--user-data-dir={profile}",
    ):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.console_profile = profile  # removed by end_session()
    return driver


def end_session(driver):
    """End a session of ``chromium()`` and remove its profile folder."""
    try:
        driver.quit()
    finally:
        shutil.rmtree(driver.console_profile, ignore_errors=True)


def page_errors(driver):
    """The browser console's script errors and Content-Security-Policy violations since the last call."""
    return [
        entry["message"]
        for entry in driver.get_log("browser")
        if "Content Security Policy" in entry["message"] or "Uncaught" in entry["message"]
    ]


class Page:
    def __init__(self, driver, base):
        self.driver = driver
        self.base = base

    def wait(self, condition, what, timeout=WAIT_SEC):
        """Wait until ``condition()`` is true (the page changes on its own clock), and return it."""
        from selenium.common.exceptions import StaleElementReferenceException, WebDriverException
        from selenium.webdriver.support.ui import WebDriverWait

        def check(_):
            try:
                return condition()
            except (StaleElementReferenceException, WebDriverException):
                return False

        return WebDriverWait(self.driver, timeout, poll_frequency=0.1).until(
            check, message=f"not within {timeout} s: {what}"
        )

    def by_id(self, element_id):
        from selenium.webdriver.common.by import By

        return self.driver.find_element(By.ID, element_id)

    def all(self, css):
        from selenium.webdriver.common.by import By

        return self.driver.find_elements(By.CSS_SELECTOR, css)

    def fill(self, element_id, text):
        field = self.by_id(element_id)
        field.clear()
        field.send_keys(text)


class ChatPage(Page):
    """The chat page of one profile (docs/console.md#the-chat-page)."""

    def open(self):
        self.driver.get(self.base + "/console/")
        self.wait(lambda: self.by_id("signin").is_displayed() or self.by_id("app").is_displayed(), "the page loaded")
        return self

    def sign_in(self, profile, device="browser"):
        self.wait(lambda: self.by_id("signin").is_displayed(), "the sign-in form")
        if self.by_id("profile").is_displayed():  # development: the page fetches the profile's token
            self.fill("profile", profile)
        self.fill("device", device)
        self.by_id("signin-button").click()
        self.wait_connected()
        return self

    def status(self):
        return self.by_id("conn-status").text

    def wait_connected(self, timeout=WAIT_SEC):
        return self.wait(lambda: self.status().startswith("connected"), "connected", timeout)

    # The page re-renders its lists on every event: read them in one script, not element by element.

    def room_ids(self):
        return self.driver.execute_script(
            "return [...document.querySelectorAll('#rooms li')].map(li => li.dataset.roomId)"
        )

    def create_room(self, name, members=()):
        before = set(self.room_ids())
        self.fill("room-name", name)
        self.fill("room-members", ", ".join(members))
        self.by_id("create-room-button").click()
        return self.wait(lambda: next(iter(set(self.room_ids()) - before), None), f"room {name} created")

    def open_room(self, room_id):
        self.wait(lambda: room_id in self.room_ids(), f"room {room_id} listed")
        self.driver.execute_script(
            "[...document.querySelectorAll('#rooms li')].find(li => li.dataset.roomId === arguments[0]).click()",
            room_id,
        )
        self.wait(lambda: self.by_id("composer").is_displayed(), "the room open")

    def send(self, text):
        self.fill("message", text)
        self.by_id("send").click()

    def type_without_sending(self, text):
        self.by_id("message").send_keys(text)

    def messages(self):
        """[(sender, text)] of the timeline's non-system lines, in order."""
        lines = self.driver.execute_script(
            "return [...document.querySelectorAll('#timeline li:not(.system)')]"
            ".map(li => [li.querySelector('.sender').textContent, li.querySelector('.text').textContent])"
        )
        return [tuple(line) for line in lines]

    def system_lines(self):
        """[(actor, what)] of the timeline's system lines (joins, leaves), in order."""
        lines = self.driver.execute_script(
            "return [...document.querySelectorAll('#timeline li.system')]"
            ".map(li => [li.querySelector('.sender').textContent, li.querySelector('.text').textContent])"
        )
        return [tuple(line) for line in lines]

    def wait_message(self, sender, text, timeout=WAIT_SEC):
        return self.wait(lambda: (sender, text) in self.messages(), f"{sender}: {text!r} shown", timeout)

    def typing(self):
        return self.by_id("typing").text

    def members(self):
        """{profile id: "online" | "offline" | "presence unknown"} of the open room's member list."""
        return self.driver.execute_script(
            "return Object.fromEntries([...document.querySelectorAll('#members li[data-profile-id]')]"
            ".map(li => [li.dataset.profileId, li.title]))"
        )

    def seen_by(self, text):
        """The "seen by ..." line under the message ``text``, or ''."""
        return self.driver.execute_script(
            "const li = [...document.querySelectorAll('#timeline li')]"
            ".find(li => li.querySelector('.text').textContent === arguments[0]);"
            "const seen = li && li.querySelector('.seen'); return seen ? seen.textContent : ''",
            text,
        )


class OperatorPage(Page):
    """The operator page (docs/console.md#the-operator-page)."""

    def open(self):
        self.driver.get(self.base + "/console/operator")
        self.wait(lambda: self.by_id("admin-signin").is_displayed() or self.by_id("status").is_displayed(), "loaded")
        return self

    def use_token(self, token):
        from selenium.webdriver.common.keys import Keys

        self.fill("admin-token", token)
        self.by_id("admin-token").send_keys(Keys.ENTER)

    def error(self):
        return self.by_id("admin-error").text

    def showing_status(self):
        return self.by_id("status").is_displayed()

    def table(self, table_id):
        """{first cell: second cell} of a status table (read in one script: it is redrawn every poll)."""
        rows = self.driver.execute_script(
            "return [...document.querySelectorAll('#' + arguments[0] + ' tbody tr')]"
            ".map(tr => [...tr.querySelectorAll('td')].map(td => td.textContent))",
            table_id,
        )
        return {cells[0]: cells[1] for cells in rows if len(cells) >= 2}
