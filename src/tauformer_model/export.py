"""Export a training run as a Hugging Face model folder that vLLM and transformers load:
``python -m tauformer_model.export RUN OUT`` (RUN: a run folder or one of its checkpoints).

OUT gets TauGPTForCausalLM.save_pretrained's config.json and model.safetensors (the Laplacian inside), and
the run's tokenizer as transformers reads it (tokenizer.json + tokenizer_config.json): the byte tokenizer as
a byte-level BPE with no merges (token id = byte value), a BPE run's own tokenizer as trained.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys


def byte_tokenizer():
    """The byte tokenizer (ids 0-255 = bytes) as a `tokenizers` Tokenizer: byte-level, no merges."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {_byte_char(b): b for b in range(256)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return tok


def _byte_char(b: int) -> str:
    """GPT-2's byte -> printable character map (the one byte-level BPE uses)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    if b in printable:
        return chr(b)
    return chr(256 + sum(1 for n in range(b) if n not in printable))


def save_tokenizer(folder, tokenizer=None) -> None:
    """Write ``tokenizer`` (a data.ByteTokenizer or BPETokenizer; None: bytes) as transformers reads it."""
    folder = pathlib.Path(folder)
    tok = byte_tokenizer() if tokenizer is None or tokenizer.kind == "byte" else tokenizer.tok
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 1 << 30, "clean_up_tokenization_spaces":
         False}, indent=1))


def export(run, out) -> pathlib.Path:
    from .checkpoint import find_checkpoint, load_state
    from .data import load_tokenizer
    from .hf import TauGPTForCausalLM

    found = find_checkpoint(run)
    if found is None:
        raise FileNotFoundError(f"{run}: no checkpoint (a run folder of python -m tauformer_model.train, or one of "
                                "its checkpoint folders)")
    model = TauGPTForCausalLM.from_checkpoint(found)
    out = pathlib.Path(out)
    model.save_pretrained(out)
    kind = load_state(found).get("train_config", {}).get("tokenizer", "byte")
    save_tokenizer(out, load_tokenizer(kind, found))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tauformer_model.export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="a run folder of python -m tauformer_model.train, or one of its checkpoints")
    p.add_argument("out", help="the folder to write (vllm serve OUT, AutoModelForCausalLM.from_pretrained(OUT))")
    args = p.parse_args(argv)
    try:
        print(f"wrote {export(args.run, args.out)}")
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
