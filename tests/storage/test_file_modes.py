"""Files and folders hf_mrp writes get the mode open() / mkdir() would give them (tempfile's are private)."""

import os
import stat

import numpy as np
import pytest

from hf_mrp.storage import files


@pytest.fixture
def umask_022():
    previous = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(previous)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_atomic_writes_are_readable_by_others_as_plain_writes_are(tmp_path, umask_022):
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    files.write_json(tmp_path / "report.json", {"a": 1})
    with files.atomic_path(tmp_path / "blocks.npy") as temporary:
        np.save(temporary, np.arange(3))
    assert mode(plain) == 0o644
    assert mode(tmp_path / "report.json") == mode(tmp_path / "blocks.npy") == mode(plain)


def test_the_mode_follows_the_umask(tmp_path):
    previous = os.umask(0o077)
    try:
        files.write_json(tmp_path / "private.json", {"a": 1})
    finally:
        os.umask(previous)
    assert mode(tmp_path / "private.json") == 0o600


def test_a_folder_made_by_tempfile_gets_the_mkdir_mode(tmp_path, umask_022):
    import tempfile

    folder = tempfile.mkdtemp(dir=tmp_path)
    assert mode(folder) == 0o700
    files.with_default_mode(folder, directory=True)
    (tmp_path / "plain").mkdir()
    assert mode(folder) == mode(tmp_path / "plain") == 0o755
