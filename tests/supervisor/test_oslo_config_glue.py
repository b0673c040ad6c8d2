"""consumerd.oslo_config_glue with the real oslo.config: options, logging, SIGHUP
reload/mutate, the graceful shutdown timeout, and oslo-config-generator."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from oslo_config import cfg

from consumerd import oslo_config_glue
from tests.helpers import wait_for
from tests.supervisor.harness import Master

GLUE_TARGET = Path(__file__).with_name("glue_target.py")
FULL_SET = "consumerd.oslo_config_glue Full set of CONF:"


def write_conf(path: Path, **values: object) -> None:
    lines = ["[DEFAULT]"] + [
        f"{k} = {str(v).lower() if isinstance(v, bool) else v}" for k, v in values.items()
    ]
    path.write_text("\n".join(lines) + "\n")


@pytest.fixture
def glue(tmp_path):
    started: list[Master] = []
    conf_file = tmp_path / "gluetest.conf"

    def start(**config) -> Master:
        m = Master(
            tmp_path,
            {"config_file": str(conf_file), **config},
            argv=[sys.executable, str(GLUE_TARGET)],
        )
        started.append(m)
        return m

    start.conf_file = conf_file
    yield start
    for m in started:
        m.stop()


def test_options_are_cotyledons():
    """Same names, defaults, mutability and group as cotyledon 2.2's, so deployed files
    and generated samples do not change."""
    conf = cfg.ConfigOpts()
    oslo_config_glue.register_opts(conf)
    conf([], project="gluetest")
    assert (conf.log_options, conf.graceful_shutdown_timeout) == (True, 60)
    [(group, opts)] = oslo_config_glue.list_opts()
    assert group is None
    assert [(o.name, o.default, o.mutable, type(o).__name__) for o in opts] == [
        ("log_options", True, True, "BoolOpt"),
        ("graceful_shutdown_timeout", 60, True, "IntOpt"),
    ]
    assert opts[0] is not oslo_config_glue.service_opts[0]  # a copy the generator may keep
    conf.reset()
    oslo_config_glue.unregister_opts(conf)
    with pytest.raises(cfg.NoSuchOptError):
        _ = conf.log_options
    with pytest.raises(ValueError, match="reload_method"):
        oslo_config_glue.link(object(), conf, "restart")  # type: ignore[arg-type]


@pytest.mark.parametrize("log_options", [True, False])
def test_setup_applies_and_logs_the_options(glue, log_options):
    write_conf(glue.conf_file, graceful_shutdown_timeout=7, colour="blue", log_options=log_options)
    m = glue(workers=2)
    m.wait_events("start", 2, timeout=20)
    [master] = m.events("master")
    assert (master["manager_timeout"], master["colour"]) == (7, "blue")
    assert all(s["timeout"] == 7 and s["colour"] == "blue" for s in m.events("start"))
    if log_options:  # the master at setup, each worker once its service is built

        def logged_sets() -> tuple[int, int, int]:
            output = m.output()
            return (
                output.count(FULL_SET),
                len(re.findall(r"oslo_config_glue graceful_shutdown_timeout\s+= 7\n", output)),
                len(re.findall(r"oslo_config_glue colour\s+= blue\n", output)),
            )

        # A worker writes its set after its "start" event, line by line: wait for all of it.
        wait_for(lambda: logged_sets() == (3, 3, 3), 20, "3 whole option sets logged")
    else:
        assert FULL_SET not in m.output()
    m.signal(signal.SIGTERM)
    assert m.wait_exit(20) == 0


@pytest.mark.parametrize("method", ["reload", "mutate"])
def test_sighup_rereads_the_files_in_the_master_and_the_workers(glue, method):
    write_conf(glue.conf_file, colour="blue", shape="circle", graceful_shutdown_timeout=30)
    m = glue(workers=2, reload_method=method)
    m.wait_events("start", 2, timeout=20)
    write_conf(
        glue.conf_file,
        colour="green",
        shape="triangle",
        graceful_shutdown_timeout=5,
        log_options=False,
    )
    m.signal(signal.SIGHUP)
    [master] = m.wait_events("master_reload", 1, timeout=20)
    reloads = m.wait_events("reload", 2, timeout=20)
    # "mutate" changes only the mutable options; oslo.config says so
    shape = "triangle" if method == "reload" else "circle"
    expected = {"colour": "green", "shape": shape, "timeout": 5, "log_options": False}
    assert {k: master[k] for k in expected} == expected
    assert master["manager_timeout"] == 5
    assert sorted(r["wid"] for r in reloads) == [0, 1]
    assert all({k: r[k] for k in expected} == expected for r in reloads)
    assert all(r["own_timeout"] == 5 for r in reloads)  # running workers take it too
    assert ("Ignoring change to immutable option DEFAULT.shape" in m.output()) == (
        method == "mutate"
    )
    assert len(m.events("start")) == 2  # reloaded, not restarted
    m.signal(signal.SIGTERM)
    assert m.wait_exit(20) == 0


def test_a_file_that_does_not_parse_keeps_the_running_values(glue):
    write_conf(glue.conf_file, colour="blue", graceful_shutdown_timeout=30)
    m = glue(workers=1)
    m.wait_events("start", 1, timeout=20)
    glue.conf_file.write_text("[DEFAULT\ncolour = green\n")
    m.signal(signal.SIGHUP)
    [master] = m.wait_events("master_reload", 1, timeout=20)
    [reload] = m.wait_events("reload", 1, timeout=20)
    assert (master["colour"], master["manager_timeout"]) == ("blue", 30)
    assert (reload["colour"], reload["timeout"]) == ("blue", 30)
    m.signal(signal.SIGTERM)
    assert m.wait_exit(20) == 0


@pytest.mark.parametrize("when", ["at-start", "after-sighup"])
def test_graceful_shutdown_timeout_bounds_the_stop(glue, when):
    """Workers whose terminate() never returns: the master exits after the configured
    timeout (1 s), not the default 60 s, whether the file said so at start or a SIGHUP
    brought it ("mutate", as the option is mutable)."""
    write_conf(glue.conf_file, graceful_shutdown_timeout=1 if when == "at-start" else 60)
    m = glue(workers=2, stuck=True, reload_method="mutate")
    m.wait_events("start", 2, timeout=20)
    if when == "after-sighup":
        write_conf(glue.conf_file, graceful_shutdown_timeout=1)
        m.signal(signal.SIGHUP)
        m.wait_events("reload", 2, timeout=20)
    started = time.monotonic()
    m.signal(signal.SIGTERM)
    assert m.wait_exit(30) == 0
    took = time.monotonic() - started
    assert len(m.events("terminate")) == 2
    assert 0.9 <= took < 30  # waited the 1 s out; 60 s would have failed wait_exit
    assert "did not stop in time" in m.output() or "timeout (1s) exceeded" in m.output()


def test_oslo_config_generator_lists_the_options(tmp_path):
    """Through the installed ``oslo.config.opts`` entry point, as a service's
    ``*-config-generator.conf`` with ``namespace = consumerd`` loads it (the metadata is
    the installed one: re-run ``pip install -e .`` after changing pyproject.toml)."""
    out = tmp_path / "sample.conf"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "oslo_config.generator",
            "--namespace",
            "consumerd",
            "--output-file",
            str(out),
        ],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    sample = out.read_text()
    assert "[DEFAULT]" in sample
    assert "#log_options = true" in sample
    assert "#graceful_shutdown_timeout = 60" in sample
    assert "Zero value means endless wait." in sample
