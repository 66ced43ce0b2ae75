"""Built-in YAML recipes, shipped inside the wheel (``hashdistill recipes`` lists them)."""
