"""Built-in corral recipes (YAML), listed by `corral recipe list`."""
