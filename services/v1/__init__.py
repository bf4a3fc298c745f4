"""Generated from protos/flywheel/v1 by `python -m flywheel.core.protogen`. Do not edit."""
