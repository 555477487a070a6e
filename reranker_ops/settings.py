"""Settings: one pydantic-settings class, env prefix ``RERANKER_``, ``.env`` support.

Every path the tool uses is derived here (from ``models_dir`` and ``run_dir``), and the settings object is
passed down explicitly: nothing below the CLI reads the environment. MOSEC's worker processes never import
this module: they read the typed generation config (``protocol/genconfig.py``) the supervisor writes.

Values come from the arguments, else ``RERANKER_<NAME>`` in the environment (any case), else the same in
``./.env``, else the default. Every bad value is reported at once, on one line (``SettingsError``).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional, get_args

from pydantic import Field, PrivateAttr, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, DotEnvSettingsSource, PydanticBaseSettingsSource, SettingsConfigDict

DEFAULT_MODEL = "DiTy/cross-encoder-russian-msmarco"
# Values a template ships and nobody should run with (the Kubernetes Secret once said "change-me")
PLACEHOLDER_KEYS = {"change-me", "changeme", "change_me", "secret", "password", "api-key", "apikey", "key",
                    "your-key", "your-api-key", "xxx", "todo"}
Precision = Literal["auto", "fp32", "fp16", "int8", "int8-weights", "bf16"]
ENV_PREFIX = "RERANKER_"
ENV_FILE = ".env"
# Kept for callers that name the type; pydantic's SecretStr never shows its value in a repr, log or traceback.
Secret = SecretStr
SPEC_KEYS = ("workers", "threads", "precision", "aliases")


@dataclass(frozen=True)
class ModelSpec:
    """One model of ``RERANKER_MODELS``: the model as ``RERANKER_MODEL`` takes it, and what it overrides of the
    server's settings (``None``: the server's)."""

    model: str
    workers: Optional[int] = None
    threads: Optional[int] = None
    precision: Optional[str] = None
    aliases: tuple[str, ...] = ()

    @property
    def key(self) -> str:
        """A name for its files (its workers' heartbeat folder): the model, with only safe characters."""
        return re.sub(r"[^A-Za-z0-9._-]+", "_", self.model).strip("._-")[-60:] or "model"


def parse_model_specs(text: str) -> tuple[list[ModelSpec], list[str]]:
    """``RERANKER_MODELS``: comma-separated models, each ``MODEL[;workers=N][;threads=N][;precision=P]
    [;aliases=a|b]``; the specs, and every problem found."""
    specs, problems = [], []
    for item in (i.strip() for i in text.split(",")):
        if not item:
            continue
        model, *opts = (part.strip() for part in item.split(";"))
        given: dict[str, Any] = {}
        for opt in opts:
            key, eq, value = opt.partition("=")
            key, value = key.strip(), value.strip()
            if not eq or key not in SPEC_KEYS:
                problems.append(f"models: {opt!r} in {item!r} is not one of {', '.join(k + '=' for k in SPEC_KEYS)}")
            elif key == "workers":
                if not value.isdigit() or not 1 <= int(value) <= 64:
                    problems.append(f"models: workers={value!r} of {model!r} is not a count from 1 to 64")
                else:
                    given["workers"] = int(value)
            elif key == "threads":
                if not value.isdigit() or not 1 <= int(value) <= 256:
                    problems.append(f"models: threads={value!r} of {model!r} is not a count from 1 to 256")
                else:
                    given["threads"] = int(value)
            elif key == "precision":
                if value not in get_args(Precision):
                    problems.append(f"models: precision={value!r} of {model!r} is not one of "
                                    f"{', '.join(get_args(Precision))}")
                else:
                    given["precision"] = value
            else:
                given["aliases"] = tuple(dict.fromkeys(a.strip() for a in value.split("|") if a.strip()))
        if not model:
            problems.append(f"models: {item!r} names no model")
            continue
        specs.append(ModelSpec(model, **given))
    seen: dict[str, str] = {}
    for spec in specs:
        for name in (spec.model, *spec.aliases):
            if name in seen:
                problems.append(f"models: {name!r} is given twice (a model or an alias names one model only)")
            seen[name] = spec.model
    keys = [spec.key for spec in {spec.model: spec for spec in specs}.values()]
    if len(set(keys)) != len(keys):
        problems.append("models: two models differ only in characters other than letters, digits, '.', '_', '-'")
    return specs, problems



def default_run_dir() -> Path:
    """``$XDG_RUNTIME_DIR/rerankctl`` for a user session; for root ``/run/rerankctl`` (where the systemd unit
    runs the server, so ``status``, ``logs`` and ``stop`` find it); else a per-user state folder."""
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg and Path(xdg).is_dir():
        return Path(xdg) / "rerankctl"
    if os.geteuid() == 0 and Path("/run").is_dir():
        return Path("/run/rerankctl")
    try:
        return Path.home() / ".local" / "state" / "rerankctl" / "run"
    except RuntimeError:  # no home (a service's dynamic user): a private folder of this uid
        import tempfile

        return Path(tempfile.gettempdir()) / f"rerankctl-{os.geteuid()}"


class SettingsError(ValueError):
    """Every bad setting at once: ``problems`` are lines ``name: what is wrong`` (a rule across settings
    is its own sentence)."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


# Why ./.env was not read, when it was not (the CLI says so in one line); None when it was read or absent.
ENV_FILE_IGNORED: Optional[str] = None


def readable_env_file() -> Optional[Path]:
    """``./.env``, unless root would read a file that another user could have written: root runs rerankctl
    from folders it does not own (a service's state directory, a user's checkout), and a ``.env`` there
    could point root's commands at another run dir or model. Root reads one only when root owns it and
    neither its group nor others can write it."""
    global ENV_FILE_IGNORED
    ENV_FILE_IGNORED = None
    path = Path(ENV_FILE)
    if os.geteuid() == 0:
        try:
            st = os.stat(path)
        except OSError:
            return None
        if st.st_uid != 0 or st.st_mode & 0o022:
            ENV_FILE_IGNORED = (f"{path.resolve()} was not read: as root, rerankctl reads a .env only when root owns"
                                " it and neither its group nor others can write it")
            return None
    return path


def _problem(error: dict) -> str:
    """One pydantic error as ``name: what is wrong (got value)``; a secret's value is never repeated."""
    name = ".".join(str(part) for part in error.get("loc", ())) or "settings"
    message = error.get("msg", "invalid")
    if name == "api_key" or "input" not in error:
        return f"{name}: {message}"
    return f"{name}: {message} (got {error['input']!r})"


class Settings(BaseSettings):
    """All of rerankctl's settings. Each field is documented in ``env.example``."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, case_sensitive=False, env_file=ENV_FILE,
                                      env_file_encoding="utf-8", extra="ignore", protected_namespaces=(),
                                      validate_default=True)

    # --- model ---------------------------------------------------------------------------------------
    model: str = Field(DEFAULT_MODEL, description="Repo id, name under models_dir, or path to a model folder.")
    revision: Optional[str] = Field(None, description="Hub revision (branch, tag or commit) to download.")
    models_dir: Path = Field(Path("models"), description="Where downloaded and converted models live.")
    precision: Precision = Field("auto", description="Which converted variant serve loads; auto: the one `convert --precision auto` chose (fp32 until it has run).")
    auto_min_speedup: float = Field(1.05, ge=0.0, description="auto serves a reduced precision that passed the fidelity check only when it is at least this many times fp32's speed (below 1: also when slower, e.g. for INT8's smaller memory).")
    model_format: Literal["openvino", "onnx"] = Field("openvino", description="Which converted format serve loads.")
    model_aliases: str = Field("", description="Other names a request's \"model\" may give for the served model, comma-separated (e.g. the Cohere model a client hard-codes); any other name gets 404.")
    models: str = Field("", description="Several models in one server, comma-separated, each supervised on its own (its own workers, canary and restart budget); the first is the default for requests that name none. Each is a model as RERANKER_MODEL takes it, then ;workers=N ;threads=N ;precision=P ;aliases=a|b if it differs from the server's. E.g. DiTy/cross-encoder-russian-msmarco;workers=2, BAAI/bge-reranker-v2-m3;precision=int8;aliases=rerank-multilingual. Empty: RERANKER_MODEL alone.")

    # --- network -------------------------------------------------------------------------------------
    host: str = Field("127.0.0.1", description="Address of the API.")
    port: int = Field(8080, ge=1, le=65535, description="Port of the API (rerank routes).")
    health_port: int = Field(8081, ge=1, le=65535, description="Port of /health, /live, /ready, /metrics.")
    api_key: Optional[SecretStr] = Field(None, description="If set, API routes need 'Authorization: Bearer <key>'.")
    api_port_ops: Literal["auto", "open", "key", "off"] = Field("auto", description="/health, /ready, /live and /metrics on the API port too: auto = with the API key when one is set, else open; key = only with the API key; off = on the health port only. Without the key, /health there says the state, not the detail.")

    # --- state ---------------------------------------------------------------------------------------
    run_dir: Path = Field(default_factory=default_run_dir, description="Lock, pidfile, logs, MOSEC sockets.")

    # --- inference -----------------------------------------------------------------------------------
    workers: int = Field(1, ge=1, le=64, description="Inference worker processes.")
    threads: int = Field(0, ge=0, le=256, description="OpenVINO threads per worker; 0 = cores / workers.")
    pin_threads: bool = Field(False, description="Let OpenVINO pin threads to cores (off: workers must not share a core).")
    max_batch_requests: int = Field(32, ge=1, le=1024, description="Requests the gate batches into one scoring call (one envelope to a free worker).")
    batch_wait_ms: int = Field(5, ge=0, le=1000, description="When a worker frees up with fewer requests waiting than it just answered, how long (ms) the gate waits for those clients to come back before it sends; 0 = send what waits at once.")
    token_budget: int = Field(1024, ge=64, description="Padded tokens per OpenVINO call (micro-batch size); a worker keeps buffers for the largest call it has run, so its memory grows with this (2048: ~60 MiB more on DiTy's width), while calls past ~1000 tokens are no faster (benchmarks/HISTORY.md).")
    attention_budget: int = Field(512 * 512, ge=0, description="Rows x padded length² per OpenVINO call (attention memory grows with the square of the length); 0 = no limit.")
    kernel_cache: int = Field(1024, ge=8, le=100_000, description="Per-shape kernels and executors OpenVINO keeps, entries in each of its two caches (its CPU plugin's and oneDNN's). Batching makes most calls a shape of their own: unbounded, varied traffic grows a worker by hundreds of MiB; far fewer entries compile again the shapes steady traffic repeats (benchmarks/shapes.py).")
    max_length: int = Field(0, ge=0, description="Truncate pairs to this many tokens; 0 = the model's maximum.")
    windows: int = Field(1, ge=1, le=64, description="Passages longer than the model's window: 1 = truncate; n > 1 = score up to n overlapping windows of the passage and keep the best score (a request can ask with \"windows\").")
    max_windows: int = Field(8, ge=1, le=64, description="The most windows per passage a request may ask for.")
    window_stride: int = Field(128, ge=0, description="Tokens each window shares with the one before (transformers' stride).")

    # --- conversion parity (FP32 must agree within 1e-4; reduced precisions within these) -------------
    parity_max_abs_diff: float = Field(0.25, gt=0, description="Max |score difference| allowed for fp16/int8 (catches a broken variant; the ranking limits below judge fidelity).")
    parity_min_spearman: float = Field(0.9, ge=-1, le=1, description="Min mean (over queries) Spearman for fp16/int8.")
    parity_min_top1: float = Field(0.8, ge=0, le=1, description="Min share of queries whose top-1 agrees (fp16/int8).")
    parity_min_ndcg: float = Field(0.95, ge=0, le=1, description="Min NDCG@10 of the variant's ranking against the reference's scores (fp16/int8).")

    # --- limits --------------------------------------------------------------------------------------
    max_documents: int = Field(1000, ge=1, description="Documents per request.")
    max_document_chars: int = Field(50_000, ge=1, description="Characters per document.")
    max_query_chars: int = Field(8192, ge=1, description="Characters per query (a query is paired with every document: its limit is lower).")
    max_body_bytes: int = Field(4 * 1024 * 1024, ge=1024, description="Request body size.")
    queue_capacity: int = Field(256, ge=2, description="Requests queued in MOSEC before 429.")
    request_timeout_s: float = Field(30.0, gt=0, description="Deadline of one request (408/504 past it).")

    # --- fair scheduling: the unit of work is text, not a request ----------------------------------------
    quiet_batch_ms: int = Field(1000, ge=0, le=60_000, description="While no short request has come for this long (ms), an envelope of a large request's chunks may hold this much work at the workers' measured speed instead of its share of the schedule budget: on fast precisions (bf16, INT8, AMX) whole RAG requests are scored together (INT8: ~5 % more pairs/s, benchmarks/HISTORY.md). A short request that comes then waits for at most this much work. 0 = always the budget's share.")
    split_bytes: int = Field(4096, ge=0, description="Request bodies larger than this are split by the gate into chunks that interleave with other requests; 0 = never.")
    chunk_chars: int = Field(3000, ge=100, description="Characters of query + passage text per chunk of a split request.")
    schedule_budget_chars: int = Field(0, ge=0, description="Characters of work outstanding in MOSEC at once; 0 = 1.5 chunks per worker.")

    # --- the front door: admission and connection deadlines ---------------------------------------------
    max_in_flight: int = Field(0, ge=0, description="Requests admitted at once, beyond that 429; 0 = queue_capacity - 1 (one slot stays free for the canary).")
    max_buffered_bytes: int = Field(256 * 1024 * 1024, ge=1024, description="Request bodies held in memory at once, beyond that 429.")
    max_connections: int = Field(1024, ge=8, description="Open client connections on the API port; when full, the longest idle one is closed for a new one, else 429 and close. The last 32 are kept for loopback clients (the canary, a local balancer).")
    max_connections_per_peer: int = Field(256, ge=1, description="Open API connections from one address other than loopback.")
    header_timeout_s: float = Field(10.0, gt=0, description="A new connection must send its request headers within this, else 408 and close.")
    body_timeout_s: float = Field(30.0, gt=0, description="Deadline for reading a request body, else 408 and close.")
    keepalive_timeout_s: float = Field(15.0, gt=0, description="An idle keep-alive connection is closed after this.")
    send_timeout_s: float = Field(10.0, gt=0, description="A client that reads nothing of its answer for this long is cut (nginx's send_timeout).")

    # --- supervision ---------------------------------------------------------------------------------
    probe_interval_s: float = Field(3.0, gt=0, description="Seconds between watchdog canary requests.")
    probe_timeout_s: float = Field(5.0, gt=0, description="Deadline of one canary request.")
    probe_failures: int = Field(2, ge=1, description="Consecutive failed probes before remediation.")
    worker_hang_s: float = Field(30.0, gt=0, description="A worker inside a forward pass with no progress this long is hung.")
    respawn_timeout_s: float = Field(30.0, gt=0, description="A killed worker must be replaced (heartbeat ready) within this, else MOSEC is restarted.")
    start_attempts: int = Field(2, ge=1, description="Tries to boot MOSEC before giving up, if it was never healthy.")
    startup_timeout_s: float = Field(300.0, gt=0, description="Time MOSEC has to answer its first probe.")
    restart_budget: int = Field(5, ge=0, description="Restarts allowed within restart_window_s before giving up.")
    restart_window_s: float = Field(600.0, gt=0, description="Window of the restart budget.")
    stop_timeout_s: float = Field(20.0, gt=0, description="Drain deadline on stop before SIGKILL.")
    log_max_bytes: int = Field(10 * 1024 * 1024, ge=1024, description="Rotate the daemon log at this size.")
    log_backups: int = Field(3, ge=0, description="Rotated daemon logs kept (0: none; the log starts over at its size).")

    log_format: Literal["text", "json"] = Field("text", description="The server's log lines: text, or one JSON object a line (journald and Loki friendly). Lines written for a request carry its X-Request-Id either way.")
    access_log: bool = Field(True, description="One log line per API request: method, route, status, milliseconds and body bytes, with its request id.")
    debug: bool = Field(False, description="Show tracebacks and debug logs.")

    _worker_subdir: str = PrivateAttr("")  # a model's own heartbeat folder when the server has several

    def __init__(self, **given: Any) -> None:
        """Each setting from ``given`` (unknown names are ignored, as in a pidfile of an older version),
        else the environment, else ``./.env``, else its default. Raises ``SettingsError`` with every
        problem found."""
        try:
            super().__init__(**given)
        except ValidationError as exc:
            raise SettingsError([_problem(e) for e in exc.errors()]) from None
        problems = self._rules()
        if problems:
            raise SettingsError(problems)

    @classmethod
    def settings_customise_sources(cls, settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource,
                                   env_settings: PydanticBaseSettingsSource,
                                   dotenv_settings: PydanticBaseSettingsSource,
                                   file_secret_settings: PydanticBaseSettingsSource,
                                   ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Arguments over the environment over ``./.env`` (only one root may trust); no secrets folder."""
        return init_settings, env_settings, DotEnvSettingsSource(settings_cls, env_file=readable_env_file())

    @field_validator("models_dir", "run_dir", mode="after")
    @classmethod
    def _absolute(cls, value: Path) -> Path:
        """Absolute from where the command ran: the daemon and MOSEC's processes run from elsewhere."""
        return Path(os.path.abspath(os.path.expanduser(os.fspath(value))))

    def _rules(self) -> list[str]:
        out = []
        if self.port == self.health_port:
            out.append(f"port and health_port are both {self.port}; give them different ports")
        if self.api_port_ops == "key" and not self.api_key:
            out.append("api_port_ops=key needs an API key: set RERANKER_API_KEY, or choose open or off")
        if self.api_key is not None and not self.api_key.get_secret_value().strip():
            out.append("api_key is set but empty: set RERANKER_API_KEY to a key, or unset it to serve without one")
        elif self.api_key and self.api_key.get_secret_value().strip().lower() in PLACEHOLDER_KEYS:
            out.append("api_key is a placeholder, not a key: set RERANKER_API_KEY to a secret of your own"
                       " (e.g. from: python3 -c 'import secrets; print(secrets.token_urlsafe(32))')")
        out += parse_model_specs(self.models)[1]
        return out

    def model_specs(self) -> list[ModelSpec]:
        """The served models, the default first: ``models`` when given, else ``model`` alone."""
        specs = parse_model_specs(self.models)[0]
        return specs or [ModelSpec(self.model)]

    @property
    def several_models(self) -> bool:
        return len(self.model_specs()) > 1

    def for_model(self, spec: ModelSpec, first: bool = False) -> "Settings":
        """One model's settings in a server of several: the model, its precision, workers and threads, its
        aliases (the default model's also ``model_aliases``), and its own folder of heartbeats.

        Threads follow each model's own rule (``cores / its workers``), as in a server of its own: a model may use
        every core while the others idle, and the kernel shares the cores when several are busy. Splitting the
        cores instead isolates the models better but makes each slower whenever the others idle: the measured
        trade-off is in the README ("Several models in one server"). ``;threads=N`` sets a model's."""
        if not self.several_models:
            return self
        aliases = (*spec.aliases, *(self.served_models if first else ()))
        out = self.replace(model=spec.model, precision=spec.precision or self.precision,
                           workers=spec.workers or self.workers, model_aliases=",".join(dict.fromkeys(aliases)),
                           threads=spec.threads or self.threads, models="")
        out._worker_subdir = spec.key
        return out

    @property
    def served_models(self) -> tuple[str, ...]:
        """The aliases of the served model, as a request's ``model`` may give them (the model's own name is the
        supervisor's to add: it comes from what is served)."""
        return tuple(dict.fromkeys(a.strip() for a in self.model_aliases.split(",") if a.strip()))

    @property
    def ops_need_key(self) -> bool:
        """Whether /health, /ready, /live and /metrics on the API port ask for the API key."""
        return self.api_port_ops == "key" or (self.api_port_ops == "auto" and bool(self.api_key))

    @classmethod
    def fields(cls) -> dict[str, Any]:
        """Name → pydantic ``FieldInfo`` (default, default_factory, description), in declaration order."""
        return dict(cls.model_fields)

    def values(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in type(self).model_fields}

    def as_json(self, exclude: tuple[str, ...] = ()) -> dict[str, Any]:
        """Every setting as JSON values (paths as text, a secret as stars), but those in ``exclude``."""
        out: dict[str, Any] = {}
        for name, value in self.values().items():
            if name in exclude:
                continue
            out[name] = str(value) if isinstance(value, (Path, SecretStr)) else value
        return out

    def replace(self, **update: Any) -> "Settings":
        """A copy with ``update`` applied, checked like any other settings."""
        return Settings(**{**self.values(), **update})

    # --- derived paths -------------------------------------------------------------------------------
    @property
    def lock_path(self) -> Path:
        return self.run_dir / "rerankctl.lock"

    @property
    def pidfile_path(self) -> Path:
        return self.run_dir / "rerankctl.pid.json"

    @property
    def state_path(self) -> Path:
        """Live state the supervisor publishes (workers, probes, restarts) for ``status``."""
        return self.run_dir / "state.json"

    @property
    def log_path(self) -> Path:
        return self.run_dir / "rerankctl.log"

    @property
    def mosec_dir(self) -> Path:
        return self.run_dir / "mosec"

    @property
    def worker_dir(self) -> Path:
        """Heartbeats and counters that MOSEC workers write, one file each (a folder per model when the server
        has several)."""
        return self.run_dir / "workers" / self._worker_subdir if self._worker_subdir else self.run_dir / "workers"

    def effective_max_in_flight(self) -> int:
        """Never more than MOSEC can queue, less one place for the canary: MOSEC itself never says 429."""
        room = max(1, self.queue_capacity - 1)
        return min(self.max_in_flight, room) if self.max_in_flight else room

    def effective_schedule_budget(self) -> int:
        return self.schedule_budget_chars or int(self.chunk_chars * 1.5 * 2 * self.workers)

    def effective_threads(self) -> int:
        if self.threads:
            return self.threads
        return max(1, (os.cpu_count() or 1) // self.workers)


def load_settings(**overrides: Any) -> Settings:
    """Settings from env / .env, with the options the user actually gave (not None) on top."""
    given = {k: v for k, v in overrides.items() if v is not None}
    return Settings(**given)


def render_env_example() -> str:
    """``env.example``: every setting, its description and default, ready to uncomment."""
    lines = [
        "# rerankctl settings. Copy to .env (or /etc/rerankctl/env for systemd) and uncomment what you change.",
        "# Command-line options override these; these override the defaults shown.",
        "",
    ]
    for name, field in Settings.fields().items():
        default = field.default
        if field.default_factory is not None:
            default = "$XDG_RUNTIME_DIR/rerankctl, else /run/rerankctl for root, else ~/.local/state/rerankctl/run"
        if default is None:
            default = ""
        if isinstance(default, bool):
            default = "true" if default else "false"
        lines.append(f"# {field.description}")
        lines.append(f"# RERANKER_{name.upper()}={default}")
        lines.append("")
    lines += [
        "# Hugging Face: a token for gated or private models (never printed), and the hub's address.",
        "# HF_TOKEN=",
        "# HF_ENDPOINT=",
        "",
    ]
    return "\n".join(lines)
