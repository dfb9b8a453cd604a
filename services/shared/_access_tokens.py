"""Short-lived access tokens: signed JWTs any service verifies without calling auth.

The auth service signs with an Ed25519 private key and publishes the public half at
``GET /v1/keys`` (a JWK set); verifiers fetch it once. A key revoked after an access token
was issued is caught by the revocation set that ``changes`` records keep.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import Any

import jwt
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from jwt.algorithms import OKPAlgorithm

from ._credentials import InvalidToken
from ._errors import ConfigurationError

ISSUER = "hookwire"
ALGORITHM = "EdDSA"
# How far ahead of a verifier's clock the signer's may run: a token is refused as "not yet
# valid" (``iat``, ``nbf``) only past it. Expiry gets no such margin.
CLOCK_LEEWAY_SECONDS = 30
# What loading a PEM key raises for one this service cannot use: not a key (ValueError), an
# encrypted one (TypeError: no password given), a curve or cipher the library does not
# support (UnsupportedAlgorithm).
_UNLOADABLE = (ValueError, TypeError, UnsupportedAlgorithm)


@dataclass(frozen=True)
class AccessClaims:
    user_id: str
    token_id: str
    permissions: frozenset[str]
    teams: dict[str, str]
    expires_at: int
    # The key's allowed client ranges: its access tokens are held to them too.
    allowed_cidrs: tuple[str, ...] | None = None


def looks_like_access_token(token: str) -> bool:
    return token.startswith("eyJ") and token.count(".") == 2


def generate_private_key_pem() -> str:
    return (
        Ed25519PrivateKey.generate()
        .private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        .decode()
    )


def _unescaped(pem: str) -> str:
    if "\n" not in pem and "\\n" in pem:
        # One line with \n escapes, as an .env file holds it.
        return pem.replace("\\n", "\n")
    return pem


def load_private_key(pem: str) -> Ed25519PrivateKey:
    pem = _unescaped(pem)
    try:
        key = serialization.load_pem_private_key(pem.encode(), password=None)
    except _UNLOADABLE as exc:
        raise ConfigurationError(
            "HOOKWIRE_ACCESS_TOKEN_PRIVATE_KEY is not a PEM private key"
        ) from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigurationError("HOOKWIRE_ACCESS_TOKEN_PRIVATE_KEY must be an Ed25519 key")
    return key


_PEM_BLOCK = re.compile(r"-----BEGIN ([A-Z ]+)-----.+?-----END \1-----", re.DOTALL)


def load_previous_keys(pems: str) -> list[Ed25519PublicKey]:
    """The keys that signed access tokens before the current one: PEM blocks, private or
    public, one after another. Only their public halves are kept, to verify with."""
    blocks = [match.group(0) for match in _PEM_BLOCK.finditer(_unescaped(pems))]
    if not blocks:
        raise ConfigurationError("HOOKWIRE_ACCESS_TOKEN_PREVIOUS_KEYS holds no PEM key")
    keys = []
    for block in blocks:
        try:
            if "PRIVATE" in block.partition("\n")[0]:
                key: object = serialization.load_pem_private_key(block.encode(), password=None)
            else:
                key = serialization.load_pem_public_key(block.encode())
        except _UNLOADABLE as exc:
            raise ConfigurationError(
                "HOOKWIRE_ACCESS_TOKEN_PREVIOUS_KEYS holds a block that is not a PEM key"
            ) from exc
        if isinstance(key, Ed25519PrivateKey):
            key = key.public_key()
        if not isinstance(key, Ed25519PublicKey):
            raise ConfigurationError(
                "HOOKWIRE_ACCESS_TOKEN_PREVIOUS_KEYS must hold Ed25519 keys only"
            )
        keys.append(key)
    return keys


def key_id(public_key: Ed25519PublicKey) -> str:
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return raw.hex()[:16]


def jwk_set(*public_keys: Ed25519PublicKey) -> dict[str, Any]:
    """The keys access tokens may be verified with: the signing key's first."""
    jwks: list[dict[str, Any]] = []
    for public_key in public_keys:
        jwk: dict[str, Any] = OKPAlgorithm.to_jwk(public_key, as_dict=True)
        jwk.update({"kid": key_id(public_key), "alg": ALGORITHM, "use": "sig"})
        if all(other["kid"] != jwk["kid"] for other in jwks):
            jwks.append(jwk)
    return {"keys": jwks}


def public_keys_from_jwk_set(document: dict[str, Any]) -> dict[str, Ed25519PublicKey]:
    keys = {}
    for jwk in document.get("keys", []):
        key = OKPAlgorithm.from_jwk(jwk)
        if isinstance(key, Ed25519PublicKey):
            keys[str(jwk.get("kid"))] = key
    return keys


def issue(private_key: Ed25519PrivateKey, claims: dict[str, Any]) -> str:
    return jwt.encode(
        {**claims, "iss": ISSUER},
        private_key,
        algorithm=ALGORITHM,
        headers={"kid": key_id(private_key.public_key())},
    )


def unverified_key_id(token: str) -> str | None:
    try:
        kid = jwt.get_unverified_header(token).get("kid")
    except jwt.PyJWTError as exc:
        raise InvalidToken("access token is malformed", details={"reason": "malformed"}) from exc
    return str(kid) if kid is not None else None


def _expired() -> InvalidToken:
    return InvalidToken("access token has expired", details={"reason": "expired"})


def verify(public_key: Ed25519PublicKey, token: str) -> AccessClaims:
    try:
        claims = jwt.decode(
            token,
            public_key,
            algorithms=[ALGORITHM],
            issuer=ISSUER,
            options={"require": ["exp", "iat", "sub", "tid", "iss"]},
            # PyJWT's one leeway widens exp too: the expiry is checked again, strictly, below.
            leeway=CLOCK_LEEWAY_SECONDS,
        )
    except jwt.ExpiredSignatureError as exc:
        raise _expired() from exc
    except jwt.PyJWTError as exc:
        raise InvalidToken(
            f"access token is not valid: {exc}", details={"reason": "malformed"}
        ) from exc
    # PyJWT has read exp as an integer by now (int() of it passed).
    if int(claims["exp"]) <= time.time():
        raise _expired()
    return AccessClaims(
        user_id=str(claims["sub"]),
        token_id=str(claims["tid"]),
        permissions=frozenset(claims.get("perms", [])),
        teams=dict(claims.get("teams", {})),
        expires_at=int(claims["exp"]),
        allowed_cidrs=tuple(claims["cidrs"]) if claims.get("cidrs") else None,
    )
