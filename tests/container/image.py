"""What ``docker build`` and ``docker run`` do with our Dockerfiles, without a Docker engine.

:func:`build` reads a Dockerfile and lays its files out under a directory standing for the
image's root filesystem, the way ``COPY`` would; ``FROM`` another image built here
inherits its files and settings. :meth:`Image.command` is what ``docker run IMAGE ARGS``
executes: the exec-form ENTRYPOINT followed by ARGS, or by CMD when there are none.
:meth:`Image.env` is the image's environment with absolute paths moved under the root
(``PYTHONPATH=/app`` → ``<root>/app``), so the copied code is what runs.

Not emulated: ``RUN`` (the interpreter running the tests already has the dependencies,
and ``PYTHONPATH`` makes the *copied* package the one imported), ``USER`` (recorded; the
processes run as the test's user) and the base image's own files.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import shlex
import shutil
from pathlib import Path


@dataclasses.dataclass
class Image:
    root: Path
    """The directory standing for ``/`` in the image."""
    env_vars: dict[str, str] = dataclasses.field(default_factory=dict)
    workdir: str = "/"
    user: str = "root"
    entrypoint: list[str] = dataclasses.field(default_factory=list)
    cmd: list[str] = dataclasses.field(default_factory=list)
    healthcheck: list[str] = dataclasses.field(default_factory=list)
    copies: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    """(source in the build context, destination in the image) of every COPY."""

    def path(self, inside: str) -> Path:
        """Where an absolute path of the image is under :attr:`root`."""
        return self.root / inside.lstrip("/")

    def command(self, *args: str) -> list[str]:
        """``docker run IMAGE *args``: ENTRYPOINT + (args or CMD), paths under the root."""
        argv = [*self.entrypoint, *(args or self.cmd)]
        return [self._moved(a) for a in argv]

    def health_command(self) -> list[str]:
        return [self._moved(a) for a in self.healthcheck]

    def cwd(self) -> Path:
        cwd = self.path(self.workdir)
        cwd.mkdir(parents=True, exist_ok=True)
        return cwd

    def env(self, base: dict[str, str]) -> dict[str, str]:
        env = dict(base)
        for name, value in self.env_vars.items():
            env[name] = ":".join(self._moved(p) for p in value.split(":"))
        return env

    def _moved(self, arg: str) -> str:
        # Absolute paths (/tmp/consumerd.pid, /app) live under the root; /tmp is made.
        if arg.startswith("/") and not arg.startswith("//"):
            moved = self.path(arg)
            moved.parent.mkdir(parents=True, exist_ok=True)
            return str(moved)
        return arg


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(KEYWORD, argument) of each instruction, continuation lines joined."""
    text = dockerfile.read_text().replace("\\\n", " ")
    found = []
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        keyword, _, argument = line.strip().partition(" ")
        found.append((keyword.upper(), argument.strip()))
    return found


def _exec_form(argument: str, keyword: str) -> list[str]:
    form = json.loads(argument)
    assert isinstance(form, list), f"{keyword} must be in exec form: {argument}"
    return [str(a) for a in form]


def _copy(image: Image, context: Path, argument: str) -> None:
    words = [w for w in shlex.split(argument) if not w.startswith("--")]
    *sources, dest = words
    inside = dest if dest.startswith("/") else os.path.join(image.workdir, dest)
    target = image.path(inside)
    for source in sources:
        matches = sorted(glob.glob(str(context / source)))
        assert matches, f"COPY {source}: not in the build context {context}"
        for match in map(Path, matches):
            image.copies.append((source, inside))
            if match.is_dir():  # a directory's contents go into the destination
                shutil.copytree(
                    match,
                    target,
                    dirs_exist_ok=True,
                    ignore=shutil.ignore_patterns("__pycache__", ".consumerd"),
                )
            elif dest.endswith("/") or len(sources) > 1 or len(matches) > 1:
                target.mkdir(parents=True, exist_ok=True)
                shutil.copy2(match, target / match.name)
            else:
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(match, target)


def build(
    dockerfile: Path, context: Path, root: Path, images: dict[str, Image] | None = None
) -> Image:
    """The image ``docker build -f dockerfile context`` makes, its files under ``root``.

    ``images`` maps tags built before (``docker build -t consumerd .``) to their images,
    for a ``FROM`` naming one; any other ``FROM`` starts empty (a public base image)."""
    images = images or {}
    image: Image | None = None
    cmd_here = False
    for keyword, argument in instructions(dockerfile):
        if keyword == "FROM":
            base = images.get(argument.split()[0])
            image = Image(root=root)
            if base is not None:  # inherit the base image's files and settings
                shutil.copytree(base.root, root, dirs_exist_ok=True, symlinks=True)
                image = dataclasses.replace(
                    base,
                    root=root,
                    env_vars=dict(base.env_vars),
                    copies=list(base.copies),
                )
            continue
        assert image is not None, f"{dockerfile}: {keyword} before FROM"
        if keyword == "ENV":
            words = shlex.split(argument)
            if "=" not in words[0]:  # legacy form: ENV NAME value
                image.env_vars[words[0]] = " ".join(words[1:])
            else:
                image.env_vars.update(w.split("=", 1) for w in words)  # type: ignore[misc]
        elif keyword == "WORKDIR":
            image.workdir = os.path.join(image.workdir, argument)
        elif keyword == "USER":
            image.user = argument
        elif keyword in ("COPY", "ADD"):
            _copy(image, context, argument)
        elif keyword == "ENTRYPOINT":
            image.entrypoint = _exec_form(argument, keyword)
            if not cmd_here:
                image.cmd = []  # a new ENTRYPOINT drops the CMD inherited from the base
        elif keyword == "CMD":
            image.cmd, cmd_here = _exec_form(argument, keyword), True
        elif keyword == "HEALTHCHECK":
            image.healthcheck = _exec_form(argument[argument.index("CMD") + 3 :].strip(), keyword)
    assert image is not None, f"{dockerfile}: no FROM"
    return image
