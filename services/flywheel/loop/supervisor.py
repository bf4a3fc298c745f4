"""`flywheel up`: the broker, the starter models and the four services as separate processes.

Why a supervisor rather than four terminals: the services must share one HMAC key (tokens
signed by policy are verified by feedback), one admin token, one model store and one broker,
and a child that dies must be reported with its log, not left as a silent gap in the loop.

Order of start-up: broker (the embedded Tansu unless FLYWHEEL_KAFKA_BOOTSTRAP names one) ->
topics -> starter models (built once into a cache with progress bars, copied into the run's
store) -> policy, feedback, reward, trainer (`python -m flywheel.<service>`, each in its own
process group, logs under RUN/logs) -> wait until each reports SERVING over grpc.health.v1.
Once all serve, a service that exits is started again after a backoff (1 s doubling to 30 s),
as a Deployment's pod would be: every service keeps its events across a restart (spools, committed
offsets, the model store). One that exits `restarts` times within `restart_window_s` is a crash
loop, and so is one that exits while the loop starts: those stop everything with its log tail,
and so does the broker (the embedded one keeps its topics in memory).
Stop: SIGTERM to every process group, a grace period, then SIGKILL; the broker last.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from flywheel.core.auth import AuthConfig
from flywheel.core.brokers import EmbeddedTansu, free_port
from flywheel.core.config import DEFAULT_PORTS, KafkaConfig, env_value, env_vars
from flywheel.core.modelstore import ModelStoreConfig
from flywheel.feedback.config import FeedbackConfig

SERVICES = tuple(DEFAULT_PORTS)


class ChildDied(RuntimeError):
    """A service process exited and is not restarted; the message has its name, exit code, how
    often it was restarted lately and its log tail."""

    def __init__(self, name: str, code: int | None, log: Path, restarts: int = 0, window_s: float = 0.0) -> None:
        self.name, self.code, self.log, self.restarts = name, code, log, restarts
        again = f" after {restarts} restarts within {window_s:.0f}s (a crash loop)" if restarts else ""
        super().__init__(f"service {name} exited with code {code}{again}; last lines of {log}:\n{tail(log)}")


def tail(path: Path, lines: int = 25) -> str:
    """The last lines of a log file (what a user needs to see when a child dies)."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def cache_store() -> Path:
    """Where starter models are built once and reused by every run: $FLYWHEEL_CACHE/starters/RECIPE
    (a changed recipe builds anew instead of reusing an old build)."""
    from flywheel.policy.starter import RECIPE

    base = os.environ.get("FLYWHEEL_CACHE") or Path.home() / ".cache" / "flywheel"
    return Path(base) / "starters" / RECIPE


def ensure_starters(store_root: Path, progress: bool = True) -> None:
    """Version 0 of "policy" and "reward" in `store_root`: copied from the cache, built there if missing."""
    from flywheel.core.modelstore import ModelStore
    from flywheel.policy.service import ensure_starter as ensure_policy
    from flywheel.reward.config import RewardModelConfig
    from flywheel.reward.starter import ensure_starter as ensure_reward

    cache = ModelStore(cache_store())
    target = ModelStore(store_root)
    for name in ("policy", "reward"):
        if (target.version_path(name, 0) / "manifest.json").is_file() or target.list_versions(name):
            continue
        if progress:
            print(f"starter {name} model: ", end="", flush=True)
        t0 = time.monotonic()
        if name == "policy":
            ensure_policy(cache, progress=progress)
        else:
            ensure_reward(cache, RewardModelConfig())
        src, dst = cache.version_path(name, 0), target.version_path(name, 0)
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = dst.parent / f".copy-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(src, tmp)
        os.rename(tmp, dst)
        target.verify(name, 0)
        if progress:
            print(f"ready in {time.monotonic() - t0:.1f}s ({dst})", flush=True)


PUBLISHERS = ("trainer", "reward")  # the only services that get the model-signing key
# Each service gets only the secrets it uses (docs/SECURITY.md): the feedback service cannot call
# the trainer's admin RPCs, the policy cannot move the reward normalization, and so on.
SECRETS_OF = {
    # Issues tokens; knows the admin (candidate versions) by the token's hash, never the token.
    "policy": ("FLYWHEEL_AUTH_HMAC_KEY", "FLYWHEEL_AUTH_ADMIN_TOKEN_SHA256"),
    "feedback": ("FLYWHEEL_AUTH_HMAC_KEY",),  # verifies tokens
    "reward": ("FLYWHEEL_AUTH_SERVICE_TOKEN",),  # tells the trainer's scores from anyone else's
    "trainer": ("FLYWHEEL_AUTH_ADMIN_TOKEN", "FLYWHEEL_AUTH_SERVICE_TOKEN"),
}
SECRETS = {name for names in SECRETS_OF.values() for name in names}


def sign_starters(store_root: Path, run_dir: Path) -> tuple[str, str]:
    """The run's model-signing key (FLYWHEEL_MODEL_STORE_SIGNING_KEY, else RUN/keys, made once per run
    directory) and its public key in base64; the starters, which this process built or copied without
    a key, signed with it (it vouches for them; flywheel.core.signing)."""
    from flywheel.core import errors, signing

    key = env_value(ModelStoreConfig, "signing_key") or str(run_dir / "keys" / signing.KEY_FILE)
    if not env_value(ModelStoreConfig, "signing_key") and not Path(key).is_file():
        signing.keygen(Path(key).parent)
    store = ModelStoreConfig(root=str(store_root), signing_key=key).store()
    for name in ("policy", "reward"):
        try:
            store.verify(name, 0)
        except errors.IntegrityError:  # unsigned, or signed by another run's key
            store.sign(name, 0)
    assert store.signer is not None
    return key, signing.public_b64(store.signer.public_key)


@contextlib.contextmanager
def _patched_env(values: dict[str, str]) -> Iterator[None]:
    """os.environ with `values` set, restored afterwards."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def port_free(port: int, host: str = "127.0.0.1") -> bool:
    """True when a server could listen on `port` now (SO_REUSEADDR as servers set it, so the
    TIME_WAIT of connections closed a moment ago does not count as busy)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def health_status(address: str, timeout_s: float = 2.0) -> str:
    """grpc.health.v1 status of the server at `address` ("SERVING", "NOT_SERVING", or the error)."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from flywheel.core.tls import channel

    with channel(address) as ch:
        try:
            resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=timeout_s)
        except grpc.RpcError as e:
            return e.code().name
    return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)


@dataclasses.dataclass
class Child:
    """One service process (its own process group) and where it listens."""

    name: str
    grpc_port: int
    http_port: int
    log: Path
    proc: subprocess.Popen | None = None
    restarted_at: list[float] = dataclasses.field(default_factory=list)  # time.monotonic() of each restart
    restart_due: float | None = None  # exited: started again at this time.monotonic()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


@dataclasses.dataclass
class UpConfig:
    """What `flywheel up` starts; every field has a default that works on a laptop."""

    run_dir: Path = Path(".flywheel/up")
    bootstrap: str = ""  # empty: FLYWHEEL_KAFKA_BOOTSTRAP, else the embedded Tansu
    store: str = ""  # empty: FLYWHEEL_MODEL_STORE, else RUN/models (fresh, starters copied in)
    free_ports: bool = False  # True: let the OS pick ports (tests, demos beside other runs)
    env: dict[str, str] = dataclasses.field(default_factory=dict)  # extra child environment (tuning)
    config_yaml: dict[str, Any] | None = None  # written to RUN/config.yaml and named by FLYWHEEL_CONFIG
    start_timeout_s: float = 600.0
    stop_grace_s: float = 20.0
    progress: bool = True
    restarts: int = 5  # a service that exited is restarted this often within restart_window_s; 0: never
    restart_window_s: float = 600.0  # one more exit within this window is a crash loop: everything stops
    restart_backoff_s: float = 1.0  # wait before the first restart in the window; doubles each time, up to 30 s

    def __post_init__(self) -> None:
        if self.restarts < 0 or self.restart_window_s <= 0 or self.restart_backoff_s < 0:
            raise ValueError(
                f"restarts={self.restarts}, restart_window_s={self.restart_window_s}, restart_backoff_s="
                f"{self.restart_backoff_s}: give restarts >= 0 (0: never), a window > 0 s and a backoff >= 0 s"
            )


class Supervisor:
    """Starts and stops the whole loop; `poll()` raises ChildDied for a service that exited."""

    def __init__(self, config: UpConfig) -> None:
        self.cfg = config
        self.run_dir = Path(config.run_dir).resolve()
        self.broker: EmbeddedTansu | None = None
        self.bootstrap = config.bootstrap or env_value(KafkaConfig, "bootstrap") or ""
        self.store = Path(config.store or env_value(ModelStoreConfig, "root") or self.run_dir / "models")
        self.store = self.store.expanduser().resolve()
        self.hmac_key = env_value(AuthConfig, "hmac_key") or secrets.token_urlsafe(32)
        self.admin_token = env_value(AuthConfig, "admin_token") or secrets.token_urlsafe(24)
        # the trainer's credential at the reward service: only its scores move the reward normalization
        self.service_token = env_value(AuthConfig, "service_token") or secrets.token_urlsafe(24)
        self.signing_key = self.public_key = ""  # the run's model-signing key and its public key (sign_starters)
        self.children: dict[str, Child] = {}
        self._stopped = False
        self._serving = False  # all SERVING once: from then on a service that exits is restarted

    # ------------------------------------------------------------------ start
    def _say(self, msg: str) -> None:
        if self.cfg.progress:
            print(msg, flush=True)

    def _ports(self) -> dict[str, tuple[int, int]]:
        if self.cfg.free_ports:
            return {name: (free_port(), free_port()) for name in SERVICES}
        busy = [f"{n} {p}" for n, ports in DEFAULT_PORTS.items() for p in ports if not port_free(p)]
        if busy:
            raise RuntimeError(f"ports already in use ({', '.join(busy)}): stop what holds them, or use --free-ports")
        return dict(DEFAULT_PORTS)

    def env(self) -> dict[str, str]:
        """The environment every service shares (one key, one store, one broker)."""
        env = dict(os.environ)
        env.update(
            FLYWHEEL_KAFKA_BOOTSTRAP=self.bootstrap,
            FLYWHEEL_MODEL_STORE_ROOT=str(self.store),
            FLYWHEEL_AUTH_HMAC_KEY=self.hmac_key,
            FLYWHEEL_AUTH_ADMIN_TOKEN=self.admin_token,
            FLYWHEEL_AUTH_ADMIN_TOKEN_SHA256=hashlib.sha256(self.admin_token.encode()).hexdigest(),
            FLYWHEEL_AUTH_SERVICE_TOKEN=self.service_token,
            FLYWHEEL_POLICY_STATE_DIR=str(self.run_dir / "state" / "policy"),
            FLYWHEEL_FEEDBACK_STATE_DIR=str(self.run_dir / "state" / "feedback"),
            FLYWHEEL_REWARD_JOIN_STATE_DIR=str(self.run_dir / "state" / "reward"),
            PYTHONUNBUFFERED="1",
            HF_HUB_OFFLINE="1",
            FLYWHEEL_PARENT_PID=str(os.getpid()),  # a service stops once this process is gone (even SIGKILLed)
            TOKENIZERS_PARALLELISM="false",
        )
        from flywheel.core.server import ServerConfig  # grpc and aiohttp: not imported by `flywheel up` before

        if env_value(ServerConfig, "host") is None:
            env["FLYWHEEL_SERVER_HOST"] = "127.0.0.1"
        env.pop("FLYWHEEL_MODEL_STORE_SIGNING_KEY", None)  # only the publishers get it (_spawn)
        if self.public_key:
            trusted = [env_value(ModelStoreConfig, "trusted_keys") or "", self.public_key]
            env["FLYWHEEL_MODEL_STORE_TRUSTED_KEYS"] = ",".join(filter(None, trusted))
        env.setdefault("OMP_NUM_THREADS", "1")  # four torch processes share the machine's cores
        env.setdefault("FLYWHEEL_TRAINER_TORCH_THREADS", "1")
        for name, child in self.children.items():
            env[f"FLYWHEEL_{name.upper()}_ADDR"] = child.address
        if self.cfg.config_yaml is not None:
            env["FLYWHEEL_CONFIG"] = str(self.run_dir / "config.yaml")
        env.update(self.cfg.env)
        return env

    def start(self) -> None:
        """Everything up and SERVING, or an exception after whatever started was stopped again."""
        try:
            self._start()
        except BaseException:
            self.stop()
            raise

    def _start(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "logs").mkdir(exist_ok=True)
        if not self.bootstrap:
            self.broker = EmbeddedTansu(log_path=str(self.run_dir / "logs" / "broker.log"))
            self.bootstrap = self.broker.start()
            self._say(f"broker: embedded Tansu at {self.bootstrap} (memory storage)")
        else:
            self._say(f"broker: {self.bootstrap}")
        from flywheel.core.bus import ensure_topics
        from flywheel.core.config import KafkaConfig, TopicsConfig, load

        with _patched_env(self.cfg.env):  # topic names the children will use (FLYWHEEL_TOPICS_*)
            topics = load(TopicsConfig)
        created = ensure_topics(load(KafkaConfig, bootstrap=self.bootstrap), topics, timeout_s=60)
        self._say(f"topics: {len(created)} created")
        ensure_starters(self.store, self.cfg.progress)
        self.signing_key, self.public_key = sign_starters(self.store, self.run_dir)
        if self.cfg.config_yaml is not None:
            import yaml

            (self.run_dir / "config.yaml").write_text(yaml.safe_dump(self.cfg.config_yaml))
        for name, (g, h) in self._ports().items():
            self.children[name] = Child(name, g, h, self.run_dir / "logs" / f"{name}.log")
        env = self.env()
        for child in self.children.values():
            self._spawn(child, env)
        self._wait_serving()
        self._serving = True

    def child_env(self, name: str, env: dict[str, str]) -> dict[str, str]:
        """The shared environment with only the secrets service `name` uses, and the settings that
        make the feedback page work (page_settings)."""
        out = {k: v for k, v in env.items() if k not in SECRETS or k in SECRETS_OF[name]}
        if name in PUBLISHERS and self.signing_key:
            out["FLYWHEEL_MODEL_STORE_SIGNING_KEY"] = self.signing_key
        out.update(self.page_settings(name, env))
        return out

    def page_origins(self) -> list[str]:
        """The origins a browser may load the feedback page from: the feedback service's HTTP port as
        127.0.0.1 and as localhost (the services listen on 127.0.0.1 unless FLYWHEEL_SERVER_HOST says otherwise)."""
        port = self.children["feedback"].http_port
        return [f"http://127.0.0.1:{port}", f"http://localhost:{port}"]

    def page_settings(self, name: str, env: dict[str, str]) -> dict[str, str]:
        """What service `name` needs for the page (served by feedback, streaming from the policy on
        another port, so another origin): the policy allows the page's origins (CORS) besides any the
        user set, and the page is told where the policy is unless the user said so."""
        if "feedback" not in self.children or "policy" not in self.children:
            return {}
        if name == "policy":
            from flywheel.core.server import ServerConfig  # grpc and aiohttp: imported only once needed

            cors = env_vars(ServerConfig)["cors_origins"].name
            given = [o.strip() for o in env.get(cors, "").split(",") if o.strip()]
            return {cors: ",".join(dict.fromkeys(given + self.page_origins()))}
        if name == "feedback":
            url = env_vars(FeedbackConfig)["page_policy_url"].name
            if url not in env:
                return {url: f"http://127.0.0.1:{self.children['policy'].http_port}"}
        return {}

    def _spawn(self, child: Child, env: dict[str, str]) -> None:
        cmd = [sys.executable, "-m", f"flywheel.{child.name}", "--grpc-port", str(child.grpc_port)]
        cmd += ["--http-port", str(child.http_port)]
        env = self.child_env(child.name, env)
        out: IO[bytes] = open(child.log, "ab")  # noqa: SIM115 - the child keeps its own copy
        try:
            child.proc = subprocess.Popen(
                cmd, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        finally:
            out.close()

    def _wait_serving(self) -> None:
        t0 = time.monotonic()
        deadline = t0 + self.cfg.start_timeout_s
        waiting = set(self.children)
        while waiting:
            self.poll()
            for name in sorted(waiting):
                if health_status(self.children[name].address, 1.0) == "SERVING":
                    waiting.discard(name)
                    self._say(f"  {name:9s} SERVING after {time.monotonic() - t0:5.1f}s")
            if time.monotonic() > deadline:
                logs = "\n".join(f"--- {n}:\n{tail(self.children[n].log, 10)}" for n in sorted(waiting))
                raise TimeoutError(f"not SERVING within {self.cfg.start_timeout_s:.0f}s: {sorted(waiting)}\n{logs}")
            if waiting:
                time.sleep(0.5)

    # ------------------------------------------------------------------ watch
    def poll(self) -> None:
        """Restart the services that exited, once their backoff is over, or raise ChildDied for one
        that is not restarted: it exited while the loop was starting, or once too often within the
        window (never hide a dead child)."""
        if self._stopped:
            return
        now = time.monotonic()
        for child in self.children.values():
            if child.restart_due is not None:
                if now >= child.restart_due:
                    self._restart(child)
                continue
            if child.proc is None or child.proc.poll() is None:
                continue
            cfg, code = self.cfg, child.proc.returncode
            child.restarted_at = [t for t in child.restarted_at if now - t < cfg.restart_window_s]
            if not self._serving or len(child.restarted_at) >= cfg.restarts:
                raise ChildDied(child.name, code, child.log, len(child.restarted_at), cfg.restart_window_s)
            delay = min(30.0, cfg.restart_backoff_s * 2 ** len(child.restarted_at))
            child.restarted_at.append(now)
            child.restart_due = now + delay
            self._say(
                f"{child.name} exited with code {code}; restarting it in {delay:.1f}s (restart {len(child.restarted_at)}"
                f" of {cfg.restarts} within {cfg.restart_window_s:.0f}s); last lines of {child.log}:\n{tail(child.log, 10)}"
            )
        if self.broker is not None and not self.broker.alive():
            raise ChildDied(
                "broker",
                self.broker.proc.returncode if self.broker.proc else None,
                self.run_dir / "logs" / "broker.log",
            )

    def _restart(self, child: Child) -> None:
        child.restart_due = None
        with contextlib.suppress(ProcessLookupError, PermissionError):  # what the old group left behind
            os.killpg(child.proc.pid, signal.SIGKILL)  # type: ignore[union-attr]
        with open(child.log, "a") as f:
            f.write(f"--- flywheel up: restarting {child.name} (restart {len(child.restarted_at)}) ---\n")
        self._spawn(child, self.env())
        self._say(f"{child.name} restarted (pid {child.proc.pid})")  # type: ignore[union-attr]

    def endpoints(self) -> str:
        """Where each service listens, then "Try it" commands that work when pasted, in order, into
        one shell (tests/e2e/test_pasted_commands.py runs them): an answer, feedback on it with its
        interaction_id and feedback_token for the same user_id, the HTTP routes, the trainer's status
        with the admin token, the serving version. The first block (up to the blank line) is the table."""
        p = self.children
        pol, fb, tr = p["policy"], p["feedback"], p["trainer"]
        http = f"http://127.0.0.1:{pol.http_port}"
        on_path = shutil.which("python")
        same = on_path and Path(on_path).parent == Path(sys.executable).parent
        py = "python" if same else shlex.quote(sys.executable)  # the one with text_generation
        to_feedback = (  # the Generate answer (grpcurl prints proto field names) -> a thumbs-up FeedbackRequest
            "import json, sys; a = json.load(sys.stdin); print(json.dumps({"
            '"feedback_id": "f-" + a["interaction_id"], "interaction_id": a["interaction_id"], '
            '"feedback_token": a["feedback_token"], "user_id": "alice", "thumbs": 1}))'
        )
        from flywheel.core.config import env_vars

        var = env_vars(AuthConfig)["admin_token"]  # set by the user (new name or alias), else made up here
        given = [v for v in (var.name, var.deprecated_alias) if v and os.environ.get(v) == self.admin_token]
        token_var = given[0] if given else "FLYWHEEL_ADMIN_TOKEN"  # also `python -m flywheel.ops`' --token
        if given:
            admin = f"  # the admin token: ${token_var}, as you set it for `flywheel up`"
        else:
            admin = f"  export {token_var}={self.admin_token}  # this run's admin token (admin calls)"
        lines = [
            f"{'service':9s} {'gRPC':22s} HTTP",
            *(f"{c.name:9s} {c.address:22s} http://127.0.0.1:{c.http_port}" for c in p.values()),
            f"broker    {self.bootstrap}",
            f"model store {self.store}; logs {self.run_dir / 'logs'}",
            f"page      http://127.0.0.1:{fb.http_port}/  (ask, rate, compare answers in a browser: docs/PAGE.md)",
            "",
            "Try it (paste in order into one shell; grpcurl: scripts/grpcurl builds it; more in README.md):",
            f'  answer=$(grpcurl -plaintext -d \'{{"prompt": "how do I reset my password?", "user_id": "alice"}}\' '
            f'{pol.address} flywheel.v1.Policy/Generate); echo "$answer"',
            "  # thumbs up for that answer: its interaction_id and feedback_token, from the same user_id",
            f"  echo \"$answer\" | {py} -c '{to_feedback}' | grpcurl -plaintext -d @ {fb.address} flywheel.v1.Feedback/Submit",
            f"  curl -s -w '\\n' {http}/generate -H 'content-type: application/json' "
            '-d \'{"inputs": "where is my order?", "parameters": {"max_new_tokens": 48}}\'',
            f'  {py} -c "from text_generation import Client; '
            f"print(Client('{http}').generate('how do I bake bread?').generated_text)\"",
            admin,
            f'  grpcurl -plaintext -H "authorization: Bearer ${token_var}" {tr.address} flywheel.v1.Trainer/GetStatus',
            "  # the version being served: 0 is the starter; each promoted version is swapped in",
            f"  curl -s {http}/metrics | grep serving_version",
        ]
        return "\n".join(lines)

    # ------------------------------------------------------------------ stop
    def stop(self) -> None:
        """SIGTERM every service's process group, wait, SIGKILL what is left; then the broker."""
        self._stopped = True
        live = [c for c in self.children.values() if c.alive()]
        for c in live:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(c.proc.pid, signal.SIGTERM)  # type: ignore[union-attr]
        deadline = time.monotonic() + self.cfg.stop_grace_s
        while any(c.alive() for c in live) and time.monotonic() < deadline:
            time.sleep(0.1)
        for c in self.children.values():
            if c.proc is None:
                continue
            if c.alive():
                self._say(f"  {c.name} did not stop within {self.cfg.stop_grace_s:.0f}s: SIGKILL")
            # The group may hold grandchildren even when the leader is gone.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(c.proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                c.proc.wait(timeout=10)
        if self.broker is not None:
            self.broker.stop()
            self.broker = None

    def __enter__(self) -> Supervisor:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def up_config(args: Any) -> UpConfig:
    """UpConfig from the `flywheel up` argparse Namespace (fields it lacks keep their defaults)."""
    return UpConfig(
        run_dir=Path(getattr(args, "run_dir", None) or ".flywheel/up"),
        free_ports=bool(getattr(args, "free_ports", False)),
        start_timeout_s=float(getattr(args, "timeout", None) or 600.0),
        restarts=int(getattr(args, "restarts", UpConfig.restarts)),
    )


def up_main(args: Any) -> int:
    """`flywheel up`: start everything, print endpoints, run until Ctrl-C/SIGTERM or a service that exits
    is not restarted (see Supervisor.poll)."""
    try:
        cfg = up_config(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not env_value(ModelStoreConfig, "root") and not env_value(KafkaConfig, "bootstrap"):
        shutil.rmtree(Path(cfg.run_dir) / "state", ignore_errors=True)  # the embedded broker starts empty
        shutil.rmtree(Path(cfg.run_dir) / "models", ignore_errors=True)
    sup = Supervisor(cfg)
    stop: dict[str, Any] = {"sig": None, "starting": True}

    def on_signal(sig: int, _frame: Any) -> None:
        stop["sig"] = sig
        if stop["starting"]:  # interrupt a long start-up; start() stops what it started
            raise KeyboardInterrupt

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    code = 0
    try:
        sup.start()
        stop["starting"] = False
        print("\nFlywheel is up.\n" + sup.endpoints() + "\n\nCtrl-C stops everything.", flush=True)
        while stop["sig"] is None:
            sup.poll()
            time.sleep(0.5)
        print(f"\n{signal.Signals(stop['sig']).name}: stopping...", flush=True)
    except ChildDied as e:
        print(f"\nerror: {e}", file=sys.stderr, flush=True)
        code = 1
    except KeyboardInterrupt:
        pass
    finally:
        sup.stop()
        for s, h in old.items():
            signal.signal(s, h)
    print("stopped.", flush=True)
    return code
