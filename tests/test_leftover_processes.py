"""The leftover-process check (tests/leftover_processes.py), on sessions of its own."""

from __future__ import annotations

import os
import signal
import textwrap
from pathlib import Path

import pytest

from tests.leftover_processes import is_running

pytest_plugins = ["pytester"]

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def session(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch):
    """Runs a test module's source in a session of its own, with the check on."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))

    def run(source: str) -> pytest.RunResult:
        pytester.makepyfile(test_inner=textwrap.dedent(source))
        return pytester.runpytest_subprocess("-p", "tests.leftover_processes", "-p", "no:cacheprovider", timeout=60)

    return run


def _pids(pytester: pytest.Pytester) -> list[int]:
    return [int(pid) for pid in (pytester.path / "pids").read_text().split()]


def test_a_session_that_leaves_processes_running_fails_names_and_kills_them(session, pytester: pytest.Pytester) -> None:
    result = session(
        """
        import subprocess

        def test_a_daemon_of_a_script():  # like registry.sh: setsid + & and the shell exits
            pid = subprocess.run(
                ["sh", "-c", "setsid sleep 61 >/dev/null 2>&1 </dev/null & echo $!"],
                capture_output=True, text=True, check=True,
            ).stdout.strip()
            with open("pids", "a") as pids:
                print(pid, file=pids)

        def test_a_child_with_an_environment_of_its_own():
            child = subprocess.Popen(["sleep", "62"], env={"PATH": "/usr/bin:/bin"})
            with open("pids", "a") as pids:
                print(child.pid, file=pids)
        """,
    )
    daemon, child = _pids(pytester)
    result.assert_outcomes(passed=2)
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines(
        ["*processes left running*", f"*pid {daemon}: sleep 61", f"*pid {child}: sleep 62"], consecutive=False
    )
    assert not is_running(daemon) and not is_running(child)


def test_a_session_whose_tests_stop_their_processes_passes(session, pytester: pytest.Pytester) -> None:
    result = session(
        """
        import subprocess
        import pytest

        @pytest.fixture
        def server():
            process = subprocess.Popen(["sleep", "60"])
            yield process
            process.terminate()
            process.wait()

        def test_it_fails_and_its_fixture_still_stops_the_process(server):
            assert server.poll() is None
            assert False, "the test's own failure"

        def test_multiprocessing_leaves_its_helpers_to_the_interpreter():
            import multiprocessing
            child = multiprocessing.get_context("spawn").Process(target=print)
            child.start()
            child.join()
            assert child.exitcode == 0
        """,
    )
    result.assert_outcomes(passed=1, failed=1)
    assert "processes left running" not in result.stdout.str()


def test_shared_infrastructure_and_handed_over_processes_are_left_running(session, pytester: pytest.Pytester) -> None:
    result = session(
        """
        import subprocess
        import pytest
        from tests.leftover_processes import hand_over, shared_infrastructure_env

        def _daemon(env=None):
            return int(subprocess.run(
                ["sh", "-c", "setsid sleep 63 >/dev/null 2>&1 </dev/null & echo $!"],
                capture_output=True, text=True, check=True, env=env,
            ).stdout)

        def test_shared(request):
            shared = _daemon(shared_infrastructure_env())
            handed_over = _daemon()
            hand_over(request.config, [handed_over], "another session still uses it")
            with open("pids", "w") as pids:
                print(shared, handed_over, file=pids)
        """,
    )
    pids = _pids(pytester)
    try:
        result.assert_outcomes(passed=1)
        assert result.ret == pytest.ExitCode.OK
        assert all(is_running(pid) for pid in pids)
        result.stdout.fnmatch_lines([f"left running: pid {pids[1]} (another session still uses it)"])
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
