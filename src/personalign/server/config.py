"""Server settings, API keys and tenants.

With no key file the server is open and user ids are stored as given when the store accepts
them (the same users the Python API and CLI see in that store; other ids are escaped or hashed,
see :mod:`personalign.server.ids`). With a key file every request needs
``Authorization: Bearer <key>``; each key is bound to a tenant, and a tenant's user ``bob``
is stored as ``<tenant>.bob``. Tenant names contain no dot, so the first dot always
separates tenant from user and no two (tenant, user) pairs share a stored id: a key can
only ever name its own tenant's users.

Key file (JSON)::

    {"keys": [
        {"key": "sk-acme-1", "tenant": "acme"},
        {"key_sha256": "<hex digest of the key>", "tenant": "globex", "read_only": true}
    ]}
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydantic
from pydantic import BaseModel, ConfigDict, Field, model_validator

from personalign.errors import ValidationError
from personalign.server import ids
from personalign.types import USER_ID_MAX_LEN, validate_user_id

TENANT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,31}$")
TENANT_SEP = "."


def hash_key(key: str) -> str:
    """The SHA-256 hex digest under which a key is looked up (keys are never kept in plain text)."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


class ApiKey(BaseModel):
    """One API key (plain, or as its SHA-256 digest) and the tenant it acts for."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    key: str | None = Field(default=None, min_length=8)
    key_sha256: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$")
    tenant: str = Field(pattern=TENANT_RE.pattern)
    read_only: bool = False

    @model_validator(mode="after")
    def _one_key(self) -> ApiKey:
        if (self.key is None) == (self.key_sha256 is None):
            raise ValueError("give exactly one of key or key_sha256")
        return self

    @property
    def digest(self) -> str:
        return self.key_sha256 or hash_key(self.key or "")


class ServerConfig(BaseModel):
    """Everything the HTTP layer needs besides the Personalizer.

    ``max_batch=1`` turns batching off (one ``generate`` per request: the benchmark baseline).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    served_model: str = Field(default="personalign", min_length=1, max_length=256)
    max_batch: int = Field(default=16, ge=1, le=256)
    batch_wait_ms: float = Field(default=10.0, ge=0.0, le=1000.0)
    max_tokens_cap: int = Field(default=1024, ge=1, le=8192)
    default_max_tokens: int = Field(default=256, ge=1, le=8192)
    max_choices: int = Field(default=8, ge=1, le=64, description="the largest n a chat may ask for")
    max_pending: int = Field(
        default=256,
        ge=1,
        le=100_000,
        description="chats, completions and embeddings in flight before new ones get 429",
    )
    body_timeout_s: float = Field(
        default=30.0,
        gt=0.0,
        le=3600.0,
        description="seconds a request's body may take to arrive in full (else 408)",
    )
    keepalive_s: float = Field(
        default=15.0,
        gt=0.0,
        le=300.0,
        description="seconds of silence on a stream before a ': keep-alive' comment",
    )
    default_temperature: float = Field(
        default=1.0,
        ge=0.0,
        le=2.0,
        description="a chat's temperature when it sends none (OpenAI's is 1.0; 0 is greedy)",
    )
    max_body_bytes: int = Field(default=1_000_000, ge=1024, le=100_000_000)
    max_comparisons_per_request: int = Field(default=1000, ge=1)
    max_memories_per_request: int = Field(default=256, ge=1)
    api_keys: tuple[ApiKey, ...] = ()

    @model_validator(mode="after")
    def _consistent(self) -> ServerConfig:
        if self.default_max_tokens > self.max_tokens_cap:
            raise ValueError(
                f"default_max_tokens ({self.default_max_tokens}) exceeds max_tokens_cap ({self.max_tokens_cap})"
            )
        digests = [k.digest for k in self.api_keys]
        if len(set(digests)) != len(digests):
            raise ValueError("the same API key appears twice")
        return self

    @property
    def auth_required(self) -> bool:
        return bool(self.api_keys)

    def keys_by_digest(self) -> dict[str, ApiKey]:
        return {k.digest: k for k in self.api_keys}


def load_api_keys(path: str | Path) -> tuple[ApiKey, ...]:
    """Read and validate a key file (see the module docstring for its format)."""
    path = Path(path)
    fix = 'write {"keys": [{"key": "<at least 8 characters>", "tenant": "<letters, digits, _ or ->"}]}'
    try:
        payload: Any = json.loads(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise ValidationError(
            "--api-keys", f"cannot be read ({err.strerror})", "pass an existing JSON file", str(path)
        ) from None
    except json.JSONDecodeError as err:
        raise ValidationError(
            "--api-keys", f"is not valid JSON ({err.msg}, line {err.lineno})", fix, str(path)
        ) from None
    if not isinstance(payload, dict) or not isinstance(payload.get("keys"), list) or not payload["keys"]:
        raise ValidationError("--api-keys", "must be an object with a non-empty 'keys' list", fix, str(path))
    keys = []
    for index, item in enumerate(payload["keys"]):
        try:
            keys.append(ApiKey.model_validate(item))
        except pydantic.ValidationError as err:
            first = err.errors()[0]
            where = ".".join(str(p) for p in first.get("loc", ()))
            field = f"keys[{index}]" + (f".{where}" if where else "")
            raise ValidationError(field, first.get("msg", "is invalid"), fix) from None
    return tuple(keys)


@dataclass(frozen=True)
class Principal:
    """Who is calling: their tenant (``None`` on an open server) and whether they may write.

    A request's principal also remembers the ids it mapped (``names``), so responses and errors
    name users as the caller did, hashed ids included.
    """

    tenant: str | None
    read_only: bool = False
    names: dict[str, str] = field(default_factory=dict, compare=False, repr=False)

    @property
    def max_user_len(self) -> int:
        return (
            USER_ID_MAX_LEN if self.tenant is None else USER_ID_MAX_LEN - len(self.tenant) - len(TENANT_SEP)
        )

    def store_id(self, user: Any, field: str = "user") -> str:
        """The id under which this caller's ``user`` is stored (checked, mapped by :mod:`personalign.server.ids`; never another tenant's)."""
        ids.check_external_id(user, field)
        stored = ids.stored_form(user, self.max_user_len)
        full = stored if self.tenant is None else f"{self.tenant}{TENANT_SEP}{stored}"
        validate_user_id(full, field)  # always passes: the mapping only makes safe ids
        self.names[full] = user
        return full

    def external_id(self, store_id: str) -> str:
        """The id this caller knows a stored user by."""
        if store_id in self.names:
            return self.names[store_id]
        if self.tenant is not None:
            prefix = f"{self.tenant}{TENANT_SEP}"
            assert store_id.startswith(prefix), "a stored id outside the caller's tenant reached a response"
            store_id = store_id[len(prefix) :]
        return ids.external_form(store_id) or store_id

    def owns(self, store_id: str) -> bool:
        return self.tenant is None or store_id.startswith(f"{self.tenant}{TENANT_SEP}")
