"""CUDA tooling that needs no GPU: aot (compile every Triton kernel variant for sm_80 / sm_90 and check spills).
Imports nothing here: aot needs triton's NVIDIA backend."""
