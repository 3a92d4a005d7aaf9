"""Export of the reference modules (installed as `ldm_engine.export`)."""
