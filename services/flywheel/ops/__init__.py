"""Operating Flywheel on Kubernetes: `flywheel ops` and the trainer's Lease rule."""
