"""Quantized weights executed as stored by the torch backend (CPU: `cpu.prepare_cpu`)."""
