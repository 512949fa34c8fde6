"""Format converters: one module per (source, target) pair; `registry` maps formats to them."""
