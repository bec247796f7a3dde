"""Reusable analyses built only on the public oculi-dsl API (installed as ``oculi_dsl.recipes``)."""
