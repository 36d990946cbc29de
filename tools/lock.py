"""Write and check ``requirements.lock``, the one file that pins what ``make`` installs.

Every line of the lock is ``name==version`` (or a comment); ``make demo``, ``make test``, ``make
docs`` and CI install with ``pip install -c requirements.lock``, so a new release in the package
registry changes nothing until ``make lock`` re-resolves the file. The script uses the standard
library only: it runs before any virtual environment exists.

Usage::

    python tools/lock.py check [LOCK]            # exit 1 with one line if LOCK is broken
    python tools/lock.py write VENV_PYTHON LOCK  # pin every distribution installed in a venv
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

#: a PEP 508 distribution name, ``==``, and a PEP 440 public version (no local label)
PIN = re.compile(r"^([A-Za-z0-9]([A-Za-z0-9._-]*[A-Za-z0-9])?)==([0-9][0-9A-Za-z.!+_-]*)$")

HEADER = """\
# The locked environment of `make demo`, `make test`, `make docs` and CI: every distribution that
# `make` installs, pinned (`pip install -c requirements.lock ...`). Written by `make lock`
# (tools/lock.py) from a fresh resolution of `.[dev,all,docs]` with torch==2.13.0, the CPU build
# on this machine's disk (pyproject keeps torch>=2.4). Do not edit by hand; `make lock` re-resolves
# it and runs the suite, `make test-latest` tries the newest allowed versions without it.
# torchvision is pulled in by backpack (curvlinops) and uninstalled again by `make`: beside the CPU
# torch it breaks `import transformers`.
"""


class LockError(Exception):
    """A broken lock file; the message is one line that says where and what to fix."""


def read_pins(path: Path) -> dict[str, str]:
    """The pins of the lock at ``path``: normalized distribution name -> version.

    Raises:
        LockError: if the file is missing or a line is not ``name==version``, or a name repeats.
    """
    try:
        text = path.read_text()
    except OSError as err:
        reason = f"cannot read the lock file ({err.strerror}); run `make lock`"
        raise LockError(f"{path}: {reason}") from None
    pins: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        match = PIN.match(line)
        if match is None:
            raise LockError(f"{path}:{number}: expected `name==version`, got {raw.strip()!r}")
        name = normalize(match.group(1))
        if name in pins:
            raise LockError(f"{path}:{number}: {match.group(1)} is pinned twice")
        pins[name] = match.group(3)
    if not pins:
        raise LockError(f"{path}: the lock file pins nothing; run `make lock`")
    return pins


def normalize(name: str) -> str:
    """PEP 503 normalized distribution name."""
    return re.sub(r"[-_.]+", "-", name).lower()


def installed(python: str) -> dict[str, str]:
    """Every distribution installed in the environment of ``python`` (editable ones excluded)."""
    code = (  # direct_url.json's dir_info.editable marks `pip install -e` (PEP 610)
        "import json, importlib.metadata as m;"
        "url = lambda d: json.loads(d.read_text('direct_url.json') or '{}');"
        "print(json.dumps({d.metadata['Name']: d.version for d in m.distributions()"
        " if not url(d).get('dir_info', {}).get('editable')}))"
    )
    # -I: the environment alone, not the current folder (a build leaves curvopt.egg-info there)
    cmd = [python, "-I", "-c", code]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out)


def write(python: str, path: Path, extra: dict[str, str]) -> None:
    """Write the lock at ``path`` from the environment of ``python`` plus ``extra`` pins."""
    found = {**installed(python), **extra}
    lines = []
    for name in sorted(found, key=normalize):
        version = found[name].split("+", 1)[0]  # torch's "+cpu": the public version pins it
        lines.append(f"{normalize(name)}=={version}")
    path.write_text(HEADER + "\n".join(lines) + "\n")
    read_pins(path)


def main(argv: list[str]) -> int:
    """Run ``check`` or ``write``; returns the exit status."""
    try:
        if argv[:1] == ["check"] and len(argv) <= 2:
            pins = read_pins(Path(argv[1] if len(argv) == 2 else "requirements.lock"))
            print(f"lock ok: {len(pins)} pins")
            return 0
        if argv[:1] == ["write"] and len(argv) >= 3:
            extra = dict(pin.split("==", 1) for pin in argv[3:])
            write(argv[1], Path(argv[2]), extra)
            return 0
    except LockError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print("usage: lock.py check [LOCK] | lock.py write VENV_PYTHON LOCK [name==version ...]")
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
