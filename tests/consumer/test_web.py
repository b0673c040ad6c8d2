"""The web page at / against a real consumerd on Redis, RabbitMQ and the embedded broker.

``/api/state`` is checked against the truth (what was published, handled and
dead-lettered, the worker pids, the partition owners), then the page itself in Debian's
Chromium driven by selenium: the numbers it shows, Replay refused without the token
(nothing moves) and done with it (the dead letters come back and are handled, each once).
Screenshots are kept in tests/artifacts/web/ (git-ignored).
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import shutil
import subprocess
import tempfile
import textwrap
import urllib.error
import urllib.request

import pytest

from consumerd.consumer import routing
from tests.consumer.conftest import (
    AMQP_URL,
    REDIS_URL,
    Broker,
    Consumerd,
    check_broker,
    free_port,
    publish_many,
)
from tests.helpers import wait_for

TOKEN = "web-test-token"
ARTIFACTS = os.path.join(os.path.dirname(os.path.dirname(__file__)), "artifacts", "web")
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"

# NAME dead-letters a failing message at once (until the file "healed" exists); NAME-p
# has 3 partitions; a body with "hold" waits in the handler until the file "release"
# exists. Each handled message appends "i attempt" to $T_OUT, each failure "fail i".
APP = """
import json, os, time
import consumerd

NAME = json.load(open(os.environ["T_CONFIG"]))["name"]
HERE = os.path.dirname(os.environ["T_OUT"])
app = consumerd.App("web")

def write(line):
    with open(os.environ["T_OUT"], "a") as f:
        f.write(line + "\\n")

@app.consumer(NAME, max_retries=0)
def plain(body, delivery):
    while body.get("hold") and not os.path.exists(os.path.join(HERE, "release")):
        time.sleep(0.05)
    if body.get("fail") and not os.path.exists(os.path.join(HERE, "healed")):
        write(f"fail {body['i']}")
        raise RuntimeError(f"boom {body['i']}")
    write(f"{body['i']} {delivery.attempt}")

@app.consumer(NAME + "-p", partitions=3)
def partitioned(body, delivery):
    pass
"""


@pytest.fixture(params=["redis", "amqp", "sqlite"])
def site(request, tmp_path, name):
    kind = request.param
    if kind == "redis":
        check_broker(REDIS_URL)
        broker = Broker("redis", REDIS_URL, f"{name}:", name)
    elif kind == "amqp":
        check_broker(AMQP_URL)
        broker = Broker("amqp", AMQP_URL, "", name)
    else:
        broker = Broker("sqlite", f"sqlite:///{tmp_path}/broker.db")
    c = Consumerd(tmp_path, name, broker.url)
    (tmp_path / "tapp.py").write_text(textwrap.dedent(APP))
    c.configure([], name=name)
    c.kind = kind
    c.port = free_port()
    base_env = c.env
    c.env = lambda: {**base_env(), "CONSUMERD_ADMIN_TOKEN": TOKEN}
    yield c
    c.kill()
    broker.cleanup([name, f"{name}-p"])


def start(c: Consumerd) -> None:
    c.start("--metrics-port", str(c.port), workers=2)
    c.wait_workers(2)


def lines(c: Consumerd) -> list[str]:
    if not os.path.exists(c.out):
        return []
    with open(c.out) as f:
        return f.read().splitlines()


def handled(c: Consumerd) -> collections.Counter[int]:
    return collections.Counter(int(line.split()[0]) for line in lines(c) if line[0].isdigit())


def failed(c: Consumerd) -> list[int]:
    return [int(line.split()[1]) for line in lines(c) if line.startswith("fail ")]


def state(c: Consumerd) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{c.port}/api/state", timeout=5) as r:
        return json.load(r)


def post(c: Consumerd, verb: str, body: dict, token: str | None) -> tuple[int, dict]:
    request = urllib.request.Request(
        f"http://127.0.0.1:{c.port}/api/dlq/{verb}",
        data=json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {token}"} if token else {},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=5) as r:
            return r.status, json.load(r)
    except urllib.error.HTTPError as exc:
        return exc.code, json.load(exc)


def dead_letters(c: Consumerd) -> list[dict]:
    """The truth, from the tested command (run while the page is not watched: on
    RabbitMQ the page's listing would hold some for a moment)."""
    result = c.cli("dlq", "list", c.name, "--app", "tapp", "--broker", c.url, "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)["dead_letters"]


def consumer(snapshot: dict, name: str) -> dict:
    return next(entry for entry in snapshot["consumers"] if entry["name"] == name)


def fill(c: Consumerd, good: int, bad: int) -> list[dict]:
    """Publish ``good`` messages and ``bad`` failing ones; wait until all are settled."""
    publish_many(c.url, c.name, good)
    publish_many(c.url, c.name, bad, start=100, fail=True)
    wait_for(lambda: len(handled(c)) == good and len(failed(c)) == bad, 30, "all settled")
    letters = wait_for(lambda: len(found := dead_letters(c)) == bad and found, 15, "DLQ")
    assert sorted(letter["error"] for letter in letters) == sorted(
        f"RuntimeError: boom {i}" for i in range(100, 100 + bad)
    )
    return letters


def test_state_matches_the_truth_and_actions_need_the_token(site):
    c = site
    start(c)
    letters = fill(c, good=5, bad=3)
    pids = c.workers()

    # Worker 0 samples every 2 s once the page is watched, dead letters included; the
    # workers' counts reach their files within 0.25 s, or when they go idle.
    def settled(s: dict) -> bool:
        mine = consumer(s, c.name)
        return (
            len((mine["sampled"] or {}).get("dead_letters") or []) == 3
            and mine["counters"]["received"] == 8
            and sum(w["handled"] for w in s["workers"]) == 8
            and all(p["pid"] for p in consumer(s, f"{c.name}-p")["partitions"])
        )

    snapshot = wait_for(lambda: settled(s := state(c)) and s, 15, "the sample and the counts")
    assert snapshot["read_only"] is False and snapshot["app"] == "web"
    mine = consumer(snapshot, c.name)
    sampled = mine["sampled"]
    assert (sampled["ready"], sampled["retry"], sampled["dead"]) == (0, 0, 3)
    assert [(d["id"], d["error"], d["attempt"]) for d in sampled["dead_letters"]] == [
        (d["id"], d["error"], d["attempt"]) for d in letters
    ]
    assert all(0 <= d["age"] < 60 for d in sampled["dead_letters"])
    assert mine["counters"] == {"received": 8, "acked": 5, "retried": 0, "dead_lettered": 3}
    workers = snapshot["workers"]
    assert sorted(w["pid"] for w in workers) == sorted(pids)
    assert sorted(w["worker_id"] for w in workers) == [0, 1]
    assert {w["state"] for w in workers} == {"consuming"}
    assert sum(w["handled"] for w in workers) == 8
    # Each partition is held by the worker the routing gives it, as `consumerd check` says.
    by_id = {w["worker_id"]: w["pid"] for w in workers}
    parts = consumer(snapshot, f"{c.name}-p")["partitions"]
    assert [(p["queue"], p["worker_id"], p["pid"]) for p in parts] == [
        (
            routing.partition_queue(f"{c.name}-p", p),
            routing.owner_of(p, 2),
            by_id[routing.owner_of(p, 2)],
        )
        for p in range(3)
    ]

    # The message in hand, and since when.
    publish_many(c.url, c.name, 1, start=200, hold=True)
    held = wait_for(
        lambda: [(w["pid"], m) for w in state(c)["workers"] for m in w["in_hand"]], 10, "in hand"
    )
    assert len(held) == 1 and held[0][0] in pids and 0 <= held[0][1]["age"] < 10
    (c.tmp / "release").touch()
    wait_for(
        lambda: handled(c)[200] == 1 and not any(w["in_hand"] for w in state(c)["workers"]),
        10,
        "released",
    )

    # The gate: no token, a wrong one, a bad body; nothing moves.
    everything = {"consumer": c.name, "all": True}
    assert post(c, "replay", everything, None) == (403, {"error": "wrong or missing admin token"})
    assert post(c, "purge", everything, TOKEN + "x")[0] == 403
    assert post(c, "replay", {"consumer": c.name, "ids": ["--all"]}, TOKEN)[0] == 400
    assert state(c)["action"] is None

    # With it: one replayed by id, one purged by id; the third stays.
    (c.tmp / "healed").touch()
    first, second, third = (d["id"] for d in letters)
    assert post(c, "replay", {"consumer": c.name, "ids": [first]}, TOKEN)[0] == 202
    done = wait_for(lambda: (a := state(c)["action"])["state"] != "running" and a, 20, "replay")
    assert (done["state"], done["output"]) == ("done", f"1 dead letter(s) of {c.name} replayed")
    assert post(c, "purge", {"consumer": c.name, "ids": [second]}, TOKEN)[0] == 202
    done = wait_for(lambda: (a := state(c)["action"])["state"] != "running" and a, 20, "purge")
    assert (done["state"], done["output"]) == ("done", f"1 dead letter(s) of {c.name} purged")
    replayed = next(100 + i for i in range(3) if letters[i]["id"] == first)
    wait_for(lambda: handled(c)[replayed] == 1, 15, "the replayed one handled")
    wait_for(
        lambda: (
            [d["id"] for d in consumer(state(c), c.name)["sampled"].get("dead_letters") or []]
            == [third]
        ),
        15,
        "one dead letter left on the page",
    )
    c.stop()
    assert [d["id"] for d in dead_letters(c)] == [third]
    assert sum(handled(c).values()) == 7 and max(handled(c).values()) == 1


# -- the browser ---------------------------------------------------------------------------


def _install_chromium() -> None:
    """Debian's Chromium and its driver, installed when missing (as root); a test that
    cannot have them fails."""
    if os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER):
        return
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        pytest.fail(
            f"{CHROMIUM} and {CHROMEDRIVER} are missing: apt-get install chromium chromium-driver"
        )
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for argv in (
        ["apt-get", "update", "-qq"],
        ["apt-get", "install", "-y", "-qq", "chromium", "chromium-driver"],
    ):
        result = subprocess.run(
            argv, env=env, capture_output=True, text=True, timeout=600, check=False
        )
        if result.returncode != 0:
            pytest.fail(f"{' '.join(argv)} failed: {result.stderr[-2000:]}")


@pytest.fixture(scope="module")
def browser():
    _install_chromium()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    profile = tempfile.mkdtemp(prefix="consumerd-chromium-")
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
        "--window-size=1100,1000",
    ):
        options.add_argument(flag)
    # Service(path) runs this driver: selenium-manager never looks for (or downloads) one.
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def shot(driver, kind: str, step: str) -> None:
    os.makedirs(ARTIFACTS, exist_ok=True)
    driver.save_screenshot(os.path.join(ARTIFACTS, f"{kind}-{step}.png"))


def texts(driver, selector: str) -> list[str]:
    """The text of what ``selector`` matches, read in one go: the page redraws every poll."""
    script = "return Array.from(document.querySelectorAll(arguments[0]), e => e.innerText)"
    return driver.execute_script(script, selector)


def click(driver, selector: str) -> None:
    """A real click on ``selector``, again if the poll redrew it in between."""
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By

    def attempt() -> bool:
        try:
            driver.find_element(By.CSS_SELECTOR, selector).click()
        except StaleElementReferenceException:
            return False
        return True

    wait_for(attempt, 10, f"a click on {selector}")


def polled(driver) -> int:
    return int(driver.execute_script("return Number(document.body.dataset.polls || 0)"))


def test_the_page_in_a_real_browser(site, browser):
    from selenium.webdriver.common.by import By

    c = site
    start(c)
    letters = fill(c, good=4, bad=3)
    pids = c.workers()
    ids = sorted(d["id"] for d in letters)
    driver = browser
    driver.get(f"http://127.0.0.1:{c.port}/")
    name = c.name
    rows = f'.dead-letters[data-consumer="{name}"] tbody tr'
    wait_for(lambda: sorted(texts(driver, f'{rows} [data-field="id"]')) == ids, 20, "3 rows")
    assert texts(driver, f'b[data-consumer="{name}"][data-field="dead"]') == ["3"]
    assert texts(driver, f'b[data-consumer="{name}"][data-field="ready"]') == ["0"]
    assert sorted(texts(driver, f'{rows} [data-field="error"]')) == [
        f"RuntimeError: boom {i}" for i in range(100, 103)
    ]
    assert sorted(int(p) for p in texts(driver, '#workers [data-field="pid"]')) == sorted(pids)
    wait_for(
        lambda: texts(driver, '#workers [data-field="state"]') == ["consuming"] * 2, 10, "states"
    )
    assert sum(int(h) for h in texts(driver, '#workers [data-field="handled"]')) == 7
    assert len(texts(driver, f'#partitions [data-queue^="{name}-p."]')) == 3
    shot(driver, c.kind, "1-loaded")
    # On a phone: nothing wider than the screen (wide tables scroll inside their box).
    driver.execute_cdp_cmd(
        "Emulation.setDeviceMetricsOverride",
        {"width": 390, "height": 844, "deviceScaleFactor": 1, "mobile": True},
    )
    try:
        wait_for(lambda: driver.execute_script("return innerWidth") == 390, 5, "phone width")
        assert driver.execute_script("return document.documentElement.scrollWidth") <= 390
        shot(driver, c.kind, "1-phone")
    finally:
        driver.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})

    # Without the token: refused, and nothing moves.
    replay_all = f'button.replay-all[data-consumer="{name}"]'
    click(driver, replay_all)
    wait_for(lambda: "refused (403)" in texts(driver, "#message")[0], 10, "403")
    polls = polled(driver)
    wait_for(lambda: polled(driver) > polls, 10, "one more poll")
    assert texts(driver, f'b[data-consumer="{name}"][data-field="dead"]') == ["3"]
    assert texts(driver, "#action-section:not([hidden])") == []
    assert sum(handled(c).values()) == 4
    shot(driver, c.kind, "2-refused")

    # With it, after the fix: the three come back and are handled once each.
    (c.tmp / "healed").touch()
    driver.find_element(By.ID, "token").send_keys(TOKEN)
    driver.find_element(By.ID, "token-save").click()
    click(driver, replay_all)
    wait_for(lambda: texts(driver, "#action-state") == ["done"], 20, "replay done")
    assert texts(driver, "#action-output") == [f"3 dead letter(s) of {name} replayed"]
    wait_for(lambda: sum(handled(c).values()) == 7, 15, "the replayed handled")
    wait_for(
        lambda: texts(driver, f'b[data-consumer="{name}"][data-field="dead"]') == ["0"],
        15,
        "0 dead",
    )
    assert texts(driver, rows) == []
    shot(driver, c.kind, "3-replayed")
    c.stop()
    counts = handled(c)
    assert sorted(counts) == [0, 1, 2, 3, 100, 101, 102] and set(counts.values()) == {1}
    assert dead_letters(c) == []
    with contextlib.suppress(Exception):
        driver.get("about:blank")


def test_a_dlq_command_the_page_starts_waits_for_the_listing_lock(tmp_path, name):
    """On RabbitMQ the page's listing holds dead letters for a moment: a replay or purge
    the page starts waits for it (the lock), and a listing finds the lock taken and skips."""
    import fcntl
    import sys

    from consumerd.consumer import sampling

    c = Consumerd(tmp_path, name, f"sqlite:///{tmp_path}/broker.db")
    (tmp_path / "tapp.py").write_text(textwrap.dedent(APP))
    c.configure([], name=name)
    published = c.cli("publish", f"{name}.dlq", '{"i": 1}', "--broker", c.url)
    assert published.returncode == 0, published.stderr
    lock = str(tmp_path / sampling.LOCK)
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    with sampling.dead_letter_lock(lock, wait=False) as free:
        assert free is False  # what the sampler sees while a command runs
    child = subprocess.Popen(
        [sys.executable, "-m", "consumerd.cli", "dlq", "purge", name, "--all"],
        cwd=tmp_path,
        env={
            **c.env(),
            "CONSUMERD_APP": "tapp",
            "CONSUMERD_BROKER": c.url,
            sampling.LOCK_ENV: lock,
        },
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:

        def blocked_on_the_lock() -> bool:
            with open(f"/proc/{child.pid}/wchan") as f:
                return f.read() == "locks_lock_inode_wait"

        wait_for(blocked_on_the_lock, 20, "the command waiting for the lock")
        assert Broker("sqlite", c.url).depth(f"{name}.dlq") == 1
    finally:
        os.close(fd)
    out, _ = child.communicate(timeout=30)
    assert child.returncode == 0 and f"1 dead letter(s) of {name} purged" in out
    assert Broker("sqlite", c.url).depth(f"{name}.dlq") == 0
