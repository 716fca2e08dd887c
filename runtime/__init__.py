"""Running patterns: dense reference attention (and, later, compiled kernels)."""
