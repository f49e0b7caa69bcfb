"""Dataset builders (DFEW, MAFW) and preparation tools."""
