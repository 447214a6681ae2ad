"""Private files: a secret is 0600 from its first byte, whatever the umask; never over another."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from app.config import Settings
from app.private_files import write_new_private_file


@pytest.fixture()
def open_umask():
    old = os.umask(0)  # the loosest a caller could have
    yield
    os.umask(old)


@pytest.mark.usefixtures("open_umask")
def test_a_new_private_file_is_0600_and_refuses_what_is_there(tmp_path: Path) -> None:
    path = tmp_path / "key"
    write_new_private_file(path, b"k")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and path.read_bytes() == b"k"
    with pytest.raises(FileExistsError):
        write_new_private_file(path, b"other")
    (tmp_path / "link").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(FileExistsError):
        write_new_private_file(tmp_path / "link", b"other")
    assert not (tmp_path / "elsewhere").exists()


@pytest.mark.usefixtures("open_umask")
def test_the_development_secret_key_and_its_folder_are_private_from_the_start(tmp_path: Path) -> None:
    data = tmp_path / "data"
    key = Settings(data_dir=data).resolved_secret_key()
    assert len(key) >= 32
    assert stat.S_IMODE(data.stat().st_mode) == 0o700
    assert stat.S_IMODE((data / "secret.key").stat().st_mode) == 0o600
    assert [p.name for p in data.iterdir()] == ["secret.key"]
