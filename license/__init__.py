"""Llama license compliance: policies as data, stamping into every output, and the audit."""
