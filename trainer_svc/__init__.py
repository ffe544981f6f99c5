"""gRPC adapter for the TrainerService (API v1)."""
