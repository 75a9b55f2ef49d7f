"""Drop-in replacements inside third-party models (each needs its library installed)."""
