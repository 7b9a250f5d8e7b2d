"""API keys and their policies: who may call, how much, and with which rights.

Two sources, both optional (no key at all = auth off, every caller gets the default
policy):

* ``LDM_API_KEYS=k1,k2``: plain keys, each with the default policy from the settings
  (``quota_*``, ``max_job_pixel_steps``, ``default_priority_high``).
* ``LDM_API_KEYS_FILE=keys.toml`` (or ``.json``): keys stored **hashed** (sha256 hex of
  the key, from ``ldm-serve hash-key``), each with a name and its own limits::

      [[keys]]
      name = "alice"
      sha256 = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
      requests_per_minute = 120          # job submissions; 0 = unlimited
      concurrent_jobs = 8                # queued + running
      pixel_steps_per_minute = 200000000 # sum of width*height*steps*n
      max_job_pixel_steps = 50000000     # one job
      priority_high = true               # may send priority: "high"
      admin = false                      # may read /metrics when LDM_METRICS_REQUIRE_ADMIN=true

  JSON has the same shape: ``{"keys": [{"name": "alice", "sha256": "...", ...}]}``. An
  omitted limit takes the default policy's value.

The id a job records as its owner is the first 16 hex digits of the key's sha256
(:func:`ldm_serve.settings.owner_of`), so both sources name owners the same way.
"""

from __future__ import annotations

import hashlib
import json
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ldm_serve.errors import ConfigError
from ldm_serve.settings import Settings

OWNER_ID_LEN = 16


def hash_key(api_key: str) -> str:
    """sha256 hex digest of a key: what the keys file stores."""
    return hashlib.sha256(api_key.encode()).hexdigest()


def new_key() -> str:
    """A fresh random key (URL-safe, 256 bits)."""
    return "ldm_" + secrets.token_urlsafe(32)


@dataclass(frozen=True)
class KeyPolicy:
    """Limits and rights of one key (or of anonymous callers). 0 means unlimited."""

    name: str
    requests_per_minute: int
    concurrent_jobs: int
    pixel_steps_per_minute: int
    max_job_pixel_steps: int
    priority_high: bool = False
    admin: bool = False


def default_policy(settings: Settings, name: str = "default") -> KeyPolicy:
    """The policy of anonymous callers and of keys given without their own limits."""
    return KeyPolicy(
        name=name,
        requests_per_minute=settings.quota_requests_per_minute,
        concurrent_jobs=settings.quota_concurrent_jobs,
        pixel_steps_per_minute=settings.quota_pixel_steps_per_minute,
        max_job_pixel_steps=settings.max_job_pixel_steps,
        priority_high=settings.default_priority_high,
    )


class _KeyEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=64)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    requests_per_minute: int | None = Field(default=None, ge=0)
    concurrent_jobs: int | None = Field(default=None, ge=0)
    pixel_steps_per_minute: int | None = Field(default=None, ge=0)
    max_job_pixel_steps: int | None = Field(default=None, ge=0)
    priority_high: bool | None = None
    admin: bool = False


class _KeysFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    keys: list[_KeyEntry] = Field(min_length=1)


@dataclass(frozen=True)
class Caller:
    """Who made a request: the job owner id (None when auth is off) and the policy that applies."""

    owner: str | None
    policy: KeyPolicy


class KeyRing:
    """Every accepted key, by sha256 hex digest, with its policy."""

    def __init__(self, policies: dict[str, KeyPolicy], default: KeyPolicy) -> None:
        self._by_hash = dict(policies)
        self.default = default

    @property
    def enabled(self) -> bool:
        """Whether requests need a key."""
        return bool(self._by_hash)

    def lookup(self, api_key: str) -> Caller | None:
        """The caller for a presented key, or None if the key is unknown."""
        digest = hash_key(api_key)
        policy = self._by_hash.get(digest)  # a lookup by digest leaks nothing about other keys' digests
        if policy is None:
            return None
        return Caller(owner=digest[:OWNER_ID_LEN], policy=policy)

    def anonymous(self) -> Caller:
        """The caller when auth is off."""
        return Caller(owner=None, policy=self.default)

    def __len__(self) -> int:
        return len(self._by_hash)


def load_keyring(settings: Settings) -> KeyRing:
    """Keys from ``settings.api_keys`` and ``settings.api_keys_file``.

    Raises:
        ConfigError: the file is missing, unreadable, malformed, or lists a hash twice.
    """
    default = default_policy(settings)
    policies: dict[str, KeyPolicy] = {hash_key(k): default for k in settings.api_key_set}
    if settings.api_keys_file is not None:
        for entry in _read_keys_file(Path(settings.api_keys_file)):
            if entry.sha256 in policies:
                raise ConfigError(f"api_keys_file: key {entry.name!r} is listed twice (or also in LDM_API_KEYS)")
            policies[entry.sha256] = KeyPolicy(
                name=entry.name,
                requests_per_minute=_or(entry.requests_per_minute, default.requests_per_minute),
                concurrent_jobs=_or(entry.concurrent_jobs, default.concurrent_jobs),
                pixel_steps_per_minute=_or(entry.pixel_steps_per_minute, default.pixel_steps_per_minute),
                max_job_pixel_steps=_or(entry.max_job_pixel_steps, default.max_job_pixel_steps),
                priority_high=default.priority_high if entry.priority_high is None else entry.priority_high,
                admin=entry.admin,
            )
    for policy in policies.values():
        if 0 < policy.pixel_steps_per_minute < policy.max_job_pixel_steps:
            raise ConfigError(
                f"api_keys_file: key {policy.name!r} has max_job_pixel_steps={policy.max_job_pixel_steps} above its"
                f" pixel_steps_per_minute={policy.pixel_steps_per_minute}: such a job could never be admitted"
            )
    return KeyRing(policies, default)


def _or(value: int | None, fallback: int) -> int:
    return fallback if value is None else value


def _read_keys_file(path: Path) -> list[_KeyEntry]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"api_keys_file: cannot read {path}: {exc}") from exc
    data: Any
    try:
        if path.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            try:
                import tomllib
            except ModuleNotFoundError:  # Python 3.10
                raise ConfigError("api_keys_file: TOML needs Python 3.11+; use a .json file") from None
            data = tomllib.loads(text)
    except ValueError as exc:  # json.JSONDecodeError and tomllib.TOMLDecodeError are ValueErrors
        raise ConfigError(f"api_keys_file: {path} is not valid {path.suffix.lstrip('.') or 'TOML'}: {exc}") from exc
    try:
        parsed = _KeysFile.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        raise ConfigError(f"api_keys_file: {path}: {where}: {err['msg']}") from exc
    seen: set[str] = set()
    for entry in parsed.keys:
        if entry.sha256 in seen:
            raise ConfigError(f"api_keys_file: key {entry.name!r} is listed twice")
        seen.add(entry.sha256)
    return parsed.keys
