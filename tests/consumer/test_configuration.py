"""One configuration for every command, and SIGHUP re-reading it in a real consumerd.

The same ``--config`` file (or ``$CONSUMERD_CONFIG``) drives ``publish``, ``check`` and
``run``; a SIGHUP applies the live settings in the workers, where they are used, and a
bad file or a ``queues`` name the app does not declare is rejected with the old settings
kept.
"""

from __future__ import annotations

import signal

from tests.consumer.conftest import publish_many
from tests.helpers import wait_for


def _write(path, **settings) -> None:
    lines = []
    for key, value in settings.items():
        literal = f'"{value}"' if isinstance(value, str) else str(value).lower()
        if isinstance(value, list):
            literal = "[" + ", ".join(f'"{v}"' for v in value) + "]"
        lines.append(f"{key.replace('_', '-')} = {literal}")
    tmp = path.with_suffix(".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(path)  # a worker never reads half a file


def test_publish_check_and_run_share_one_configuration(consumerd, broker, name, tmp_path):
    consumerd.configure([{"name": name}])
    cfg = tmp_path / "consumerd.toml"
    _write(cfg, app="tapp", broker=broker.url, workers=3)

    # Options after positionals (intermixed), the file named by the option...
    sent = consumerd.cli("publish", name, "--config", str(cfg), '{"i": 0}', '{"i": 1}')
    assert sent.returncode == 0, sent.stderr
    # ...or by the environment.
    sent = consumerd.cli("publish", name, '{"i": 2}', CONSUMERD_CONFIG=str(cfg))
    assert sent.returncode == 0, sent.stderr
    assert broker.depth(name) == 3
    assert not (tmp_path / ".consumerd").exists(), "publish fell back to the embedded broker"

    checked = consumerd.cli("check", CONSUMERD_CONFIG=str(cfg))
    assert checked.returncode == 0, checked.stderr
    assert "3 worker(s)" in checked.stdout

    consumerd.url = None  # run takes the broker from the file too
    consumerd.start("--config", str(cfg), workers=None)
    consumerd.wait_workers(3)
    wait_for(lambda: sorted(consumerd.ids().elements()) == [0, 1, 2], 20, "3 messages")
    assert consumerd.stop() == 0
    assert sorted(consumerd.ids().elements()) == [0, 1, 2]
    assert not (tmp_path / ".consumerd").exists()


def test_sighup_applies_live_settings_in_the_workers(consumerd, broker, name, tmp_path):
    consumerd.configure([{"name": name}])
    cfg = tmp_path / "consumerd.toml"
    _write(cfg, app="tapp", broker=broker.url, workers=1, max_messages_per_worker=5)
    consumerd.url = None
    consumerd.start("--config", str(cfg), workers=None)
    [first] = consumerd.wait_workers(1)

    # The limit in force: the worker recycles after 5 (up to 10% more) messages.
    publish_many(broker.url, name, 6)
    consumerd.wait_logged("recycling worker 0: handled 5 messages")
    wait_for(lambda: len(consumerd.records()) == 6, 20, "6 messages")
    wait_for(lambda: consumerd.workers() and consumerd.workers() != [first], 20, "a new worker")
    consumerd.wait_logged("consuming", count=2)

    # Raised by SIGHUP, the limit reaches the running worker: 30 more, no recycling.
    _write(cfg, app="tapp", broker=broker.url, workers=1, max_messages_per_worker=100000)
    consumerd.signal(signal.SIGHUP)
    consumerd.wait_logged("reload: applied max_messages_per_worker")
    consumerd.wait_logged("reloaded: consuming")  # the worker re-read it too
    [second] = consumerd.workers()
    publish_many(broker.url, name, 30, start=6)
    wait_for(lambda: len(consumerd.records()) == 36, 30, "36 messages")
    assert {r.pid for r in consumerd.records()[6:]} == {second}
    assert consumerd.logged("recycling worker") == 1
    assert consumerd.workers() == [second]

    # A broken file is rejected; so is a consumer name the app does not declare.
    cfg.write_text("workers = \n")
    consumerd.signal(signal.SIGHUP)
    consumerd.wait_logged("reload: configuration rejected")
    assert consumerd.logged("is not valid TOML") >= 1
    _write(cfg, app="tapp", broker=broker.url, workers=2, queues=["nosuch"])
    consumerd.signal(signal.SIGHUP)
    consumerd.wait_logged("reload: configuration rejected", count=2)
    assert consumerd.logged("declares no consumer named nosuch") >= 1
    publish_many(broker.url, name, 4, start=36)
    wait_for(lambda: len(consumerd.records()) == 40, 20, "40 messages")
    assert consumerd.workers() == [second], "a rejected reload changed the worker count"

    # A good one applies at once; settings that cannot change live are reported.
    _write(
        cfg,
        app="tapp",
        broker=broker.url,
        workers=2,
        metrics_port=19999,
        prefetch=7,
        max_messages_per_worker=100000,
    )
    consumerd.signal(signal.SIGHUP)
    consumerd.wait_workers(2)
    consumerd.wait_logged("metrics_port changed from None to 19999; applies at the next restart")
    consumerd.wait_logged("prefetch=7")
    assert consumerd.stop() == 0
    assert sorted(consumerd.ids().elements()) == list(range(40))
