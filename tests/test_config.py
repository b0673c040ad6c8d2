"""One precedence order: command line > environment > TOML file > defaults; and reloads."""

from __future__ import annotations

import argparse
import dataclasses
import os
from pathlib import Path

import pytest

from consumerd import config
from consumerd.config import Config, ConfigError, Settings

# name: (TOML literal, environment string, command line string, expected value of each)
CASES = {
    "app": ('"a.file"', "a.env", "a.cli", ("a.file", "a.env", "a.cli")),
    "broker": (
        '"redis://f/0"',
        "redis://e/0",
        "redis://c/0",
        ("redis://f/0", "redis://e/0", "redis://c/0"),
    ),
    "workers": ("2", "3", "4", (2, 3, 4)),
    "workers_max": ("20", "30", "40", (20, 30, 40)),
    "prefetch": ("20", "30", "40", (20, 30, 40)),
    "concurrency": ("4", "8", "16", (4, 8, 16)),
    "queues": ('["a", "b"]', "c,d", "e", (("a", "b"), ("c", "d"), ("e",))),
    "graceful_timeout": ("1.5", "2", "2.5", (1.5, 2.0, 2.5)),
    "broker_down_limit": ("10", "20.5", "30", (10.0, 20.5, 30.0)),
    "log_level": ('"debug"', "warning", "ERROR", ("DEBUG", "WARNING", "ERROR")),
    "log_format": ('"json"', "TEXT", "json", ("json", "text", "json")),
    "metrics_port": ("9100", "9200", "9300", (9100, 9200, 9300)),
    "metrics_address": ('"0.0.0.0"', "::1", "10.0.0.1", ("0.0.0.0", "::1", "10.0.0.1")),
    "pidfile": ('"/f.pid"', "/e.pid", "/c.pid", ("/f.pid", "/e.pid", "/c.pid")),
    "member": ('"0/2"', "1/3", "2/4", ((0, 2), (1, 3), (2, 4))),
    "max_messages_per_worker": ("100", "200", "300", (100, 200, 300)),
    "max_memory_per_worker": ("256", "512", "1024", (256, 512, 1024)),
    "admin_token": ('"f-secret"', "e-secret", "c-secret", ("f-secret", "e-secret", "c-secret")),
    "web_hosts": (
        '["f.example"]',
        "e.example",
        "c.example",
        (("f.example",), ("e.example",), ("c.example",)),
    ),
}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    config.add_arguments(p)
    return p


def cli(*argv: str) -> dict:
    return vars(parser().parse_args(list(argv)))


def test_every_setting_has_a_case():
    assert set(CASES) == set(config.FIELDS)


@pytest.mark.parametrize("name", sorted(CASES))
def test_each_layer_overrides_the_ones_below(tmp_path, name):
    toml, env, arg, (from_file, from_env, from_cli) = CASES[name]
    path = tmp_path / "consumerd.toml"
    path.write_text(f"{name.replace('_', '-')} = {toml}\n")  # dashes work as well
    option = "--" + name.replace("_", "-")
    variable = "CONSUMERD_" + name.upper()
    default = getattr(Settings(), name)
    # Each layer changes the value the layer below gave, so its win shows.
    assert default != from_file != from_env != from_cli

    assert getattr(config.load(cli(), {}), name) == default
    assert getattr(config.load(cli("--config", str(path)), {}), name) == from_file
    assert getattr(config.load(cli("--config", str(path)), {variable: env}), name) == from_env
    assert (
        getattr(config.load(cli("--config", str(path), option, arg), {variable: env}), name)
        == from_cli
    )
    # An option not given hides nothing, and each layer alone works.
    assert getattr(config.load(cli(), {variable: env}), name) == from_env
    assert getattr(config.load(cli(option, arg), {}), name) == from_cli
    assert getattr(config.load(cli(option, arg), {variable: env}), name) == from_cli


def test_the_file_can_come_from_the_environment_and_the_option_wins(tmp_path):
    (tmp_path / "a.toml").write_text("workers = 2\n")
    (tmp_path / "b.toml").write_text("workers = 5\n")
    environ = {"CONSUMERD_CONFIG": str(tmp_path / "a.toml")}
    assert config.load(cli(), environ).workers == 2
    assert config.load(cli("--config", str(tmp_path / "b.toml")), environ).workers == 5


def test_one_variable_per_setting_and_an_unknown_one_is_an_error():
    assert config.load({}, {"CONSUMERD_BROKER": "amqp://new//"}).broker == "amqp://new//"
    # The retired name would send messages elsewhere without a word: it is refused.
    with pytest.raises(
        ConfigError,
        match=r"\$CONSUMERD_BROKER_URL: unknown setting "
        r"\(did you mean \$CONSUMERD_BROKER\?\)",
    ):
        config.load({}, {"CONSUMERD_BROKER_URL": "amqp://old//"})
    with pytest.raises(ConfigError, match=r"\$CONSUMERD_ZZZ: unknown setting$"):
        config.load({}, {"CONSUMERD_ZZZ": "1"})
    # Variables consumerd sets for itself, and other programs' variables, are not settings.
    assert (
        config.load(
            {},
            {
                "CONSUMERD_REEXEC_STATE": "{}",
                "CONSUMERD_METRICS_OWNER": "1",
                "CONSUMERDX": "1",
                "OTHER": "1",
            },
        )
        == Settings()
    )


def test_the_internal_variables_are_the_ones_consumerd_sets():
    from consumerd import cli
    from consumerd.consumer import sampling
    from consumerd.ops import metrics
    from consumerd.supervisor import reexec

    assert {
        reexec.ENV_VAR,
        metrics.OWNER_ENV,
        cli.PREFLIGHT_ENV,
        sampling.LOCK_ENV,
    } == config.INTERNAL_ENV


@pytest.mark.parametrize("value", ["inf", "-inf", "nan", "1e999", "-1"])
def test_seconds_are_finite(value):
    with pytest.raises(ConfigError, match="expected a finite number of seconds >= 0"):
        config.load({}, {"CONSUMERD_GRACEFUL_TIMEOUT": value})


@pytest.mark.parametrize(
    ("layer", "message"),
    [
        ("env", "$CONSUMERD_WORKERS: expected an integer >= 1, got 0"),
        ("file", "consumerd.toml: workers: expected an integer >= 1, got 0"),
        ("file-type", "consumerd.toml: workers: expected an integer >= 1, got 'four'"),
        ("unknown", "unknown setting 'wokers' (did you mean 'workers'?)"),
    ],
)
def test_bad_values_say_where_they_come_from(tmp_path, layer, message):
    path = tmp_path / "consumerd.toml"
    path.write_text(
        {
            "env": "",
            "file": "workers = 0\n",
            "file-type": 'workers = "four"\n',
            "unknown": "wokers = 4\n",
        }[layer]
    )
    environ = {"CONSUMERD_WORKERS": "0"} if layer == "env" else {}
    with pytest.raises(ConfigError) as raised:
        config.load(cli("--config", str(path)), environ)
    assert message in str(raised.value)


def test_bad_command_line_values_are_usage_errors(capsys):
    with pytest.raises(SystemExit) as raised:
        parser().parse_args(["--workers", "zero"])
    assert raised.value.code == 2
    assert "expected an integer >= 1, got 'zero'" in capsys.readouterr().err


def test_a_reload_applies_live_changes_and_reports_the_rest(tmp_path):
    path = tmp_path / "consumerd.toml"
    path.write_text("workers = 2\nlog-level = 'info'\nmetrics_port = 9100\n")
    running = Config(cli("--config", str(path), "--prefetch", "7"), {})
    path.write_text("workers = 4\nlog-level = 'debug'\nmetrics_port = 9200\nprefetch = 1\n")
    change = running.reload()
    assert change.applied == {"workers": (2, 4), "log_level": ("INFO", "DEBUG")}
    assert change.needs_restart == {"metrics_port": (9100, 9200)}
    # Live values are in force; the port stays until a restart; the command line still wins.
    assert (running.settings.workers, running.settings.log_level) == (4, "DEBUG")
    assert running.settings.metrics_port == 9100
    assert running.settings.prefetch == 7


@pytest.mark.parametrize(
    "broken",
    [
        "workers = \n",  # not TOML
        "workers = 3\nworkers = 4\n",  # duplicate key
        "workers = -1\n",  # bad value
        None,  # the file is gone
    ],
)
def test_a_bad_file_on_reload_keeps_the_running_config(tmp_path, broken):
    path = tmp_path / "consumerd.toml"
    path.write_text("workers = 2\nprefetch = 5\n")
    running = Config(cli("--config", str(path)), {})
    before = dataclasses.asdict(running.settings)
    if broken is None:
        path.unlink()
    else:
        path.write_text(broken)
    with pytest.raises(ConfigError) as raised:
        running.reload()
    assert str(path) in str(raised.value)
    assert dataclasses.asdict(running.settings) == before
    # Fixed, it loads again.
    path.write_text("workers = 3\n")
    assert running.reload().applied == {"workers": (2, 3), "prefetch": (5, None)}


def test_live_and_restart_settings_are_declared():
    assert {
        "workers",
        "workers_max",
        "prefetch",
        "concurrency",
        "queues",
        "log_level",
        "log_format",
        "broker_down_limit",
        "max_messages_per_worker",
        "max_memory_per_worker",
        "admin_token",
        "web_hosts",
    } == config.LIVE


def test_the_admin_token_is_never_shown(tmp_path):
    """Not in the settings' repr, not in the error about a bad value (it is live: a reload
    logs the names of the settings it applied, never their values)."""
    settings = config.load({}, {"CONSUMERD_ADMIN_TOKEN": "hunter2-token"})
    assert settings.admin_token == "hunter2-token"
    assert "hunter2" not in repr(settings)
    path = tmp_path / "consumerd.toml"
    path.write_text("admin-token = 123456789\n")
    with pytest.raises(ConfigError) as raised:
        config.load({"config": str(path)}, {})
    assert str(raised.value) == f"config file {path}: admin-token: expected a non-empty string"


def test_a_bad_toml_message_points_at_the_line(tmp_path):
    path = tmp_path / "consumerd.toml"
    path.write_text("workers = 2\nprefetch = = 3\n")
    with pytest.raises(ConfigError, match=r"is not valid TOML: .*line 2"):
        config.read_file(str(path))


def test_readme_example(tmp_path: Path):
    path = tmp_path / "consumerd.toml"
    path.write_text(
        'app = "shop.consumers"\nbroker = "amqp://guest:guest@127.0.0.1:5672//"\n'
        'workers = 4\nprefetch = 50\ngraceful-timeout = 30\nlog-format = "json"\n'
        "metrics-port = 9100\nmax-messages-per-worker = 100000\nmax-memory-per-worker = 512\n"
    )
    settings = config.load(
        cli("--config", str(path), "--workers", "8"), {"CONSUMERD_LOG_LEVEL": "debug"}
    )
    assert (settings.workers, settings.prefetch, settings.log_level) == (8, 50, "DEBUG")
    assert settings.metrics_address == "127.0.0.1"


def test_an_absurd_worker_count_is_refused_unless_allowed(tmp_path):
    limit = config.WORKERS_PER_CPU * (os.cpu_count() or 1)
    assert config.load(cli("--workers", str(limit)), {}).workers == limit
    with pytest.raises(ConfigError, match=rf"workers: 100000 is above the limit of {limit} "):
        config.load(cli("--workers", "100000"), {})
    assert config.load(cli("--workers", "100000", "--workers-max", "100000"), {}).workers == (
        100000
    )
    with pytest.raises(ConfigError, match=r"above the limit of 3 \(--workers-max 3\)"):
        config.load(cli("--workers", "4"), {"CONSUMERD_WORKERS_MAX": "3"})
    # a reload to an absurd count is rejected and the running count stays
    path = tmp_path / "c.toml"
    path.write_text("workers = 2\n")
    running = Config({"config": str(path)}, {})
    path.write_text("workers = 100000\n")
    with pytest.raises(ConfigError, match="above the limit"):
        running.reload()
    assert running.settings.workers == 2
