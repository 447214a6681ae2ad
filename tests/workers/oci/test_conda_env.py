"""Conda environments without a container, against a channel the test writes on local disk
(no public channel is reachable here): py-rattler solves a conda file's specs for linux-64,
installs them into a prefix that is layered as /opt/mms/conda, runs none of a package's
scripts, and says what is wrong, naming the package or the channel, when it cannot."""

from __future__ import annotations

import gzip
import io
import json
import os
import shutil
import tarfile
import tempfile
import time
from pathlib import Path

import pytest

from app.package_sources import PackageSourceRefused, check_conda_channels, conda_channel_urls
from tests.workers.conda_channel import add_package, add_python
from workers.builders import BuildFailed
from workers.oci.conda_env import PREFIX, CondaEnv, EnvironmentCache, conda_specs, install_conda_env
from workers.oci.layers import LayerBuilder


@pytest.fixture
def channel(tmp_path: Path) -> Path:
    root = tmp_path / "channel"
    for version in ("1.0.0", "1.2.3", "1.4.0", "2.0.0"):
        add_package(
            root,
            "greeting",
            version,
            {"share/greeting/VERSION": version.encode(), "bin/greet": f"#!/bin/sh\necho hello {version}\n".encode()},
            links={"lib/libgreeting.so": "libgreeting.so.1", "lib/libgreeting.so.1": "../share/greeting/VERSION"},
        )
    # A dependency between two packages: the tool works with greeting 1.x only.
    add_package(root, "greeting-tool", "0.5", {"share/tool.txt": b"tool"}, depends=["greeting >=1.2,<2"])
    # Its post-link script would leave a mark where the test can see it, if it ran.
    mark = root.parent / "post-link-ran"
    add_package(
        root,
        "scripted",
        "1.0",
        {"share/scripted.txt": b"x", "bin/.scripted-post-link.sh": f"#!/bin/sh\ntouch {mark}\n".encode()},
    )
    add_python(root, "3.11.7", "/usr/bin/python3.11")
    # noarch: python, as conda-build writes it: site-packages/ at the package's root, which
    # the installer places under the environment's lib/python<X.Y>.
    add_package(
        root,
        "tinylib",
        "0.3",
        {"site-packages/tinylib/__init__.py": b"VALUE = 42\n"},
        subdir="noarch",
        noarch="python",
        depends=["python >=3.8"],
    )
    return root


def _install(channel: Path, text: str, tmp_path: Path, lines: list[str], base_python: str = "3.11.7") -> CondaEnv:
    work = Path(tempfile.mkdtemp(dir=tmp_path))  # each build its own scratch, the cache shared
    return install_conda_env(
        text,
        conda_specs(text, base_python),
        channels=[f"local=file://{channel}"],
        subdir="linux-64",
        glibc="2.36",
        work=work,
        cache_dir=tmp_path / "cache",
        emit=lines.append,
    )


def _layer(env: CondaEnv, tmp_path: Path) -> dict[str, tarfile.TarInfo | bytes]:
    layer = env.layer.write(tmp_path / "conda.tar.gz", "conda")
    found: dict[str, tarfile.TarInfo | bytes] = {}
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(layer.path.read_bytes()))) as tar:  # type: ignore[union-attr]
        for member in tar.getmembers():
            found[member.name] = tar.extractfile(member).read() if member.isfile() else member  # type: ignore[union-attr]
    return found


def test_a_range_picks_the_highest_match_and_its_files_links_and_records_are_in_the_layer(
    channel: Path, tmp_path: Path
) -> None:
    lines: list[str] = []
    env = _install(channel, "channels: [local]\ndependencies:\n  - greeting >=1.1,<2\n", tmp_path, lines)
    assert env.packages == ("greeting==1.4.0=0",) and env.python is None and env.interpreter is None
    files = _layer(env, tmp_path)
    assert files["opt/mms/conda/share/greeting/VERSION"] == b"1.4.0"
    assert files["opt/mms/conda/bin/greet"] == b"#!/bin/sh\necho hello 1.4.0\n"
    link = files["opt/mms/conda/lib/libgreeting.so"]
    assert isinstance(link, tarfile.TarInfo) and link.issym() and link.linkname == "libgreeting.so.1"
    record = json.loads(files["opt/mms/conda/conda-meta/greeting-1.4.0-0.json"])  # type: ignore[arg-type]
    assert record["version"] == "1.4.0" and "extracted_package_dir" not in record
    assert str(tmp_path / "cache") not in json.dumps(record), "the record names the worker's cache"
    assert record["url"] == f"file://{channel}/linux-64/greeting-1.4.0-0.tar.bz2"  # where it came from
    assert "opt/mms/conda/CACHEDIR.TAG" not in files
    assert any("solved 1 package(s)" in line for line in lines)


def test_an_exact_pin_and_a_dependency_between_two_packages(channel: Path, tmp_path: Path) -> None:
    lines: list[str] = []
    pinned = _install(channel, "dependencies:\n  - greeting=1.2.3\n", tmp_path, lines)
    assert pinned.packages == ("greeting==1.2.3=0",)
    # greeting-tool needs greeting >=1.2,<2: the solver leaves 2.0.0 for 1.4.0.
    tool = _install(channel, "dependencies:\n  - greeting-tool\n", tmp_path, lines)
    assert tool.packages == ("greeting-tool==0.5=0", "greeting==1.4.0=0")


def test_the_same_packages_give_the_same_layer_in_another_folder_and_cache(channel: Path, tmp_path: Path) -> None:
    text = "dependencies:\n  - greeting-tool\n  - tinylib\n"
    digests = []
    for name in ("a", "b"):
        folder = tmp_path / name
        folder.mkdir()
        env = _install(channel, text, folder, [])
        digests.append(env.layer.diff_id())
    assert digests[0] == digests[1]


def test_a_rebuild_of_the_same_packages_reuses_the_installed_environment_and_other_packages_install(
    channel: Path, tmp_path: Path
) -> None:
    text = "dependencies:\n  - greeting-tool\n  - tinylib\n"
    first: list[str] = []
    made = _install(channel, text, tmp_path, first)
    assert any("contained" in line for line in first)
    # The archives are gone: a reuse needs neither them nor the sandbox.
    shutil.rmtree(tmp_path / "cache" / "archives")
    again: list[str] = []
    reused = _install(channel, text, tmp_path, again)
    assert any("were installed by this worker before: reused" in line for line in again), again
    assert not any("downloaded" in line or "contained" in line for line in again), again
    assert reused.layer.diff_id() == made.layer.diff_id() and reused.packages == made.packages
    assert reused.python == made.python == "3.11.7"
    # Another set of packages (a pin moves greeting) is solved and installed anew.
    other: list[str] = []
    moved = _install(channel, "dependencies:\n  - greeting-tool\n  - greeting=1.2.3\n", tmp_path, other)
    assert any("contained" in line for line in other) and "greeting==1.2.3=0" in moved.packages
    assert _layer(moved, tmp_path)["opt/mms/conda/share/greeting/VERSION"] == b"1.2.3"


def test_no_environment_is_kept_when_the_setting_is_zero(channel: Path, tmp_path: Path) -> None:
    for _ in range(2):
        lines: list[str] = []
        install_conda_env(
            "dependencies: [greeting]\n",
            ["greeting"],
            channels=[f"local=file://{channel}"],
            subdir="linux-64",
            glibc="2.36",
            work=Path(tempfile.mkdtemp(dir=tmp_path)),
            cache_dir=tmp_path / "cache",
            emit=lines.append,
            environments_kept=0,
        )
        assert any("contained" in line for line in lines)
    assert not (tmp_path / "cache" / "environments").exists()


def test_the_environment_cache_keeps_the_most_recently_used_and_removes_only_idle_ones(tmp_path: Path) -> None:
    cache = EnvironmentCache(tmp_path / "environments", keep=2, idle_seconds=60)

    def made(key: str, age: float) -> Path:
        staging = cache.staging()
        (staging / "prefix").mkdir()
        (staging / "prefix" / "file").write_text(key)
        prefix = cache.commit(key, staging)
        os.utime(prefix.parent, (time.time() - age,) * 2)
        return prefix

    made("old-idle", 3600)
    made("recent", 10)
    assert cache.get("old-idle") is not None  # used again: now the most recent
    made("older-idle", 7200)
    made("busy", 30)  # past the count, but used within the idle time: a build may be layering it
    made("newest", 0)
    left = sorted(e.name for e in (tmp_path / "environments").iterdir())
    assert left == ["busy", "newest", "old-idle", "recent"], left
    # A half-made entry of a build that stopped is removed once idle; a fresh one is not.
    stale, fresh = cache.staging(), cache.staging()
    os.utime(stale, (time.time() - 600,) * 2)
    made("another", 0)
    assert not stale.exists() and fresh.exists()
    assert cache.get("missing") is None


def test_a_package_script_never_runs_on_the_worker(channel: Path, tmp_path: Path) -> None:
    env = _install(channel, "dependencies:\n  - scripted\n", tmp_path, [])
    assert "opt/mms/conda/share/scripted.txt" in _layer(env, tmp_path)
    assert not (channel.parent / "post-link-ran").exists(), "the post-link script ran"


def test_an_environment_with_python_brings_its_interpreter_and_noarch_goes_to_its_site_packages(
    channel: Path, tmp_path: Path
) -> None:
    # tinylib needs python: the environment gets its own, and the image would run it.
    env = _install(channel, "dependencies:\n  - tinylib\n", tmp_path, [])
    assert env.python == "3.11.7" and env.interpreter == f"{PREFIX}/bin/python3.11"
    files = _layer(env, tmp_path)
    assert files["opt/mms/conda/lib/python3.11/site-packages/tinylib/__init__.py"] == b"VALUE = 42\n"
    interpreter = files["opt/mms/conda/bin/python3.11"]
    assert isinstance(interpreter, tarfile.TarInfo) and interpreter.linkname == "/usr/bin/python3.11"


def test_what_needs_conda_and_what_the_base_serves() -> None:
    # python the base has and pip entries: no conda at all; anything else: conda.
    assert conda_specs("dependencies:\n  - python=3.11\n  - pip\n  - pip:\n    - six\n", "3.11.7") == []
    assert conda_specs("dependencies:\n  - python=3.9\n", "3.11.7") == ["python =3.9"]
    assert conda_specs("dependencies:\n  - python=3.11\n  - numpy>=1.26\n", "3.11.7") == [
        "numpy>=1.26",
        "python =3.11",
    ]


def test_an_unsatisfiable_spec_names_the_package_and_why(channel: Path, tmp_path: Path) -> None:
    with pytest.raises(BuildFailed) as failed:
        _install(channel, "dependencies:\n  - greeting >=3\n", tmp_path, [])
    assert failed.value.step == "environment"
    assert "greeting >=3" in failed.value.message and "No candidates were found" in failed.value.message
    with pytest.raises(BuildFailed) as failed:
        _install(channel, "dependencies:\n  - greeting-tool\n  - greeting=2.0.0\n", tmp_path, [])
    assert "greeting-tool" in failed.value.message and "greeting >=1.2,<2" in failed.value.message
    with pytest.raises(BuildFailed) as failed:
        _install(channel, "dependencies:\n  - no-such-package\n", tmp_path, [])
    assert "no-such-package" in failed.value.message


def test_a_channel_not_allowed_is_refused_naming_it(channel: Path, tmp_path: Path) -> None:
    for text in (
        "channels: [attacker]\ndependencies:\n  - greeting\n",
        "dependencies:\n  - https://evil.example/ch::greeting\n",
    ):
        with pytest.raises(BuildFailed) as failed:
            _install(channel, text, tmp_path, [])
        assert "is not one of the operator's (local; MMS_CONDA_CHANNELS)" in failed.value.message
    # The manifest is refused first, by the same names (the API's 400 and the pipeline).
    with pytest.raises(PackageSourceRefused, match="channel 'attacker' is not one of the operator's"):
        check_conda_channels("channels: [attacker]\ndependencies: [x]\n", [f"local=file://{channel}"])
    check_conda_channels("channels: [local, nodefaults]\ndependencies: [x]\n", [f"local=file://{channel}"])


def test_a_private_channel_host_needs_the_fetch_allow_list(tmp_path: Path) -> None:
    from workers.fetcher import FetchPolicy

    with pytest.raises(BuildFailed) as failed:
        install_conda_env(
            "dependencies: [greeting]\n",
            ["greeting"],
            channels=["mirror=http://10.1.2.3:8080/conda-forge"],
            subdir="linux-64",
            glibc="2.36",
            work=tmp_path,
            cache_dir=tmp_path / "cache",
            emit=lambda _line: None,
            policy=FetchPolicy(),
        )
    assert "conda channel http://10.1.2.3:8080/conda-forge" in failed.value.message


def test_channel_settings_name_mirrors_and_urls() -> None:
    entries = ["conda-forge", "defaults", "bio=https://mirror.internal/bioconda/", "file:///srv/ch"]
    assert conda_channel_urls(entries) == {
        "conda-forge": "https://conda.anaconda.org/conda-forge",
        "defaults": "https://repo.anaconda.com/pkgs/main",
        "bio": "https://mirror.internal/bioconda",
        "file:///srv/ch": "file:///srv/ch",
    }


def test_layer_builder_keeps_links_as_links_and_never_follows_them(tmp_path: Path) -> None:
    root = tmp_path / "prefix"
    (root / "bin").mkdir(parents=True)
    (root / "bin" / "secret").symlink_to("/etc/shadow")
    builder = LayerBuilder()
    builder.add_prefix(root, PREFIX)
    layer = builder.write(tmp_path / "l.tar.gz", "x")
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(layer.path.read_bytes()))) as tar:  # type: ignore[union-attr]
        member = tar.getmember("opt/mms/conda/bin/secret")
    assert member.issym() and member.linkname == "/etc/shadow" and member.size == 0
