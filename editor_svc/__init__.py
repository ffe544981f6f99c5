"""gRPC adapter for the EditorService (API v1)."""
