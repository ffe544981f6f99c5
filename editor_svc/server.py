"""Builds and runs the editor service process."""

from __future__ import annotations

from editor_svc.service import EditorServicer
from latentedit.api.v1 import editor_pb2, editor_pb2_grpc
from latentedit.config import Config
from latentedit.repository import ModelRepository
from latentedit.rpc.remote_world import Services
from latentedit.rpc.security import ClientSecurity
from latentedit.rpc.serving import ServiceHost

SERVICE_NAME = editor_pb2.DESCRIPTOR.services_by_name["EditorService"].full_name


def build(config: Config) -> tuple[ServiceHost, EditorServicer]:
    host = ServiceHost.for_service("editor", config)  # checks the security settings first
    # Edits call the generator and scorer with the editor's own credentials, never the caller's.
    services = Services(config.address("generator"), config.address("scorer"),
                        security=ClientSecurity.for_service(config.security, "editor"), service="editor",
                        max_message_bytes=config.services["editor"].max_message_bytes)
    servicer = EditorServicer(ModelRepository(config.repository), config.editor, services)
    host.add(editor_pb2_grpc.add_EditorServiceServicer_to_server, servicer, SERVICE_NAME)
    host.start()
    host.set_serving(True)
    return host, servicer
