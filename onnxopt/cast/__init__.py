"""After the write: `autocast` (FP16/BF16 for everything not quantized; the `Autocast` pass), `precision` (which
nodes stay FP32, from measured ranges) and `prescale` (tensors beyond FP16 scaled by powers of two instead)."""
