"""The model stage: which preset (`presets`), loading it with LoRA (`loading`), and each family's specifics.

presets.py      preset names, the tiny test models, the demo GGUF, kagglehub downloads, chat formats
loading.py      load a KerasHub CausalLM in a precision, enable LoRA, count parameters
layers.py       the model's layers that carry weights or LoRA, and its inputs
gemma4.py       Gemma 4's text stack out of its multimodal presets
quantize.py     int8 / int4 bases through Keras' quantizers
gguf_import.py  a GGUF file (the demo's Gemma 3 270M) as a KerasHub preset
"""
