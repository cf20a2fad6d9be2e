"""requirements.lock is what `make` installs: it must pin, within setup.cfg's ranges, every package that hf_mrp's
requirements (with the dev extra) pull in, torch as its CPU build, and the suite must be running on those pins.

A requirement added to setup.cfg without re-locking (`make upgrade`), a range that excludes the locked version, a
lock that would let a CUDA torch in, or an environment that drifted from the lock each fail here, naming the
package, instead of a fresh machine quietly installing something nobody tested.
"""

from __future__ import annotations

import configparser
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "requirements.lock"


def locked() -> dict[str, str]:
    """Canonical name -> pinned version, from the lock's `name==version` lines."""
    pins = {}
    for line in LOCK.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, version = line.split("==")
            pins[canonicalize_name(name)] = version.strip()
    return pins


def declared() -> list[Requirement]:
    """setup.cfg's install_requires and dev extra: what `make` installs hf_mrp with."""
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    lines = config["options"]["install_requires"].split("\n") + config["options.extras_require"]["dev"].split("\n")
    return [Requirement(line) for line in lines if line.strip()]


def closure(roots: list[Requirement]) -> dict[str, Requirement]:
    """Every requirement reached from ``roots`` through the installed packages' metadata (markers evaluated on this
    interpreter, extras followed): canonical name -> the first requirement that named it."""
    reached: dict[str, Requirement] = {}
    todo = [(requirement, "") for requirement in roots]
    while todo:
        requirement, extra = todo.pop()
        if requirement.marker is not None and not requirement.marker.evaluate({"extra": extra}):
            continue
        name = canonicalize_name(requirement.name)
        seen = reached.setdefault(name, requirement)
        if seen is not requirement and requirement.extras <= seen.extras:
            continue
        seen.extras |= requirement.extras
        for text in metadata.distribution(name).requires or []:
            child = Requirement(text)
            todo.extend((child, wanted) for wanted in {""} | set(requirement.extras))
    return reached


def test_the_lock_pins_setup_cfg_requirements_within_their_ranges():
    pins = locked()
    for requirement in declared():
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{requirement.name} is required by setup.cfg but not locked: run `make upgrade`"
        assert requirement.specifier.contains(pins[name], prereleases=True), (
            f"requirements.lock pins {requirement.name}=={pins[name]}, outside setup.cfg's {requirement}"
        )


def test_the_lock_pins_the_cpu_torch_and_nothing_of_cuda():
    pins = locked()
    assert pins["torch"].endswith("+cpu"), f"torch=={pins['torch']} is not the CPU build"
    cuda = sorted(name for name in pins if name.startswith(("nvidia-", "cuda-")) or name == "triton")
    assert not cuda, f"CUDA packages in the lock (a CUDA torch was resolved): {cuda}"


def test_this_environment_is_the_locked_one():
    """Every package hf_mrp's requirements reach is installed at its locked version (the suite tests the lock)."""
    pins = locked()
    for name, requirement in sorted(closure(declared()).items()):
        assert name in pins, f"{name} (via {requirement}) is installed but not locked: run `make upgrade`"
        installed = metadata.version(name)
        assert installed == pins[name], f"{name} {installed} is installed, the lock pins {pins[name]}: `make install`"
