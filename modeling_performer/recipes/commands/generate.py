"""Loads a saved Performer LM with the Auto classes and generates with pipeline("text-generation").

    python scripts/generate.py outputs/quickstart-lm --prompt "ROMEO." --max-new-tokens 60
"""

import argparse

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

from modeling_performer.recipes import devices


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="a folder written by save_pretrained (e.g. by scripts/train.py)")
    parser.add_argument("--prompt", action="append", help="repeatable; default: two Shakespearean openings")
    parser.add_argument("--max-new-tokens", type=int, default=60)
    parser.add_argument("--sample", action="store_true", help="sample (top-k 40, temperature 0.8) instead of greedy")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--trust-remote-code", action="store_true", help="load the modeling code saved with the model")
    devices.add_device_arguments(parser)
    args = parser.parse_args(argv)
    device, precision = devices.setup(args)
    if not args.trust_remote_code:
        import modeling_performer  # noqa: F401  (registers the Auto classes)
    torch.manual_seed(args.seed)
    model = AutoModelForCausalLM.from_pretrained(args.model, trust_remote_code=args.trust_remote_code).to(device)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    generator = pipeline("text-generation", model=model, tokenizer=tokenizer)
    options = dict(do_sample=True, top_k=40, temperature=0.8) if args.sample else dict(do_sample=False)
    for prompt in args.prompt or ["ROMEO. I will", "Enter the KING and"]:
        with devices.autocast(device, precision):
            out = generator(prompt, max_new_tokens=args.max_new_tokens, repetition_penalty=1.2, **options)
        text = out[0]["generated_text"]
        print(f"--- {prompt!r}\n{text}\n")


if __name__ == "__main__":
    main()
