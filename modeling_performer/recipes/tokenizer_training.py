"""Trains a SentencePiece unigram tokenizer on a prepared corpus and saves it as a transformers
`PreTrainedTokenizerFast` folder (tokenizer.json), which `AutoTokenizer.from_pretrained` loads
offline without sentencepiece or protobuf and which gives the same ids as the SentencePiece model.

Special tokens for every head: <pad>=0, <s>=1 (bos), </s>=2 (eos), <unk>=3, <mask>=4.
No dummy prefix: a space belongs to the token after it and nothing is added before the first
word, so decoding the continuation of a prompt keeps its leading space (text-generation output
reads "I will not", not "I willnot") and decoding a whole text adds no space in front.
Line breaks are folded into spaces (SentencePiece splits on whitespace; the fast tokenizer's
normaliser does the same).

    python scripts/train_tokenizer.py --corpus data_cache/text/train.jsonl --output outputs/tokenizer
    python scripts/train_tokenizer.py --corpus data_cache/bible/train.jsonl --fields en es \
        --output data_cache/bible/tokenizer     # joint English/Spanish vocabulary for seq2seq
"""

import argparse
import json
import pathlib
import tempfile

SPECIALS = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "mask_token": "<mask>"}


def read_texts(path, max_rows=0, fields=("text",)):
    texts = []
    with open(path) as f:
        for i, line in enumerate(f):
            if max_rows and i >= max_rows:
                break
            row = json.loads(line)
            texts.extend(row[field] for field in fields)
    return texts


def fold(text: str) -> str:
    return " ".join(text.split())


def train_sentencepiece(texts, vocab_size, model_prefix):
    import sentencepiece as spm

    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
        for text in texts:
            f.write(fold(text) + "\n")
    spm.SentencePieceTrainer.train(
        input=f.name, model_prefix=model_prefix, model_type="unigram", vocab_size=vocab_size,
        pad_id=0, bos_id=1, eos_id=2, unk_id=3, user_defined_symbols=["<mask>"],
        normalization_rule_name="identity", add_dummy_prefix=False, character_coverage=1.0, hard_vocab_limit=False,
        num_threads=2, minloglevel=2,
    )
    return spm.SentencePieceProcessor(model_file=f"{model_prefix}.model")


def to_fast_tokenizer(sp):
    """The SentencePiece unigram model as a tokenizers pipeline: Unigram + Metaspace."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = [(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())]
    tokenizer = Tokenizer(models.Unigram(vocab, unk_id=sp.unk_id(), byte_fallback=False))
    tokenizer.normalizer = normalizers.Sequence([normalizers.Replace(Regex(r"\s+"), " "), normalizers.Strip()])
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never")
    tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="never")
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS.values()])
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, **SPECIALS)
    fast.model_max_length = 1_000_000
    return fast


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", default="data_cache/text/train.jsonl", help="JSON Lines with a 'text' field")
    parser.add_argument("--output", default="outputs/tokenizer",
                        help="folder to write (%(default)s); the bundled configuration/tokenizer is replaced only "
                             "when named here")
    parser.add_argument("--vocab-size", type=int, default=8000)
    parser.add_argument("--max-rows", type=int, default=0)
    parser.add_argument("--fields", nargs="+", default=["text"],
                        help="JSON fields to train on (e.g. `en es` for the parallel bible corpus)")
    args = parser.parse_args(argv)
    texts = read_texts(args.corpus, args.max_rows, args.fields)
    with tempfile.TemporaryDirectory() as tmp:
        sp = train_sentencepiece(texts, args.vocab_size, str(pathlib.Path(tmp) / "spm"))
        fast = to_fast_tokenizer(sp)
        sample = texts[: min(200, len(texts))]
        same = sum(sp.encode(fold(t)) == fast(t, add_special_tokens=False)["input_ids"] for t in sample)
    fast.save_pretrained(args.output)
    print(f"saved a {len(fast)}-token tokenizer to {args.output}; ids identical to SentencePiece on "
          f"{same}/{len(sample)} training passages")


if __name__ == "__main__":
    main()
