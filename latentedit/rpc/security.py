"""Transport security and authentication for every service (README "Operations").

- TLS on every port, its certificate and key reloaded from their files on the first handshake
  after they change (cert-manager rotates them in place); mutual TLS when `require_client_cert`.
- Bearer tokens (`authorization: Bearer <token>`), each with scopes, checked by one server
  interceptor: no or unknown token -> UNAUTHENTICATED, a token without the RPC's scope ->
  PERMISSION_DENIED; both messages name the scope needed and never repeat the token. Health and
  reflection stay open for probes.
- The editor and the trainer call the generator and the scorer with their own service token
  and client certificate (`ClientSecurity.for_service`), never with their caller's.

Token definitions (`security.tokens_file`, read again when it changes, and LATENTEDIT_TOKENS
with the same lines separated by newlines or ';'): one `NAME SCOPES TOKEN` a line, SCOPES
comma-separated among `SCOPES`, TOKEN at least 16 characters; '#' starts a comment. `admin`
grants every scope.
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import ipaddress
import logging
import os
import secrets
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from latentedit.config import SecurityConfig

log = logging.getLogger(__name__)

SCOPES = ("generate", "score", "edit", "train", "admin")
ADMIN = "admin"
MIN_TOKEN_CHARS = 16
TOKENS_ENV = "LATENTEDIT_TOKENS"
SERVICE_TOKEN_ENV = "LATENTEDIT_SERVICE_TOKEN"
INSECURE_ENV = "LATENTEDIT_INSECURE"
# Client side (the CLI and `connect`).
TOKEN_ENV = "LATENTEDIT_TOKEN"
CA_ENV = "LATENTEDIT_CA"
CERT_ENV = "LATENTEDIT_CERT"
KEY_ENV = "LATENTEDIT_KEY"

# The scope each RPC needs. Listing and reading RPCs need their service's scope too: nothing of
# ours answers without a token, and reading jobs (which hold specs and artifacts) takes `train`.
SERVICE_SCOPES: dict[str, dict[str, str]] = {
    "latentedit.v1.GeneratorService": {"ListModels": "generate", "Sample": "generate", "Synthesize": "generate",
                                       "SynthesizeStream": "generate"},
    "latentedit.v1.ScorerService": {"ListHeads": "score", "Score": "score", "EmbedText": "score"},
    "latentedit.v1.TrainerService": {"StartJob": "train", "CancelJob": "train", "GetJob": "train", "ListJobs": "train",
                                     "WatchJob": "train"},
    "latentedit.v1.EditorService": {"ListEdits": "edit", "Edit": "edit", "Invert": "edit"},
}
METHOD_SCOPES = {f"/{service}/{method}": scope for service, methods in SERVICE_SCOPES.items() for method, scope in methods.items()}
# Probes and tooling: answered without a token.
OPEN_SERVICES = ("grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection", "grpc.reflection.v1.ServerReflection")
# What the editor's and the trainer's service token must grant.
DOWNSTREAM_SCOPES = ("generate", "score")


class SecurityConfigError(ValueError):
    """A security setting that cannot work; the message is one line and never holds a token."""


def check_service_scopes(full_name: str) -> None:
    """Every RPC a server registers must have a scope (a new RPC without one fails at start)."""
    from google.protobuf import descriptor_pool

    service = descriptor_pool.Default().FindServiceByName(full_name)
    missing = [m.name for m in service.methods if f"/{full_name}/{m.name}" not in METHOD_SCOPES]
    if missing:
        raise SecurityConfigError(f"{full_name}: no scope defined for {missing} in latentedit.rpc.security.SERVICE_SCOPES")


# ---------------------------------------------------------------------------------------------
# Tokens


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8")).digest()


@dataclass(frozen=True)
class Token:
    name: str
    scopes: frozenset[str]
    digest: bytes = field(repr=False)  # SHA-256 of the token: equal lengths for compare_digest

    def grants(self, scope: str) -> bool:
        return scope in self.scopes or ADMIN in self.scopes


def parse_tokens(text: str, where: str) -> list[Token]:
    """`NAME SCOPES TOKEN` lines (or ';'-separated entries); errors name the line, never the token."""
    tokens = []
    entries = [part for line in text.splitlines() for part in line.split(";")]
    for number, entry in enumerate(entries, 1):
        entry = entry.split("#", 1)[0].strip()
        if not entry:
            continue
        parts = entry.split()
        if len(parts) != 3:
            raise SecurityConfigError(f"{where}, entry {number}: expected 'NAME SCOPES TOKEN' (3 fields), got {len(parts)}")
        name, scope_text, token = parts
        scopes = frozenset(s for s in scope_text.split(",") if s)
        unknown = sorted(scopes - set(SCOPES))
        if unknown or not scopes:
            raise SecurityConfigError(f"{where}, token {name!r}: unknown scope(s) {unknown}; scopes: {', '.join(SCOPES)}")
        if len(token) < MIN_TOKEN_CHARS:
            raise SecurityConfigError(f"{where}, token {name!r}: a token needs at least {MIN_TOKEN_CHARS} characters")
        tokens.append(Token(name, scopes, _digest(token)))
    return tokens


class TokenSet:
    def __init__(self, tokens: Iterable[Token]) -> None:
        self.tokens = list(tokens)
        digests = [t.digest for t in self.tokens]
        if len(set(digests)) != len(digests):
            raise SecurityConfigError("config.security: the same token is defined twice (names: "
                                      f"{sorted(t.name for t in self.tokens if digests.count(t.digest) > 1)})")

    def find(self, presented: str) -> Token | None:
        """Constant time over every token: no early exit, equal-length digests."""
        digest = _digest(presented)
        found = None
        for token in self.tokens:
            if hmac.compare_digest(digest, token.digest):
                found = token
        return found


class TokenSource:
    """The accepted tokens: `tokens_file`, read again when it changes (mtime, size, inode), plus
    LATENTEDIT_TOKENS (read at start). A changed file that does not parse keeps the tokens in use."""

    def __init__(self, config: SecurityConfig) -> None:
        self.path = config.tokens_file
        self.env_text = os.environ.get(TOKENS_ENV, "")
        self.reloads = 0
        self._lock = threading.Lock()
        self._stamp = self._stamp_now()
        self._failed_stamp: tuple | None = None
        self.tokens = self._load()

    def _stamp_now(self) -> tuple | None:
        try:
            st = os.stat(self.path) if self.path else None
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino) if st else None

    def _load(self) -> TokenSet:
        tokens: list[Token] = []
        if self.path:
            try:
                text = Path(self.path).read_text()
            except OSError as exc:
                raise SecurityConfigError(f"config.security.tokens_file: cannot read {self.path}: {exc.strerror}") from None
            tokens += parse_tokens(text, f"tokens file {self.path}")
        if self.env_text:
            tokens += parse_tokens(self.env_text, TOKENS_ENV)
        if not tokens:
            raise SecurityConfigError(f"config.security: no bearer tokens defined: set security.tokens_file or {TOKENS_ENV} "
                                      "('NAME SCOPES TOKEN' lines), or `insecure: true` for a local plaintext set-up")
        return TokenSet(tokens)

    def current(self) -> TokenSet:
        stamp = self._stamp_now()
        if stamp is None or stamp in (self._stamp, self._failed_stamp):
            return self.tokens
        with self._lock:
            if stamp in (self._stamp, self._failed_stamp):
                return self.tokens
            try:
                self.tokens = self._load()
            except SecurityConfigError as exc:
                self._failed_stamp = stamp
                log.warning("the tokens file changed but cannot be used (keeping the tokens in use): %s", exc)
                return self.tokens
            self._stamp = stamp
            self.reloads += 1
        log.info("reloaded the tokens file %s: %d token(s)", self.path, len(self.tokens.tokens))
        return self.tokens


# ---------------------------------------------------------------------------------------------
# The server side


def _refusal(handler: grpc.RpcMethodHandler, code: grpc.StatusCode, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same shape as `handler` that refuses the call with `code`."""

    def refuse(_request: Any, context: grpc.ServicerContext) -> Any:
        context.abort(code, message)

    def refuse_stream(_request: Any, context: grpc.ServicerContext) -> Any:
        context.abort(code, message)
        yield  # pragma: no cover - never reached: abort raises

    if handler.unary_unary:
        return handler._replace(unary_unary=refuse)
    if handler.stream_unary:
        return handler._replace(stream_unary=refuse)
    if handler.unary_stream:
        return handler._replace(unary_stream=refuse_stream)
    return handler._replace(stream_stream=refuse_stream)


class AuthInterceptor(grpc.ServerInterceptor):
    """The one place tokens are checked: every RPC of ours needs a token with its scope."""

    def __init__(self, tokens: TokenSource) -> None:
        self.tokens = tokens

    def check(self, method: str, metadata: Iterable[tuple[str, Any]]) -> tuple[grpc.StatusCode, str] | None:
        """None when the call may go on, else the refusal's code and message."""
        service = method.lstrip("/").split("/", 1)[0]
        if service in OPEN_SERVICES:
            return None
        scope = METHOD_SCOPES.get(method)
        if scope is None:
            return grpc.StatusCode.PERMISSION_DENIED, f"{method} has no scope defined; refused"
        needs = f"{method} needs a bearer token with scope '{scope}'"
        values = [v for k, v in metadata if k == "authorization"]
        if not values:
            return grpc.StatusCode.UNAUTHENTICATED, f"no bearer token: {needs} (metadata 'authorization: Bearer <token>')"
        value = values[0] if isinstance(values[0], str) else values[0].decode("utf-8", "replace")
        kind, _, presented = value.partition(" ")
        if kind.lower() != "bearer" or not presented.strip():
            return grpc.StatusCode.UNAUTHENTICATED, f"the authorization metadata is not 'Bearer <token>': {needs}"
        token = self.tokens.current().find(presented.strip())
        if token is None:
            return grpc.StatusCode.UNAUTHENTICATED, f"the bearer token is not valid: {needs}"
        if not token.grants(scope):
            return (grpc.StatusCode.PERMISSION_DENIED,
                    f"token {token.name!r} (scopes: {', '.join(sorted(token.scopes))}) lacks scope '{scope}', which {method} needs")
        return None

    def intercept_service(self, continuation: Callable, handler_call_details: grpc.HandlerCallDetails):
        handler = continuation(handler_call_details)
        if handler is None:
            return None  # UNIMPLEMENTED, as without the interceptor
        refusal = self.check(handler_call_details.method, handler_call_details.invocation_metadata or ())
        if refusal is None:
            return handler
        log.debug("refused %s: %s", handler_call_details.method, refusal[0].name)  # counted by the metrics
        return _refusal(handler, *refusal)


def _read(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise SecurityConfigError(f"config.security.{what}: cannot read {path}: {exc.strerror}") from None


def _check_pair(cert_pem: bytes, key_pem: bytes, where: str) -> str:
    """The key belongs to the certificate; returns a one-line description of the certificate."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as exc:
        raise SecurityConfigError(f"{where}: not a PEM certificate and unencrypted PEM key: {exc}") from None
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if cert.public_key().public_bytes(*spki) != key.public_key().public_bytes(*spki):
        raise SecurityConfigError(f"{where}: the key does not belong to the certificate")
    return f"{cert.subject.rfc4514_string()}, serial {cert.serial_number:x}, valid until {cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC"


class CertificateFiles:
    """The server's certificate, key and client CA, read again when any file changes.

    gRPC calls `fetch` before every TLS handshake; it compares the files' (mtime, size, inode)
    and re-reads them only when those changed. A pair that does not fit yet (rotation half
    done) keeps the previous certificate and is tried again on the next handshake."""

    def __init__(self, cert_file: str, key_file: str, ca_file: str = "") -> None:
        self.paths = [p for p in (cert_file, key_file, ca_file) if p]
        self.cert_file, self.key_file, self.ca_file = cert_file, key_file, ca_file
        self.reloads = 0
        self._lock = threading.Lock()
        self._stamp = self._stamp_now()
        self._failed_stamp: tuple | None = None
        self.initial, self.description = self._load()

    def _stamp_now(self) -> tuple:
        stamps = []
        for path in self.paths:
            st = os.stat(path)
            stamps.append((st.st_mtime_ns, st.st_size, st.st_ino))
        return tuple(stamps)

    def _load(self) -> tuple[grpc.ServerCertificateConfiguration, str]:
        cert = _read(self.cert_file, "cert_file")
        key = _read(self.key_file, "key_file")
        ca = _read(self.ca_file, "ca_file") if self.ca_file else None
        description = _check_pair(cert, key, f"config.security: {self.cert_file} / {self.key_file}")
        return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=ca), description

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        try:
            with self._lock:
                stamp = self._stamp_now()
                if stamp in (self._stamp, self._failed_stamp):
                    return None
                try:
                    configuration, description = self._load()
                except SecurityConfigError as exc:
                    self._failed_stamp = stamp
                    log.warning("certificate files changed but cannot be used yet (keeping the previous ones): %s", exc)
                    return None
                self._stamp = stamp
                self.reloads += 1
            log.info("reloaded the server certificate: %s", description)
            return configuration
        except Exception:  # noqa: BLE001 - never break a handshake over a reload; keep serving
            log.exception("certificate reload failed; keeping the previous certificate")
            return None


@dataclass
class ServerSecurity:
    """What a server needs when security is on."""

    tokens: TokenSource
    certificates: CertificateFiles
    require_client_cert: bool

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.dynamic_ssl_server_credentials(self.certificates.initial, self.certificates.fetch,
                                                   require_client_authentication=self.require_client_cert)

    def interceptor(self) -> AuthInterceptor:
        return AuthInterceptor(self.tokens)


def is_insecure(config: SecurityConfig) -> bool:
    """`insecure: true`; or, when the file says nothing and names no certificate, LATENTEDIT_INSECURE=1."""
    if config.insecure is not None and not isinstance(config.insecure, bool):
        raise SecurityConfigError(f"config.security.insecure must be true or false, not {config.insecure!r}")
    if config.insecure is None and not (config.cert_file or config.key_file):
        return os.environ.get(INSECURE_ENV, "").lower() in ("1", "true", "yes")
    return bool(config.insecure)


def resolve(config: SecurityConfig) -> ServerSecurity | None:
    """Check the settings and load certificates and tokens; None when explicitly insecure.

    Raises SecurityConfigError with one line when the settings cannot work."""
    if is_insecure(config):
        if config.cert_file or config.key_file:
            raise SecurityConfigError("config.security: `insecure: true` together with cert_file/key_file; choose one")
        return None
    if not (config.cert_file and config.key_file):
        raise SecurityConfigError(
            "config.security: no TLS certificate (cert_file and key_file) and no `insecure: true`; "
            "refusing to serve in plaintext (`latentedit certs make DIR` makes a local CA, see config/secure-local.yaml)")
    if config.require_client_cert and not config.ca_file:
        raise SecurityConfigError("config.security: require_client_cert needs ca_file (the CA that signs client certificates)")
    tokens = TokenSource(config)
    try:
        certificates = CertificateFiles(config.cert_file, config.key_file, config.ca_file)
    except FileNotFoundError as exc:
        raise SecurityConfigError(f"config.security: cannot read {exc.filename}: {exc.strerror}") from None
    return ServerSecurity(tokens, certificates, config.require_client_cert)


# ---------------------------------------------------------------------------------------------
# The client side


@dataclass(frozen=True)
class ClientSecurity:
    """How a channel reaches a service: plaintext, or TLS with an optional client certificate
    and bearer token."""

    tls: bool = False
    ca_file: str = ""  # empty with tls: the system's roots
    cert_file: str = ""  # client certificate, for servers that require one
    key_file: str = ""
    token: str = field(default="", repr=False)
    token_file: str = ""  # read when credentials are made (no `token`): a new token needs no restart

    @classmethod
    def from_args(cls, token: str | None = None, ca_file: str | None = None, cert_file: str | None = None,
                  key_file: str | None = None, tls: bool | None = None) -> ClientSecurity:
        """Arguments first, then LATENTEDIT_TOKEN / _CA / _CERT / _KEY. TLS when a CA, a client
        certificate or `tls` is given; a token without TLS is refused (it would travel in clear)."""
        token = token if token is not None else os.environ.get(TOKEN_ENV, "")
        ca_file = ca_file if ca_file is not None else os.environ.get(CA_ENV, "")
        cert_file = cert_file if cert_file is not None else os.environ.get(CERT_ENV, "")
        key_file = key_file if key_file is not None else os.environ.get(KEY_ENV, "")
        use_tls = bool(ca_file or cert_file) if tls is None else tls
        if bool(cert_file) != bool(key_file):
            raise SecurityConfigError("a client certificate needs both its certificate and key files (--client-cert and --client-key, or LATENTEDIT_CERT and LATENTEDIT_KEY)")
        if token and not use_tls:
            raise SecurityConfigError(f"a bearer token is only sent over TLS: give the servers' CA (--ca or {CA_ENV})")
        return cls(use_tls, ca_file or "", cert_file or "", key_file or "", token or "")

    @classmethod
    def for_service(cls, config: SecurityConfig, service: str) -> ClientSecurity:
        """The editor's or trainer's own credentials for its calls to other services."""
        if is_insecure(config):
            return cls()
        token = os.environ.get(SERVICE_TOKEN_ENV, "").strip()
        token_file = "" if token else config.service_token_file
        if not token and not (token_file and _read(token_file, "service_token_file").strip()):
            raise SecurityConfigError(f"config.security: the {service} calls the generator and scorer with its own token: "
                                      f"set security.service_token_file or {SERVICE_TOKEN_ENV} (scopes: generate, score)")
        cert, key = ((config.client_cert_file, config.client_key_file) if config.client_cert_file
                     else (config.cert_file, config.key_file))
        security = cls(True, config.ca_file, cert, key, token, token_file)
        security.channel_credentials()  # unreadable files or a key that does not fit: one line at start
        return security

    def files_stamp(self) -> tuple | None:
        """(path, mtime, size, inode) of every file these credentials read; None while one is missing."""
        stamps = []
        for path in (self.ca_file, self.cert_file, self.key_file, self.token_file):
            if path:
                try:
                    st = os.stat(path)
                except OSError:
                    return None
                stamps.append((path, st.st_mtime_ns, st.st_size, st.st_ino))
        return tuple(stamps)

    def channel_credentials(self) -> grpc.ChannelCredentials:
        """Raises SecurityConfigError when a file cannot be read or the key does not fit the certificate."""
        root = _read(self.ca_file, "ca_file") if self.ca_file else None
        key = _read(self.key_file, "client_key_file") if self.key_file else None
        chain = _read(self.cert_file, "client_cert_file") if self.cert_file else None
        if key is not None and chain is not None:
            _check_pair(chain, key, f"client certificate {self.cert_file} / {self.key_file}")
        credentials = grpc.ssl_channel_credentials(root_certificates=root, private_key=key, certificate_chain=chain)
        token = self.token or (_read(self.token_file, "service_token_file").decode().strip() if self.token_file else "")
        if self.token_file and not token:
            raise SecurityConfigError(f"config.security.service_token_file: {self.token_file} is empty")
        if token:
            credentials = grpc.composite_channel_credentials(credentials, grpc.access_token_call_credentials(token))
        return credentials


# ---------------------------------------------------------------------------------------------
# A self-signed CA for local set-ups

DEFAULT_HOSTS = ("localhost", "127.0.0.1", "::1", "generator", "scorer", "trainer", "editor")


def make_certs(directory: str | os.PathLike[str], hosts: Iterable[str] = DEFAULT_HOSTS, days: int = 365,
               tokens: bool = True) -> dict[str, Path]:
    """A CA (ca.crt, ca.key), a server certificate for `hosts` usable as a client certificate
    between services (server.crt, server.key), a client certificate (client.crt, client.key),
    and, with `tokens`, a tokens file with an admin token and the services' token
    (tokens.txt, admin.token, service.token; kept if they exist). Keys are written mode 0600."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    start, end = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=days)

    def name(common: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "latentedit local"),
                          x509.NameAttribute(NameOID.COMMON_NAME, common)])

    def write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
        pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        tmp = path.with_name(path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
        os.replace(tmp, path)

    def write_cert(path: Path, cert: x509.Certificate) -> None:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        os.replace(tmp, path)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = name(f"latentedit local CA {now:%Y-%m-%d %H:%M:%S}")
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(start).not_valid_after(end)
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                                       key_encipherment=False, data_encipherment=False, key_agreement=False,
                                       encipher_only=False, decipher_only=False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA256()))

    def leaf(common: str, sans: list[x509.GeneralName], usages: list) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (x509.CertificateBuilder().subject_name(name(common)).issuer_name(ca_name).public_key(key.public_key())
                   .serial_number(x509.random_serial_number()).not_valid_before(start).not_valid_after(end)
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                   .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
                   .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False))
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        return builder.sign(ca_key, hashes.SHA256()), key

    sans: list[x509.GeneralName] = []
    for host in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            sans.append(x509.DNSName(host))
    server, server_key = leaf("latentedit services", sans, [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH])
    client, client_key = leaf("latentedit client", [], [ExtendedKeyUsageOID.CLIENT_AUTH])
    paths = {n: out / n for n in ("ca.crt", "ca.key", "server.crt", "server.key", "client.crt", "client.key")}
    write_key(paths["ca.key"], ca_key)
    write_cert(paths["ca.crt"], ca)
    write_key(paths["server.key"], server_key)
    write_cert(paths["server.crt"], server)
    write_key(paths["client.key"], client_key)
    write_cert(paths["client.crt"], client)
    if tokens:
        paths.update(make_tokens(out))
    return paths


def make_tokens(directory: Path) -> dict[str, Path]:
    """tokens.txt with an `admin` token (admin.token, for the CLI) and the services' own token
    (service.token: generate, score); existing files are kept."""
    paths = {n: directory / n for n in ("tokens.txt", "admin.token", "service.token")}
    if all(p.exists() for p in paths.values()):
        return paths
    admin, service = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
    for path, text in ((paths["admin.token"], admin + "\n"), (paths["service.token"], service + "\n"),
                       (paths["tokens.txt"], "# NAME SCOPES TOKEN (latentedit certs make)\n"
                                             f"local-admin admin {admin}\nservices generate,score {service}\n")):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(text)
    return paths
