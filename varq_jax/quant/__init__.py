"""Shift-and-Sum post-training quantization: quantizers, shift-and-sum attention, BOP accounting."""
