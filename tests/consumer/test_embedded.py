"""The embedded default broker: no server, durable, across processes, said at start-up."""

from __future__ import annotations

import os
import signal

from tests.consumer.conftest import Consumerd, wait_for


def test_quick_start_on_the_embedded_broker(tmp_path, name):
    consumerd = Consumerd(tmp_path, name, None)
    try:
        consumerd.configure([{"name": name, "sleep": 0.002, "prefetch": 20}])
        lines = "".join(f'{{"i": {i}}}\n' for i in range(300))
        import subprocess
        import sys

        published = subprocess.run(
            [sys.executable, "-m", "consumerd.cli", "publish", "--app", "tapp", name, "-"],
            cwd=tmp_path,
            env=consumerd.env(),
            input=lines,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert published.returncode == 0, published.stderr
        database = tmp_path / ".consumerd" / "broker.db"
        assert database.exists()
        consumerd.start(workers=2)
        consumerd.wait_logged(
            f"no broker configured: using the embedded broker sqlite:///{database}"
        )
        victim = consumerd.wait_workers(2)[0]
        wait_for(lambda: len(consumerd.ids()) >= 60, 30, "60 messages handled")
        os.kill(victim, signal.SIGKILL)  # its claimed messages come back (pid gone)
        wait_for(lambda: len(consumerd.ids()) == 300, 60, "all messages handled")
        assert consumerd.stop() == 0
        ids = consumerd.ids()
        assert set(ids) == set(range(300))
        assert sum(ids.values()) - 300 <= 21
    finally:
        consumerd.kill()


def test_sqlite_urls_read_paths_as_sqlalchemy_does(tmp_path, name):
    """``sqlite:///x.db`` is x.db in the working directory (it used to create /x.db),
    ``sqlite:////abs/x.db`` is absolute; publisher and workers agree on the file."""
    import subprocess
    import sys

    consumerd = Consumerd(tmp_path, name, None)
    absolute = tmp_path / "abs" / f"{name}.db"
    relative = f"sqlite:///data/{name}.db"
    try:
        consumerd.configure([{"name": name}])
        for url, first in ((relative, 0), (f"sqlite:///{absolute}", 100)):
            lines = "".join(f'{{"i": {i}}}\n' for i in range(first, first + 50))
            published = subprocess.run(
                [sys.executable, "-m", "consumerd.cli", "publish", "--broker", url, name, "-"],
                cwd=tmp_path,
                env=consumerd.env(),
                input=lines,
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
            assert published.returncode == 0, published.stderr
        assert (tmp_path / "data" / f"{name}.db").exists()
        assert absolute.exists()
        assert not os.path.exists(f"/data/{name}.db")
        assert not os.path.exists(f"/{name}.db")

        consumerd.start(workers=2, url=relative)
        consumerd.wait_logged(f"broker sqlite:///{tmp_path}/data/{name}.db")
        wait_for(lambda: len(consumerd.ids()) == 50, 30, "the relative database's messages")
        assert consumerd.stop() == 0
        consumerd.start(workers=1, url=f"sqlite:///{absolute}")
        wait_for(lambda: len(consumerd.ids()) == 100, 30, "the absolute database's messages")
        assert consumerd.stop() == 0
        ids = consumerd.ids()
        assert set(ids) == set(range(50)) | set(range(100, 150))
        assert sum(ids.values()) == 100
        assert not os.path.exists(f"/data/{name}.db")
    finally:
        consumerd.kill()


def test_a_relative_url_that_used_to_name_an_existing_file_is_warned_about(tmp_path):
    """Before, sqlite:///tmp/x/old.db meant /tmp/x/old.db; run from elsewhere it now means
    ./tmp/x/old.db, and the file the messages are in is named in a warning."""
    import subprocess
    import sys

    from tests.consumer.conftest import ROOT

    old = tmp_path / "old.db"
    old.write_bytes(b"")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "tapp.py").write_text(
        "import consumerd\napp = consumerd.App('w')\napp.consumer('q')(print)\n"
    )
    url = "sqlite:///" + str(old).lstrip("/")
    checked = subprocess.run(
        [sys.executable, "-m", "consumerd.cli", "check", "--app", "tapp", "--broker", url],
        cwd=tmp_path / "elsewhere",
        env=dict(os.environ, PYTHONPATH=f"{ROOT}:."),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert checked.returncode == 0, checked.stderr
    assert f"broker sqlite:///{tmp_path}/elsewhere/{str(old).lstrip('/')}" in checked.stdout
    assert f"the existing {old} is not used: write sqlite:///{old} for it" in checked.stderr
