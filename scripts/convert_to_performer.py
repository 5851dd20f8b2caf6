#!/usr/bin/env python
"""Converts a pretrained BERT / RoBERTa / MiniLM encoder, a GPT-2 decoder or a Llama-family decoder
(Llama, Mistral, Qwen2, Qwen3) into a Performer with the same weights: learned positions and
post-LayerNorm (BERT family), pre-LayerNorm (GPT-2), or rotary positions with the source's scaling,
pre-RMSNorm, SwiGLU and grouped key/value heads (Llama family), and the attention you choose.
SOURCE is a local folder, a GGUF file (`model.Q4_1.gguf`, or a folder with --gguf-file NAME; pip
install gguf), or a Hub model id where the Hub is reachable. OUTPUT loads with AutoModel
and the head's Auto class (AutoModelForMaskedLM, AutoModelForSequenceClassification,
AutoModelForCausalLM), tokenizer included.
`--help` gives the options; the tool is modeling_performer/recipes/commands/convert_to_performer.py."""

from modeling_performer.recipes.commands.convert_to_performer import main

if __name__ == "__main__":
    main()
