"""Every command a user is told to paste works as printed: the "Try it:" block that `flywheel up`
prints and the ```bash blocks of README.md's "## Five-minute tour".

One `flywheel up` with its defaults (the tour's commands name the default ports) runs in a fresh
directory (its run dir and model store are there; the starter models come from the cache the
other e2e tests fill). Each block runs in one bash session, as a user pastes it into one
terminal, with `-e -o pipefail`: every command must exit 0, and each feedback submission must
be accepted. Promotion needs minutes of training: the tour's "watch" commands are checked for
working, not for a promotion. Then Ctrl-C (SIGINT) must stop everything.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
KEEP_ENV = {"FLYWHEEL_CACHE", "FLYWHEEL_TOOLS_DIR", "FLYWHEEL_GRPCURL_VERSION"}
# One per accepted submission: grpcurl's SUBMIT_STATUS_ACCEPTED, or POST /feedback's "accepted".
ACCEPTED = re.compile(r"SUBMIT_STATUS_(ACCEPTED|SPOOLED)|\"status\": ?\"(accepted|spooled)\"")


def tour_script(readme: str) -> str:
    """The ```bash blocks of README.md's "## Five-minute tour" section, in order, as one script."""
    head = "\n## Five-minute tour\n"
    assert head in readme, "README.md has no '## Five-minute tour' section"
    section = readme.split(head, 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"^```bash\n(.*?)^```$", section, flags=re.S | re.M)
    assert blocks, "the Five-minute tour has no ```bash block"
    return "".join(blocks)


def try_it_block(output: str) -> str:
    """The commands `flywheel up` printed under "Try it", as one script (indent removed)."""
    lines = output.split("\nTry it", 1)[1].split("\n")[1:]
    block = []
    for line in lines:
        if not line.strip():
            break
        block.append(line.removeprefix("  "))
    return "\n".join(block) + "\n"


def feedback_commands(script: str) -> int:
    return sum(
        1
        for line in script.splitlines()
        if not line.startswith("#") and ("Feedback/Submit" in line or "/feedback" in line)
    )


# ---------------------------------------------------------------------------- no processes


def test_the_tour_and_the_printed_block_parse() -> None:
    script = tour_script((REPO / "README.md").read_text())
    assert "Policy/Generate" in script and "localhost:8080/generate" in script and "openai" in script
    assert feedback_commands(script) >= 1 and "user_id" in script


def test_the_admin_token_line_is_printed_unless_the_user_set_it(monkeypatch, tmp_path) -> None:
    from flywheel.core.auth import AuthConfig
    from flywheel.core.config import DEFAULT_PORTS, env_vars
    from flywheel.loop.supervisor import Child, Supervisor, UpConfig

    def printed() -> tuple[Supervisor, str]:
        sup = Supervisor(UpConfig(tmp_path, progress=False))
        sup.children = {n: Child(n, g, h, tmp_path / n) for n, (g, h) in DEFAULT_PORTS.items()}
        return sup, try_it_block(sup.endpoints())

    var = env_vars(AuthConfig)["admin_token"]
    for name in (var.name, var.deprecated_alias):
        if name:
            monkeypatch.delenv(name, raising=False)
    sup, block = printed()  # made up by this run: printed, for the command below it
    assert f"export FLYWHEEL_ADMIN_TOKEN={sup.admin_token} " in block
    assert '"user_id": "alice"' in block and block.count("Bearer $FLYWHEEL_ADMIN_TOKEN") == 1
    for name in (var.name, var.deprecated_alias):  # set by the user: named, never printed
        if name:
            monkeypatch.setenv(name, "set-by-the-user-0123456789")
            sup, block = printed()
            assert "export" not in block and "set-by-the-user" not in block
            assert block.count(f"Bearer ${name}") == 1, block
            monkeypatch.delenv(name)


# ---------------------------------------------------------------------------- `flywheel up`


class Up:
    """`flywheel up` as a subprocess; its output collected by a thread, waited on with a condition."""

    def __init__(self, cwd: Path, env: dict[str, str]) -> None:
        self.lines: list[str] = []
        self.cond = threading.Condition()
        self.proc = subprocess.Popen(
            [str(VENV_BIN / "flywheel"), "up"],
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self.cond:
                self.lines.append(line)
                self.cond.notify_all()
        with self.cond:
            self.lines.append("")  # EOF marker: nothing more will come
            self.cond.notify_all()

    @property
    def output(self) -> str:
        with self.cond:
            return "".join(self.lines)

    def wait_for(self, text: str, timeout_s: float) -> str:
        """The output once it contains `text`; fails at the deadline or when the output ends first."""
        deadline = time.monotonic() + timeout_s
        with self.cond:
            while True:
                out = "".join(self.lines)
                if text in out:
                    return out
                if self.lines and self.lines[-1] == "":
                    pytest.fail(f"`flywheel up` ended (code {self.proc.poll()}) before {text!r}:\n{out[-4000:]}")
                left = deadline - time.monotonic()
                if left <= 0:
                    pytest.fail(f"no {text!r} from `flywheel up` within {timeout_s:.0f}s:\n{out[-4000:]}")
                self.cond.wait(left)

    def interrupt(self) -> int:
        """Ctrl-C, as in the terminal: SIGINT to `flywheel up` itself; its exit code."""
        self.proc.send_signal(signal.SIGINT)
        return self.proc.wait(timeout=120)


@contextmanager
def flywheel_up(cwd: Path, env: dict[str, str]) -> Iterator[Up]:
    up = Up(cwd, env)
    try:
        yield up
    finally:
        if up.proc.poll() is None:  # the test failed before its Ctrl-C: stop it anyway
            up.proc.send_signal(signal.SIGINT)
            try:
                up.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                up.proc.kill()  # its services stop once their parent is gone (FLYWHEEL_PARENT_PID)
                up.proc.wait(timeout=10)


def paste(script: str, cwd: Path, env: dict[str, str], what: str) -> str:
    """Run `script` in one bash session, as pasted into a terminal; fail on the first failing command."""
    r = subprocess.run(
        ["bash", "-e", "-o", "pipefail", "-x", "-c", script],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert r.returncode == 0, f"{what}: a command failed (code {r.returncode}):\n{r.stderr[-4000:]}\n{r.stdout[-4000:]}"
    print(f"---- {what}:\n{r.stdout}")  # shown with -s, or when the test fails
    return r.stdout


@pytest.mark.timeout(900)
def test_printed_and_readme_commands_work_as_pasted(tmp_path) -> None:
    from flywheel.core.config import DEFAULT_PORTS
    from flywheel.loop.supervisor import port_free

    busy = [f"{name} {p}" for name, ports in DEFAULT_PORTS.items() for p in ports if not port_free(p)]
    if busy:
        pytest.fail(
            f"the tour's commands name the default ports, and these are in use: {', '.join(busy)}. "
            "Stop what holds them (another `flywheel up`?) and run this test again."
        )
    built = subprocess.run([str(REPO / "scripts" / "grpcurl")], capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, f"scripts/grpcurl failed:\n{built.stderr}"
    bin_dir = tmp_path / "bin"  # `grpcurl` on PATH for the printed block (the README makes its own)
    bin_dir.mkdir()
    (bin_dir / "grpcurl").symlink_to(built.stdout.strip())
    work = tmp_path / "checkout"  # the README's commands run in a checkout: .venv and scripts
    work.mkdir()
    (work / ".venv").symlink_to(VENV_BIN.parent)
    (work / "scripts").symlink_to(REPO / "scripts")

    base = {k: v for k, v in os.environ.items() if not k.startswith("FLYWHEEL_") or k in KEEP_ENV}
    base.pop("VIRTUAL_ENV", None)
    # A shell without the venv and without grpcurl: the README's first commands provide both.
    venvs = {str(VENV_BIN), str(REPO / ".venv" / "bin")}
    plain_path = os.pathsep.join(d for d in base.get("PATH", "").split(os.pathsep) if d and d not in venvs)
    plain = base | {"PATH": plain_path}
    # `flywheel up` as started from an activated venv; the printed block needs grpcurl on PATH.
    activated = base | {"PATH": os.pathsep.join([str(bin_dir), str(VENV_BIN), plain_path])}

    t0 = time.monotonic()
    with flywheel_up(work, activated) as up:
        out = up.wait_for("Ctrl-C stops everything.", timeout_s=600)
        started = time.monotonic() - t0
        assert "Flywheel is up." in out

        block = try_it_block(out)
        assert "export FLYWHEEL_ADMIN_TOKEN=" in block  # made up by this run: the block says so
        got = paste(block, work, activated, "the commands `flywheel up` printed")
        assert len(ACCEPTED.findall(got)) == feedback_commands(block) >= 1, got
        assert '"generated_text"' in got and '"state":' in got and "flywheel_policy_serving_version" in got, got

        tour = tour_script((REPO / "README.md").read_text())
        got = paste(tour, work, plain, "README.md's Five-minute tour")
        assert len(ACCEPTED.findall(got)) == feedback_commands(tour) >= 1, got
        assert '"generated_text"' in got and "flywheel_policy_serving_version" in got, got
        assert '"policy_version": "0"' in got and "policy v0" in got, got  # GetInfo, `flywheel models list`

        code = up.interrupt()
        out = up.wait_for("stopped.", timeout_s=10)
        assert code == 0 and "SIGINT: stopping..." in out, out[-2000:]
    print(f"flywheel up: {started:.0f}s to start; whole test {time.monotonic() - t0:.0f}s")
