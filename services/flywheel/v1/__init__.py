"""Generated from protos/flywheel/v1 by `python -m tools.protogen`. Do not edit."""
