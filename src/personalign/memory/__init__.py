"""Memory and storage: per-user Chroma memories, the profile store, locks and atomic writes."""
