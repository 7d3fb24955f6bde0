"""Importers: models trained elsewhere (OPUS-MT / Marian) converted into our model dir (needs torch)."""
