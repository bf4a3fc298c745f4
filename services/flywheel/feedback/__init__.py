"""The feedback service: validated, authorized, durable intake of user feedback."""
