"""Security on: TLS (mutual in the suite), bearer tokens with scopes, open probes, certificate
reload and refusing to start without certificates. Services run as real processes (the suite:
`latentedit serve`, four processes) or as a real ServiceHost in this process (reload)."""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import ssl
import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from google.protobuf import message_factory
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from latentedit import wire
from latentedit.api.v1 import (
    editor_pb2,
    editor_pb2_grpc,
    generator_pb2,
    generator_pb2_grpc,
    scorer_pb2,
    trainer_pb2,
    trainer_pb2_grpc,
    types_pb2,
)
from latentedit.config import SecurityConfig, ServingOptions
from latentedit.install import link_or_copy
from latentedit.rpc.client import connect
from latentedit.rpc.security import SecurityConfigError, make_certs, parse_tokens
from latentedit.rpc.serving import ServiceHost
from tests.conftest import free_port

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent
NAMES = ("generator", "scorer", "trainer", "editor")
# Every RPC of a service needs that service's scope (the documented policy, README "Operations").
SERVICE_SCOPE = {"GeneratorService": "generate", "ScorerService": "score", "TrainerService": "train", "EditorService": "edit"}
PORT_OF = {"GeneratorService": "generator", "ScorerService": "scorer", "TrainerService": "trainer", "EditorService": "editor"}
SERVICES = [s for module in (generator_pb2, scorer_pb2, trainer_pb2, editor_pb2) for s in module.DESCRIPTOR.services_by_name.values()]
SECURITY_ENV = ("LATENTEDIT_INSECURE", "LATENTEDIT_TOKENS", "LATENTEDIT_SERVICE_TOKEN", "LATENTEDIT_TOKEN", "LATENTEDIT_CA",
                "LATENTEDIT_CERT", "LATENTEDIT_KEY", "LATENTEDIT_REPOSITORY")


def _env(**extra: str) -> dict[str, str]:
    """This environment without any security setting (conftest sets LATENTEDIT_INSECURE)."""
    env = {k: v for k, v in os.environ.items() if k not in SECURITY_ENV}
    return {**env, "PYTHONUNBUFFERED": "1", **extra}


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """A CA with server and client certificates, and one token per scope plus 'all but' tokens."""
    directory = tmp_path_factory.mktemp("pki")
    paths = make_certs(directory, tokens=False)
    tokens = {scope: secrets.token_urlsafe(24) for scope in ("generate", "score", "edit", "train", "admin")}
    plain = ("generate", "score", "edit", "train")
    for scope in plain:
        tokens[f"all-but-{scope}"] = secrets.token_urlsafe(24)
    tokens["services"] = secrets.token_urlsafe(24)
    lines = [f"only-{s} {s} {tokens[s]}" for s in (*plain, "admin")]
    lines += [f"all-but-{s} {','.join(o for o in plain if o != s)} {tokens[f'all-but-{s}']}" for s in plain]
    lines.append(f"services generate,score {tokens['services']}")
    (directory / "tokens.txt").write_text("# test tokens\n" + "\n".join(lines) + "\n")
    (directory / "service.token").write_text(tokens["services"] + "\n")
    return paths, tokens, directory


def _security_section(paths, directory, mutual: bool) -> dict:
    return {"cert_file": str(paths["server.crt"]), "key_file": str(paths["server.key"]), "ca_file": str(paths["ca.crt"]),
            "require_client_cert": mutual, "client_cert_file": str(paths["client.crt"]),
            "client_key_file": str(paths["client.key"]), "tokens_file": str(directory / "tokens.txt"),
            "service_token_file": str(directory / "service.token")}


@pytest.fixture(scope="module")
def secure_suite(tmp_path_factory, installed_repo, pki):
    """The four services as separate processes with mutual TLS and tokens: (config path, ports, pki)."""
    paths, tokens, directory = pki
    where = tmp_path_factory.mktemp("secure-suite")
    repo = where / "repo"  # this module writes a boundary: a private copy of the repository
    shutil.copytree(installed_repo.root, repo, ignore=shutil.ignore_patterns(".cache", ".jobs"), copy_function=link_or_copy)
    ports = {name: free_port() for name in NAMES}
    config = where / "secure.yaml"
    config.write_text(yaml.safe_dump({
        "repository": str(repo),
        "services": {name: {"port": port, "grace_period_s": 5} for name, port in ports.items()},
        "generator": {"poll_interval_s": 1},
        "security": _security_section(paths, directory, mutual=True),
    }))
    log = where / "serve.log"  # a file, not a pipe nobody reads while the suite runs
    process = subprocess.Popen([sys.executable, "-m", "latentedit", "--config", str(config), "serve"], cwd=ROOT, env=_env(),
                               stdout=log.open("w"), stderr=subprocess.STDOUT)
    try:
        for name, port in ports.items():
            # Health's Watch pushes each status change; wait_for_ready covers the time before the
            # process listens. Both bounded by the call's deadline.
            updates = health_pb2_grpc.HealthStub(_channel(port, paths)).Watch(health_pb2.HealthCheckRequest(), timeout=240,
                                                                              wait_for_ready=True)
            try:
                for update in updates:
                    if update.status == health_pb2.HealthCheckResponse.SERVING:
                        break
            except grpc.RpcError as exc:
                process.terminate()
                process.wait(60)
                raise AssertionError(f"{name} never reported SERVING over mutual TLS ({exc.code().name}): "
                                     f"{log.read_text()[-5000:]}") from exc
            finally:
                updates.cancel()
        yield config, ports, pki
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(60)
            except subprocess.TimeoutExpired:
                process.kill()


def _channel(port: int, paths, token: str = "", client_cert: bool = True) -> grpc.Channel:
    cert = str(paths["client.crt"]) if client_cert else ""
    key = str(paths["client.key"]) if client_cert else ""
    return connect(f"localhost:{port}", token, str(paths["ca.crt"]), cert_file=cert, key_file=key)


def _call(channel: grpc.Channel, service, method, token: str | None) -> tuple[grpc.StatusCode, str]:
    """Call `method` with an empty request (a one-message stream where it takes a stream)."""
    request_class = message_factory.GetMessageClass(method.input_type)
    response_class = message_factory.GetMessageClass(method.output_type)
    path = f"/{service.full_name}/{method.name}"
    metadata = [("authorization", f"Bearer {token}")] if token is not None else None
    kinds = {(False, False): channel.unary_unary, (False, True): channel.unary_stream,
             (True, False): channel.stream_unary, (True, True): channel.stream_stream}
    callable_ = kinds[(method.client_streaming, method.server_streaming)](
        path, request_serializer=request_class.SerializeToString, response_deserializer=response_class.FromString)
    request = iter([request_class()]) if method.client_streaming else request_class()
    try:
        answer = callable_(request, metadata=metadata, timeout=60)
        if method.server_streaming:
            list(answer)
        return grpc.StatusCode.OK, ""
    except grpc.RpcError as exc:
        return exc.code(), exc.details() or ""


def test_every_rpc_refuses_no_token_and_the_wrong_scope(secure_suite):
    """Every RPC of every service (from the descriptors; reflection shows no other service of ours):
    no token and an unknown token: UNAUTHENTICATED; a token with every other scope:
    PERMISSION_DENIED; both name the scope, never the token; the right scope gets through."""
    _, ports, (paths, tokens, _) = secure_suite
    unknown = secrets.token_urlsafe(24)
    checked = []
    for service in SERVICES:
        port = ports[PORT_OF[service.name]]
        channel = _channel(port, paths)
        served = {s for s in ProtoReflectionDescriptorDatabase(channel).get_services() if s.startswith("latentedit.")}
        assert served == {service.full_name}, served
        scope = SERVICE_SCOPE[service.name]
        for method in service.methods:
            where = f"{service.name}/{method.name}"
            code, details = _call(channel, service, method, None)
            assert code == grpc.StatusCode.UNAUTHENTICATED, (where, code, details)
            assert f"scope '{scope}'" in details, (where, details)
            code, details = _call(channel, service, method, unknown)
            assert code == grpc.StatusCode.UNAUTHENTICATED and unknown not in details, (where, code, details)
            wrong = tokens[f"all-but-{scope}"]
            code, details = _call(channel, service, method, wrong)
            assert code == grpc.StatusCode.PERMISSION_DENIED, (where, code, details)
            assert f"scope '{scope}'" in details and wrong not in details, (where, details)
            for right in (tokens[scope], tokens["admin"]):
                code, details = _call(channel, service, method, right)
                assert code not in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED), (where, code, details)
            checked.append(where)
    assert len(checked) == sum(len(s.methods) for s in SERVICES) >= 15, checked


def test_health_and_reflection_answer_without_a_token(secure_suite):
    _, ports, (paths, _, _) = secure_suite
    for service in SERVICES:
        channel = _channel(ports[PORT_OF[service.name]], paths)  # a client certificate (mutual TLS), no token
        health = health_pb2_grpc.HealthStub(channel)
        for name in ("", service.full_name, "liveness"):
            assert health.Check(health_pb2.HealthCheckRequest(service=name), timeout=10).status == health_pb2.HealthCheckResponse.SERVING
        assert service.full_name in ProtoReflectionDescriptorDatabase(channel).get_services()


@pytest.fixture(scope="module")
def tls_boundary(secure_suite) -> str:
    """A boundary trained through the trainer over mutual TLS (the trainer checks the spec
    against the generator with its own token)."""
    _, ports, (paths, tokens, _) = secure_suite
    trainer = trainer_pb2_grpc.TrainerServiceStub(_channel(ports["trainer"], paths, tokens["train"]))
    z = np.random.default_rng(3).standard_normal((200, 100)).astype(np.float32)
    job = trainer.StartJob(trainer_pb2.StartJobRequest(idempotency_key="tls-edit", custom_boundary=trainer_pb2.CustomBoundaryJobSpec(
        latents=types_pb2.Latents(space=types_pb2.LATENT_SPACE_Z, values=wire.to_tensor(z)),
        labels=wire.to_tensor((z[:, 0] > 0).astype(np.int64)),
        options=trainer_pb2.TrainingOptions(artifact_name="tls-boundary"))), timeout=120)
    final = list(trainer.WatchJob(trainer_pb2.WatchJobRequest(id=job.id), timeout=300))[-1].job
    assert final.state == trainer_pb2.JOB_STATE_SUCCEEDED, final.error
    return final.artifact.ref.name


def test_an_edit_runs_end_to_end_over_mutual_tls_with_the_services_own_token(secure_suite, tls_boundary):
    """An edit streamed by the editor, which calls the generator and the scorer itself. The
    caller's token has the `edit` scope only, which the generator refuses: the edit works because
    the editor sends its own token, not the caller's."""
    _, ports, (paths, tokens, _) = secure_suite
    edit_only = tokens["edit"]
    with pytest.raises(grpc.RpcError) as refused:
        generator_pb2_grpc.GeneratorServiceStub(_channel(ports["generator"], paths, edit_only)).ListModels(
            generator_pb2.ListModelsRequest(), timeout=10)
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    editor = editor_pb2_grpc.EditorServiceStub(_channel(ports["editor"], paths, edit_only))
    request = editor_pb2.EditRequest(seed=editor_pb2.SeedStart(seed=5, count=2), num_frames=3, score_heads=["pose"],
                                     interfacegan=editor_pb2.InterFaceGANEdit(boundary=tls_boundary, start_distance=-2,
                                                                              end_distance=2))
    frames = list(editor.Edit(request, timeout=300))
    assert [f.index for f in frames] == [0, 1, 2]
    assert frames[-1].stop_reason == editor_pb2.STOP_REASON_COMPLETED
    images = [wire.decode_images(f.images) for f in frames]
    assert all(i.shape == (2, 64, 64, 3) for i in images) and images[0].std() > 20
    assert all({h.head for h in f.scores} == {"pose"} for f in frames)


def test_the_cli_takes_a_token_and_a_ca(secure_suite, tmp_path):
    """`latentedit generate` over mutual TLS: the token from LATENTEDIT_TOKEN, the CA and the
    client certificate from the config; without a token, one line naming the scope."""
    config, _, (_, tokens, _) = secure_suite
    out = tmp_path / "grid.png"
    args = [sys.executable, "-m", "latentedit", "--config", str(config), "generate", "--count", "4", "--out", str(out)]
    done = subprocess.run(args, cwd=ROOT, env=_env(LATENTEDIT_TOKEN=tokens["generate"]), capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0 and out.stat().st_size > 0, done.stdout + done.stderr
    refused = subprocess.run(args, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120)
    assert refused.returncode == 1
    assert refused.stderr.strip().splitlines()[-1].startswith("error: UNAUTHENTICATED: no bearer token"), refused.stderr
    assert "scope 'generate'" in refused.stderr and "Traceback" not in refused.stderr


def test_clients_without_tls_or_without_a_client_certificate_fail_cleanly(secure_suite):
    """A plaintext client, and a TLS client with no certificate under mutual TLS, get UNAVAILABLE
    at once (not a hang), and the server goes on serving proper clients."""
    _, ports, (paths, tokens, _) = secure_suite
    port = ports["generator"]
    for channel in (grpc.insecure_channel(f"localhost:{port}"), _channel(port, paths, client_cert=False)):
        with pytest.raises(grpc.RpcError) as failed:
            health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=20)
        assert failed.value.code() == grpc.StatusCode.UNAVAILABLE, failed.value
    good = generator_pb2_grpc.GeneratorServiceStub(_channel(port, paths, tokens["generate"]))
    assert good.ListModels(generator_pb2.ListModelsRequest(), timeout=20).models


def _peer_certificate(port: int, ca_file: Path) -> bytes:
    """The DER certificate a fresh TLS connection to `port` is shown (verified against `ca_file`)."""
    context = ssl.create_default_context(cafile=str(ca_file))
    context.set_alpn_protocols(["h2"])
    with socket.create_connection(("localhost", port), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname="localhost") as tls:
            return tls.getpeercert(binary_form=True)


def _der(path: Path) -> bytes:
    return x509.load_pem_x509_certificate(path.read_bytes()).public_bytes(serialization.Encoding.DER)


def test_the_server_certificate_is_reloaded_when_its_files_change(tmp_path, pki):
    """Replace the files (a new CA, as after a re-issue): new connections get the new
    certificate, trusted by the new CA only. A rotation half done (certificate replaced, key not
    yet) keeps the old pair serving."""
    _, tokens, directory = pki
    old = make_certs(tmp_path / "old", tokens=False)
    new = make_certs(tmp_path / "new", tokens=False)
    live = tmp_path / "live"
    live.mkdir()
    for name in ("server.crt", "server.key"):
        shutil.copy(old[name], live / name)
    security = SecurityConfig(cert_file=str(live / "server.crt"), key_file=str(live / "server.key"),
                              tokens_file=str(directory / "tokens.txt"))
    host = ServiceHost(ServingOptions(port=0), security, service="reload-test")
    host.start()
    host.set_serving(True)
    try:
        def check(ca) -> grpc.StatusCode:
            channel = connect(f"localhost:{host.port}", "", str(ca))
            try:
                health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=20)
                return grpc.StatusCode.OK
            except grpc.RpcError as exc:
                return exc.code()
            finally:
                channel.close()

        assert _peer_certificate(host.port, old["ca.crt"]) == _der(old["server.crt"])
        assert check(old["ca.crt"]) == grpc.StatusCode.OK

        os.replace(shutil.copy(new["server.crt"], live / "incoming.crt"), live / "server.crt")  # the key still old
        assert _peer_certificate(host.port, old["ca.crt"]) == _der(old["server.crt"])

        os.replace(shutil.copy(new["server.key"], live / "incoming.key"), live / "server.key")
        assert _peer_certificate(host.port, new["ca.crt"]) == _der(new["server.crt"])
        assert check(new["ca.crt"]) == grpc.StatusCode.OK
        assert check(old["ca.crt"]) == grpc.StatusCode.UNAVAILABLE
        assert host.security is not None and host.security.certificates.reloads == 1
    finally:
        host.stop(0)


def _serve(config: Path, *services: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "latentedit", "--config", str(config), "serve", *services], cwd=ROOT,
                          env=_env(), capture_output=True, text=True, timeout=120)


def test_a_config_without_certificates_or_insecure_refuses_to_start(tmp_path, pki):
    """No certificates and no `insecure: true`: `serve` (one service or all) exits 1 with one
    line and binds nothing; so do certificates without tokens, and an editor without its own token."""
    paths, _, directory = pki
    port = free_port()
    plain = tmp_path / "plain.yaml"
    plain.write_text(yaml.safe_dump({"repository": str(tmp_path / "repo"), "services": {"generator": {"port": port}}}))
    for services in (("generator",), ()):
        done = _serve(plain, *services)
        assert done.returncode == 1, done.stdout + done.stderr
        lines = (done.stdout + done.stderr).strip().splitlines()
        assert lines == ["error: config.security: no TLS certificate (cert_file and key_file) and no `insecure: true`; "
                         "refusing to serve in plaintext (`latentedit certs make DIR` makes a local CA, see "
                         "config/secure-local.yaml)"], lines
    with socket.socket() as probe:
        probe.bind(("localhost", port))  # nothing was left listening

    section = _security_section(paths, directory, mutual=False)
    no_tokens = tmp_path / "no-tokens.yaml"
    no_tokens.write_text(yaml.safe_dump({"security": {**section, "tokens_file": ""}}))
    done = _serve(no_tokens, "generator")
    assert done.returncode == 1 and done.stderr.strip().splitlines() == [
        "error: config.security: no bearer tokens defined: set security.tokens_file or LATENTEDIT_TOKENS ('NAME SCOPES "
        "TOKEN' lines), or `insecure: true` for a local plaintext set-up"], done.stderr
    no_service_token = tmp_path / "no-service-token.yaml"
    no_service_token.write_text(yaml.safe_dump({"security": {**section, "service_token_file": ""}}))
    done = _serve(no_service_token, "editor")
    assert done.returncode == 1 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "the editor calls the generator and scorer with its own token" in done.stderr


def test_token_definitions_are_checked_without_echoing_tokens():
    secret = "s3cret-" + secrets.token_hex(8)
    for text, expected in ((f"ci generate,scor {secret}", "unknown scope(s) ['scor']"),
                           (f"ci {secret}", "expected 'NAME SCOPES TOKEN'"),
                           ("ci generate short", "at least 16 characters")):
        with pytest.raises(SecurityConfigError) as info:
            parse_tokens(text, "LATENTEDIT_TOKENS")
        assert expected in str(info.value) and secret not in str(info.value) and "short" not in str(info.value)
    parsed = parse_tokens(f"# comment\nci generate,score {secret}; ops admin {secret}x # trailing", "env")
    assert [(t.name, sorted(t.scopes)) for t in parsed] == [("ci", ["generate", "score"]), ("ops", ["admin"])]
    assert parsed[1].grants("train") and not parsed[0].grants("edit")


def test_a_service_whose_own_token_is_refused_downstream_says_so(secure_suite, tls_boundary, tmp_path, monkeypatch):
    """An editor (in this process) whose service token lacks `generate`: the caller, whose own
    token is fine, gets FAILED_PRECONDITION naming the generator and the setting, not UNAUTHENTICATED."""
    from latentedit.config import load_config
    from latentedit.rpc.launch import build_service

    config_path, ports, (paths, tokens, directory) = secure_suite
    raw = yaml.safe_load(config_path.read_text())
    raw["services"] = {"editor": {"port": 0}}
    raw["addresses"] = {"generator": f"localhost:{ports['generator']}", "scorer": f"localhost:{ports['scorer']}"}
    path = tmp_path / "editor.yaml"
    path.write_text(yaml.safe_dump(raw))
    for name in SECURITY_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("LATENTEDIT_SERVICE_TOKEN", tokens["all-but-generate"])
    host = build_service("editor", load_config(path))
    try:
        editor = editor_pb2_grpc.EditorServiceStub(_channel(host.port, paths, tokens["edit"]))
        request = editor_pb2.EditRequest(seed=editor_pb2.SeedStart(seed=5, count=1), num_frames=2,
                                         interfacegan=editor_pb2.InterFaceGANEdit(boundary=tls_boundary, end_distance=1))
        with pytest.raises(grpc.RpcError) as info:
            list(editor.Edit(request, timeout=60))
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION, info.value
        assert "the generator service at" in info.value.details() and "security.service_token_file" in info.value.details()
        assert tokens["all-but-generate"] not in info.value.details()
    finally:
        host.stop(0)


def test_what_counts_as_insecure_and_what_a_client_refuses(monkeypatch, pki):
    """Plaintext only when said: `insecure: true`, or LATENTEDIT_INSECURE when the file says
    nothing; an explicit `insecure: false` or certificates win over the environment. Clients never
    send a token without TLS. Every RPC a server registers must have a scope."""
    from latentedit.rpc.security import ClientSecurity, check_service_scopes, resolve

    paths, _, directory = pki
    certs = {"cert_file": str(paths["server.crt"]), "key_file": str(paths["server.key"]),
             "tokens_file": str(directory / "tokens.txt")}
    monkeypatch.delenv("LATENTEDIT_INSECURE", raising=False)
    assert resolve(SecurityConfig(insecure=True)) is None
    for config in (SecurityConfig(), SecurityConfig(insecure=False)):
        with pytest.raises(SecurityConfigError, match="no TLS certificate"):
            resolve(config)
    monkeypatch.setenv("LATENTEDIT_INSECURE", "1")
    assert resolve(SecurityConfig()) is None
    with pytest.raises(SecurityConfigError, match="no TLS certificate"):
        resolve(SecurityConfig(insecure=False))
    assert resolve(SecurityConfig(**certs)) is not None  # certificates: secure whatever the environment says
    with pytest.raises(SecurityConfigError, match="choose one"):
        resolve(SecurityConfig(insecure=True, **certs))
    with pytest.raises(SecurityConfigError, match="require_client_cert needs ca_file"):
        resolve(SecurityConfig(require_client_cert=True, **certs))
    with pytest.raises(SecurityConfigError, match="true or false"):
        resolve(SecurityConfig(insecure="yes"))  # type: ignore[arg-type]

    secret = secrets.token_urlsafe(24)
    with pytest.raises(SecurityConfigError, match="only sent over TLS") as info:
        ClientSecurity.from_args(token=secret, ca_file="", cert_file="", key_file="")
    assert secret not in str(info.value) and secret not in repr(ClientSecurity(True, token=secret))

    for service in SERVICES:
        check_service_scopes(service.full_name)
    with pytest.raises(SecurityConfigError, match=r"grpc.health.v1.Health: no scope defined for \['Check'"):
        check_service_scopes("grpc.health.v1.Health")


def test_a_services_own_credentials_are_read_again_when_their_files_change(secure_suite, tmp_path):
    """The channels the editor and trainer use (`Services`): a new service token in its file is
    used by the next call without a restart; a client key that does not fit its certificate (a
    rotation half done) keeps the working channels."""
    from latentedit.rpc.remote_world import Services
    from latentedit.rpc.security import ClientSecurity

    _, ports, (paths, tokens, _) = secure_suite
    token_file = tmp_path / "service.token"
    token_file.write_text(tokens["all-but-generate"] + "\n")
    cert, key = tmp_path / "client.crt", tmp_path / "client.key"
    shutil.copy(paths["client.crt"], cert)
    shutil.copy(paths["client.key"], key)
    security = ClientSecurity(True, str(paths["ca.crt"]), str(cert), str(key), token_file=str(token_file))
    address = f"localhost:{ports['generator']}"
    services = Services(address, f"localhost:{ports['scorer']}", security=security, service="test")
    with pytest.raises(grpc.RpcError) as refused:
        services.generator.ListModels(generator_pb2.ListModelsRequest(), timeout=20)
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED

    os.replace(shutil.copy(paths["server.key"], tmp_path / "incoming.key"), key)  # not the client certificate's key
    token_file.write_text(tokens["generate"] + "\n")
    with pytest.raises(grpc.RpcError) as still:
        services.generator.ListModels(generator_pb2.ListModelsRequest(), timeout=20)
    assert still.value.code() == grpc.StatusCode.PERMISSION_DENIED  # the old channels, the old token

    os.replace(shutil.copy(paths["client.key"], tmp_path / "incoming.key"), key)
    assert services.generator.ListModels(generator_pb2.ListModelsRequest(), timeout=20).models


def test_the_tokens_file_is_read_again_when_it_changes(secure_suite, tmp_path, monkeypatch):
    """An editor (in this process) serving with its own tokens file: a token removed from the file
    is refused on the next call and a token added is accepted, without a restart; a file that
    does not parse keeps the tokens in use."""
    from latentedit.config import load_config
    from latentedit.rpc.launch import build_service

    config_path, ports, (paths, _, _) = secure_suite
    old, new = secrets.token_urlsafe(24), secrets.token_urlsafe(24)
    tokens_file = tmp_path / "tokens.txt"
    tokens_file.write_text(f"caller edit {old}\n")
    raw = yaml.safe_load(config_path.read_text())
    raw["services"] = {"editor": {"port": 0}}
    raw["addresses"] = {"generator": f"localhost:{ports['generator']}", "scorer": f"localhost:{ports['scorer']}"}
    raw["security"]["tokens_file"] = str(tokens_file)
    path = tmp_path / "editor.yaml"
    path.write_text(yaml.safe_dump(raw))
    for name in SECURITY_ENV:
        monkeypatch.delenv(name, raising=False)
    host = build_service("editor", load_config(path))

    def list_edits(token: str) -> grpc.StatusCode:
        stub = editor_pb2_grpc.EditorServiceStub(_channel(host.port, paths, token))
        try:
            stub.ListEdits(editor_pb2.ListEditsRequest(), timeout=30)
            return grpc.StatusCode.OK
        except grpc.RpcError as exc:
            return exc.code()

    try:
        assert (list_edits(old), list_edits(new)) == (grpc.StatusCode.OK, grpc.StatusCode.UNAUTHENTICATED)
        staged = tmp_path / "tokens.new"
        staged.write_text(f"caller edit {new}\n")
        os.replace(staged, tokens_file)
        assert (list_edits(old), list_edits(new)) == (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.OK)
        staged.write_text(f"caller edit,nonsense {old}\n")
        os.replace(staged, tokens_file)
        assert (list_edits(old), list_edits(new)) == (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.OK)
    finally:
        host.stop(0)


def test_the_clis_client_certificate_flags_do_not_clash_with_train_key(monkeypatch, pki):
    """`train ... --key K` is the job's idempotency key; the client key is `--client-key`: a
    train command on a plaintext config connects, and one on a TLS config gets the client pair."""
    from latentedit import cli

    paths, _, _ = pki
    monkeypatch.setenv("LATENTEDIT_INSECURE", "1")
    for name in ("LATENTEDIT_TOKEN", "LATENTEDIT_CA", "LATENTEDIT_CERT", "LATENTEDIT_KEY"):
        monkeypatch.delenv(name, raising=False)
    train = ["train", "boundary", "--head", "pose", "--output", "yaw", "--key", "retry-me"]
    args = cli.build_parser().parse_args(train)
    assert args.key == "retry-me" and args.client_key is None
    cli._connect(args, "localhost:1").close()  # plaintext: no certificate pair half given
    args = cli.build_parser().parse_args(["--ca", str(paths["ca.crt"]), "--client-cert", str(paths["client.crt"]),
                                          "--client-key", str(paths["client.key"]), *train])
    assert (args.key, args.client_key) == ("retry-me", str(paths["client.key"]))
    cli._connect(args, "localhost:1").close()
