"""The pinned dependency ranges and the import-time fence around private internals."""

from __future__ import annotations

import os
import re
import sys

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:  # a dependency on 3.10 only
    import tomli as tomllib

from consumerd import deps

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_pyproject_pins_the_ranges_the_fence_names():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        declared = tomllib.load(f)["project"]["dependencies"]
    pinned = {}
    for requirement in declared:
        match = re.fullmatch(r"([A-Za-z0-9_.-]+)(?:\[[^]]*\])?([^;]*)(;.*)?", requirement)
        assert match, requirement
        pinned[match[1]] = match[2].replace(" ", "")
    for distribution, spec in deps.SUPPORTED.items():
        assert pinned[distribution] == spec, distribution
        assert spec.startswith(">=") and ",<" in spec  # both ends: tests/consumer/test_install


class Owner:
    present = 1

    def __init__(self) -> None:
        self._set_in_init = 2


def test_a_missing_internal_fails_the_import_in_one_line():
    deps.require("x", {Owner: "present _set_in_init"}, "kombu")  # all there: no error
    with pytest.raises(ImportError) as caught:
        deps.require("consumerd.thing", {Owner: "present _gone", os: "sep _nope"}, "kombu")
    message = str(caught.value)
    assert "\n" not in message
    assert message == (
        f"consumerd.thing supports kombu{deps.SUPPORTED['kombu']}; found kombu "
        f"{deps.version_of('kombu')}, which lacks {__name__}.Owner._gone, os._nope"
    )


def test_the_installed_versions_have_every_internal_relied_on():
    import consumerd.consumer.transport.redis
    import consumerd.ops.metrics  # noqa: F401 - the import is the check
