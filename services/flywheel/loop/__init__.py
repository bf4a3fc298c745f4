"""The closed loop: `flywheel up` (supervisor), simulated users (panel) and `flywheel demo`."""
