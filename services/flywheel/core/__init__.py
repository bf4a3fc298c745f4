"""Plumbing shared by every service: config, Kafka bus, model store, auth, gRPC server."""
