"""Multi-stage procedures that are not a single ``Trainer.fit``: sweeps and incremental sessions."""
