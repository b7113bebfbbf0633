"""The TT-NN backend: the Llama model as the tech report builds it, on real ttnn or llm.ttnn_emu."""
