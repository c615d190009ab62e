"""Adapters that wire moe-lbl into training frameworks; only this package touches Megatron."""
