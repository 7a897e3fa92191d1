"""Typed hub configuration (pydantic-settings, env prefix ``FLYWHEEL_HUB_``), never built at import time."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from fleet.errors import InvalidInput

SQLITE_MEMORY_MIB = 16  # default soft limit on SQLite's memory per worker (see fleet.hub.db.make_engine)

# Defaults that only a dev hub may run with; a production hub refuses to start on any of them.
DEV_FLEET_SECRET = "dev-fleet-secret"
DEV_ADMIN_TOKEN = "dev-admin-token"
DEV_URL_SECRET = "dev-url-secret"
DEV_WEBHOOK_SECRET = "dev-webhook-secret"
_MIN_SECRET_LEN = 16
DEV_WARNING = ("DEV MODE (FLYWHEEL_HUB_DEV=1 / --dev): this hub accepts the built-in secrets, among them the admin "
               "token 'dev-admin-token' and the fleet secret 'dev-fleet-secret', so anyone who can reach it is an "
               "admin and can enroll devices. Never expose it beyond this machine; never use it in production.")


class HubSettings(BaseSettings):
    """Everything the hub reads from its environment. ``FLYWHEEL_HUB_DATABASE_URL`` picks the database.

    Enrollment: the fleet secret enrolls only device ids not yet enrolled, optionally only those on
    ``enrollment_allow``, or none with ``enrollment_require_token`` (per-device tokens from an admin);
    refused attempts are audited and rate-limited per address (``enroll_*``); see fleet.hub.enrollment.
    Field metrics: ``heartbeat_*`` bound how fast counters may rise; ``rollback_*`` state what evidence,
    from how many devices, rolls a candidate back (fleet.hub.evidence). Bodies: ``max_*`` sizes,
    ``max_json_depth``, ``body_timeout_s``/``model_body_timeout_s`` and ``max_image_pixels`` (fleet.hub.bodies,
    fleet.hub.images). Labels: ``consensus_*`` are the hold rules of fleet.consensus, applied by the hub to every
    answer from any source (fleet.hub.labels).
    """

    model_config = SettingsConfigDict(env_prefix="FLYWHEEL_HUB_", extra="ignore", validate_default=True)

    dev: bool = Field(False, description="Dev mode: allow the built-in default secrets.")
    data_dir: Path = Field(Path("hub-data"), description="Folder for the SQLite file and the blob store.")
    database_url: str | None = Field(None, description="SQLAlchemy URL; default: SQLite file in data_dir.")
    blob_dir: Path | None = Field(None, description="Blob store folder; default: data_dir/blobs.")
    blob_store: Literal["file", "s3"] = Field("file", description="Where blobs, models and snapshots live: a "
                                              "folder (blob_dir) or an S3-compatible bucket (s3_*).")
    s3_bucket: str | None = Field(None, description="The bucket, with blob_store=s3 (it must exist).")
    s3_prefix: str = Field("blobs/", description="Key prefix in the bucket (ends with '/').")
    s3_endpoint_url: str | None = Field(None, description="The S3 endpoint (MinIO, Ceph, moto); default: AWS. "
                                        "Credentials: boto3's chain (AWS_ACCESS_KEY_ID, ...).")
    s3_region: str | None = Field(None, description="The bucket's region.")
    public_url: str | None = Field(None, description="Base URL annotators reach the hub at (image links).")

    fleet_secret: SecretStr = SecretStr(DEV_FLEET_SECRET)
    admin_token: SecretStr = SecretStr(DEV_ADMIN_TOKEN)
    url_secret: SecretStr = SecretStr(DEV_URL_SECRET)
    webhook_secret: SecretStr = SecretStr(DEV_WEBHOOK_SECRET)
    signing_public_key: str | None = Field(None, description="base64 of the fleet's raw ed25519 public key.")
    # enrollment (see fleet.hub.enrollment): the fleet secret only ever enrolls a device id not yet enrolled
    enrollment_allow: list[str] = Field(default_factory=list, description="Device-id patterns (fnmatch, e.g. "
                                        "[\"cam-*\"]; JSON in the environment) the fleet secret may enroll; "
                                        "empty: any new id. Others need an admin's enrollment token.")
    enrollment_require_token: bool = Field(False, description="Enroll only with per-device enrollment tokens "
                                           "from an admin; the fleet secret alone enrolls nothing.")
    enrollment_token_ttl_s: float = Field(7 * 24 * 3600.0, gt=0, description="Life of an enrollment token.")
    enroll_max_failures: int = Field(10, ge=1, description="Refused enrollments from one address within the "
                                     "window before it gets 429 until the window moves on.")
    enroll_failure_window_s: float = Field(300.0, gt=0)
    signing_public_key_file: Path | None = None

    max_image_bytes: int = Field(4 * 1024 * 1024, ge=1024)
    fleet_upload_rate_per_min: float = Field(0.0, ge=0, description="Cases per minute the whole fleet may upload "
                                             "(every worker draws on one bucket, fleet.hub.quota); over it the hub "
                                             "answers 429 with Retry-After. 0: no fleet cap.")
    fleet_upload_burst: float = Field(100.0, ge=1, description="The fleet bucket's capacity, in cases.")
    max_image_side: int = Field(4096, ge=8)
    max_image_pixels: int = Field(2048 * 2048, ge=64, description="Pixels (width x height) an uploaded image "
                                  "may decode to; its pixel data is inflated in bounded steps and must fit.")
    max_model_bytes: int = Field(512 * 1024 * 1024, ge=1024)
    max_bank_bytes: int = Field(64 * 1024 * 1024, ge=1024, description="Body limit of PUT "
                                "/v1/models/{version}/novelty-bank (devices download banks up to 64 MiB).")
    max_json_bytes: int = Field(4 * 1024 * 1024, ge=1024)
    max_json_depth: int = Field(64, ge=2, le=200, description="How deeply any JSON body or part may nest arrays "
                                "and objects (checked before parsing; deeper is a 400).")
    body_timeout_s: float = Field(60.0, gt=0, description="A request body must arrive whole within this many "
                                  "seconds, or the hub answers 408 and closes the connection.")
    model_body_timeout_s: float = Field(900.0, gt=0, description="The same deadline for model uploads.")
    max_batch_cases: int = Field(64, ge=1, le=1000, description="Cases one POST /v1/cases/batch may carry.")
    max_batch_bytes: int = Field(32 * 1024 * 1024, ge=4096, description="Body limit of POST /v1/cases/batch.")
    image_url_ttl_s: float = Field(7 * 24 * 3600.0, gt=0)
    token_cache_ttl_s: float = Field(2.0, ge=0, description="How long a worker trusts a cached token lookup.")
    metrics_yields_max_age_s: float = Field(60.0, ge=0, description="How old /metrics' per-trigger yields may be: "
                                            "a worker counts them again (one scan of the campaign cases) at most "
                                            "this often, and says their age (0: every scrape). GET /v1/yields, "
                                            "the CLI, the dashboard and auto budgets always count afresh.")
    blob_fsync: bool = Field(False, description="fsync each blob before it becomes visible.")
    migrate_on_start: bool = True
    db_pool_size: int = Field(20, ge=1)
    threads: int = Field(40, ge=1, le=1024, description="Threads per worker for blocking work (database, blob "
                         "store, image checks): requests beyond it wait for one. The S3 client keeps as many "
                         "connections, so no thread waits on the connection pool or drops its connection.")
    malloc_arenas: int = Field(2, ge=0, le=64, description="glibc malloc arenas of a worker process (0: glibc's "
                               "default, 8 per core); few keep a threaded worker's memory from creeping up.")
    sqlite_memory_mib: int = Field(SQLITE_MEMORY_MIB, ge=1, description="Soft limit on the memory SQLite holds "
                                   "in a worker, page caches of all pooled connections together "
                                   "(PRAGMA soft_heap_limit).")

    rollback_margin: float = Field(0.05, ge=0, le=1, description="Canary disagreement above incumbent's + this.")
    rollback_alpha: float = Field(0.01, gt=0, lt=1, description="Significance of the one-sided two-proportion "
                                  "z-test a field-disagreement rollback needs (fleet.hub.evidence).")
    rollback_min_compared: int = Field(200, ge=1, description="Human-compared frames needed on each side.")
    rollback_health_failures: int = Field(3, ge=1, description="Health failures that roll a canary back.")
    rollback_min_devices: int = Field(2, ge=1, description="Devices the evidence for an automatic rollback must "
                                      "come from (fewer only when the canary is smaller); see fleet.hub.evidence.")
    rollback_min_device_compared: int = Field(20, ge=1, description="Human-compared frames a device needs for "
                                              "its own disagreement to count as evidence.")
    rollback_shift_margin: float = Field(0.25, ge=0, le=1, description="A canary's prediction histogram may "
                                         "differ from the incumbent's by this total variation before a significant "
                                         "shift rolls it back (fleet.hub.evidence, rule 5).")
    rollback_shadow_margin: float = Field(0.10, ge=0, le=1, description="Shadow disagreement with the incumbent "
                                          "above the offline bound + this rolls a canary back, with no human "
                                          "(fleet.hub.evidence, rule 4).")
    rollback_shadow_bound: float | None = Field(None, gt=0, le=1, description="The shadow-disagreement bound for "
                                                "models whose manifests carry no test accuracy (detectors); unset: "
                                                "no shadow rule for them.")
    promote_hold_s: float = Field(600.0, gt=0, description="How long a promotion rolls out to the whole fleet "
                                  "(or, as an admin override, stays watched) before it completes.")
    heartbeat_max_rate_per_s: float = Field(100_000.0, gt=0, description="Fastest a heartbeat counter may rise, "
                                            "per second since the device's last heartbeat (plus the grace).")
    heartbeat_rate_grace_s: float = Field(60.0, ge=0, description="Slack added to that time (clock skew, a "
                                          "first heartbeat after a long run offline is measured from the last).")
    selection_pool_factor: int = Field(5, ge=1, description="uncertainty+diversity looks at budget x this.")
    duplicate_cosine: float = Field(0.02, ge=0, le=2, description="Cosine distance under which two are dups.")
    selection_space: Literal["active", "capture"] = Field(
        "active", description="Whose scores and embeddings selection uses: the active model's (cases it has "
        "not re-scored come last; fleet.hub.rescore), or each case's capturing model's, mixed (the behaviour "
        "before re-scoring, kept for comparison).")
    similarity_search: Literal["auto", "faiss", "numpy"] = Field(
        "auto", description="Nearest-neighbour search for selection's dedup and coverage: FAISS (exact inner product "
        "on unit vectors; 'auto' when faiss-cpu is installed) or numpy (fleet.hub.selection.CosineIndex).")
    rescore_threads: int = Field(1, ge=1, le=64, description="onnxruntime threads when re-scoring the pool with "
                                 "the active model (fleet.hub.rescore).")
    max_selection_budget: int = Field(5000, ge=1)
    # label consensus (fleet.consensus): the hold rules every label from any source goes through
    consensus_min_agreement: float = Field(0.6, ge=0.0, le=1.0)
    consensus_min_annotator_accuracy: float = Field(0.6, ge=0.0, le=1.0)
    consensus_min_gold_answers: int = Field(3, ge=1)

    @field_validator("s3_prefix")
    @classmethod
    def _prefix(cls, v: str) -> str:
        if v and not v.endswith("/"):
            raise ValueError(f"s3_prefix must end with '/' (or be empty); received {v!r}")
        return v

    @field_validator("s3_endpoint_url")
    @classmethod
    def _endpoint(cls, v: str | None) -> str | None:
        if v is not None and not v.startswith(("http://", "https://")):
            raise ValueError(f"s3_endpoint_url must be an http:// or https:// URL like http://127.0.0.1:9000; "
                             f"received {v!r}")
        return v

    @field_validator("database_url")
    @classmethod
    def _url(cls, v: str | None) -> str | None:
        if v is not None and "://" not in v:
            raise ValueError(f"database_url must be a SQLAlchemy URL like sqlite:///path or "
                             f"postgresql+psycopg://user@host/db; received {v!r}")
        return v

    # -- derived values ------------------------------------------------------------------------

    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{(self.data_dir / 'hub.db').resolve()}"

    def resolved_blob_dir(self) -> Path:
        return self.blob_dir or self.data_dir / "blobs"

    def blob_store_where(self) -> str:
        """Where the blobs are, for logs and errors."""
        if self.blob_store == "s3":
            return f"s3://{self.s3_bucket}/{self.s3_prefix} at {self.s3_endpoint_url or 'AWS'}"
        return str(self.resolved_blob_dir())

    def public_key(self) -> str | None:
        """The fleet's public key (base64 raw ed25519), from the setting or its file."""
        if self.signing_public_key:
            return self.signing_public_key.strip()
        if self.signing_public_key_file is not None:
            if not self.signing_public_key_file.is_file():
                raise InvalidInput(f"signing_public_key_file {self.signing_public_key_file} does not exist")
            return self.signing_public_key_file.read_text().strip()
        return None

    def check(self) -> None:
        """Refuse to run outside dev mode with a default, empty or short secret, or without a key."""
        if self.blob_store == "s3" and not self.s3_bucket:
            raise InvalidInput("FLYWHEEL_HUB_BLOB_STORE=s3 needs FLYWHEEL_HUB_S3_BUCKET (an existing bucket)")
        if self.dev:
            return
        problems = []
        defaults = {
            "fleet_secret": DEV_FLEET_SECRET, "admin_token": DEV_ADMIN_TOKEN,
            "url_secret": DEV_URL_SECRET, "webhook_secret": DEV_WEBHOOK_SECRET,
        }
        for name, default in defaults.items():
            value = getattr(self, name).get_secret_value()
            if value == default or len(value) < _MIN_SECRET_LEN:
                problems.append(f"FLYWHEEL_HUB_{name.upper()} is the dev default or shorter than "
                                f"{_MIN_SECRET_LEN} characters")
        if self.public_key() is None:
            problems.append("no fleet signing key: set FLYWHEEL_HUB_SIGNING_PUBLIC_KEY or _FILE")
        if problems:
            raise InvalidInput("refusing to start outside dev mode (`serve --dev` or FLYWHEEL_HUB_DEV=1 allows it): "
                               + "; ".join(problems))
        from fleet.signing import key_id

        key_id(self.public_key() or "")  # validates the key's encoding
