"""target.py's services under a manager with a configurable respawn policy and hooks
that raise: argv[1] as for target.py, plus ``policy`` (RespawnPolicy keyword arguments)
and ``raising_hooks`` (register every hook kind twice, the first one raising)."""

import json
import sys

import consumerd as cotyledon
from consumerd.supervisor.respawn import RespawnPolicy
from tests.supervisor import target
from tests.supervisor.target import record

CONFIG = json.loads(sys.argv[1])


def main() -> None:
    kwargs = {"graceful_shutdown_timeout": CONFIG.get("graceful", 10)}
    if "policy" in CONFIG:
        kwargs["respawn_policy"] = RespawnPolicy(**CONFIG["policy"])
    manager = cotyledon.ServiceManager(**kwargs)
    for conf in CONFIG["services"]:
        manager.add(target.make_class(conf), workers=conf.get("workers", 1), args=(conf,))
    manager.register_hooks(
        on_dead_worker=lambda sid, wid, code: record("hook_dead_worker", wid=wid, code=code)
    )
    if CONFIG.get("raising_hooks"):

        def raising(kind: str):
            def hook(*args: object) -> None:
                record(f"hook_{kind}", n=1)
                raise RuntimeError(f"first {kind} hook fails")

            return hook

        def recording(kind: str):
            return lambda *args: record(f"hook_{kind}", n=2)

        for kind in ("terminate", "reload", "dead_worker"):
            manager.register_hooks(**{f"on_{kind}": raising(kind)})
            manager.register_hooks(**{f"on_{kind}": recording(kind)})
    record("master")
    manager.run()


if __name__ == "__main__":
    main()
