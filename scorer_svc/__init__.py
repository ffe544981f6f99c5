"""gRPC adapter for the ScorerService (API v1)."""
