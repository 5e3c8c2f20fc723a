"""Pure metric functions: top-1, harmonic mean, the FSCIL session table."""
