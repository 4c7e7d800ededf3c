"""File input/output: atomic writes, bounded image decoding, index PNGs, safe paths."""
