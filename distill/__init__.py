"""LLC teachers, timm hash students and the hash-code distillation losses."""
