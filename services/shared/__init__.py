"""What every hookwire service shares: settings, contracts, clients, logging, metrics, HTTP.

Import from here, not from the private modules: this list is the supported surface.
"""

from . import _access_tokens as access_tokens
from . import _schema as tables
from ._audit import Actor, record_audit
from ._broker import EmbeddedBroker, free_port
from ._changes import ChangeFollower, ChangeNotifier, Entity
from ._contracts import (
    EVENT_TYPES,
    SCHEMA_VERSION,
    Attempt,
    Change,
    DeadLetter,
    Delivery,
    Event,
    EventType,
    Record,
    Topics,
    decode,
)
from ._credentials import InvalidToken, MissingToken, QueryKeyRefused, presented_token
from ._db import as_utc, check_ready, create_engine, head_revision, migrate
from ._errors import (
    BadRequest,
    ConfigurationError,
    Conflict,
    DependencyUnavailable,
    Forbidden,
    HookwireError,
    InvalidRecord,
    NotFound,
    PayloadTooLarge,
    Unauthorized,
    ValidationFailed,
)
from ._http import (
    READINESS_KEY,
    bound_port,
    build_app,
    error_response,
    json_response,
    parse_body,
    read_json,
    start_site,
)
from ._ids import new_id, utcnow
from ._kafka import (
    RETRY_TIERS,
    ensure_topics,
    make_consumer,
    make_producer,
    send_all,
    start_client,
    stop_client,
    topic_layout,
    topics_for,
)
from ._lifecycle import Service, run_until_signalled
from ._logging import configure_logging, get_logger
from ._metrics import Metrics
from ._netguard import is_public_address, refused_reason
from ._openapi import OpenApi
from ._permissions import PERMISSIONS, ROLES, effective_permissions, unknown_permissions
from ._settings import Settings, load_settings

__all__ = [
    "EVENT_TYPES",
    "PERMISSIONS",
    "READINESS_KEY",
    "RETRY_TIERS",
    "ROLES",
    "SCHEMA_VERSION",
    "Actor",
    "Attempt",
    "BadRequest",
    "Change",
    "ChangeFollower",
    "ChangeNotifier",
    "ConfigurationError",
    "Conflict",
    "DeadLetter",
    "Delivery",
    "DependencyUnavailable",
    "EmbeddedBroker",
    "Entity",
    "Event",
    "EventType",
    "Forbidden",
    "HookwireError",
    "InvalidRecord",
    "InvalidToken",
    "Metrics",
    "MissingToken",
    "NotFound",
    "OpenApi",
    "PayloadTooLarge",
    "QueryKeyRefused",
    "Record",
    "Service",
    "Settings",
    "Topics",
    "Unauthorized",
    "ValidationFailed",
    "access_tokens",
    "as_utc",
    "bound_port",
    "build_app",
    "check_ready",
    "configure_logging",
    "create_engine",
    "decode",
    "effective_permissions",
    "ensure_topics",
    "error_response",
    "free_port",
    "get_logger",
    "head_revision",
    "is_public_address",
    "json_response",
    "load_settings",
    "make_consumer",
    "make_producer",
    "migrate",
    "new_id",
    "parse_body",
    "presented_token",
    "read_json",
    "record_audit",
    "refused_reason",
    "run_until_signalled",
    "send_all",
    "start_client",
    "start_site",
    "stop_client",
    "tables",
    "topic_layout",
    "topics_for",
    "unknown_permissions",
    "utcnow",
]
