from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.supervisor.harness import Master


@pytest.fixture
def master(tmp_path: Path) -> Iterator[Callable[..., Master]]:
    started: list[Master] = []

    def start(config: dict[str, Any], **kwargs: Any) -> Master:
        m = Master(tmp_path, config, **kwargs)
        started.append(m)
        return m

    yield start
    for m in started:
        m.stop()
