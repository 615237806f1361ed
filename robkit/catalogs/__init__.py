"""The built-in catalogs: export targets, training recipes and teacher declarations (YAML)."""
