"""Deployable variants of a version: int8 (static QDQ), fp16, TFLite fp32/int8."""
