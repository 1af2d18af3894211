"""Training data with no download: the Python standard library's own .py sources (or --data PATH).

Text is split into train/val by file (deterministic: a CRC32 of the file's relative path), encoded
once (bytes, vocab 256; or a BPE trained locally with the `tokenizers` package) and cached as
flat token files read through np.memmap. Batches are random windows drawn with a torch.Generator
that the trainer owns (its state is part of the checkpoint, so a resumed run draws the same batches).
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import sysconfig
import zlib
from dataclasses import dataclass

import numpy as np
import torch

class DataError(ValueError):
    """A corpus the trainer cannot use (no text, a split too short); the message says what to change."""


VAL_EVERY = 20  # a file goes to val when crc32(relative path) % VAL_EVERY == 0 (about 5 %)
SEPARATOR = b"\n"  # between files


def default_cache_dir() -> pathlib.Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return pathlib.Path(base) / "tauformer"


def stdlib_root() -> pathlib.Path:
    return pathlib.Path(sysconfig.get_paths()["stdlib"])


def list_files(source: pathlib.Path | None) -> tuple[pathlib.Path, list[pathlib.Path]]:
    """(root, files): the stdlib's .py files (site-packages excluded) or the files of ``source``."""
    if source is None:
        root = stdlib_root()
        files = [p for p in root.rglob("*.py")
                 if p.is_file() and p.relative_to(root).parts[0] not in ("site-packages", "dist-packages")]
    elif source.is_file():
        root, files = source.parent, [source]
    elif source.is_dir():
        root, files = source, [p for p in source.rglob("*") if p.is_file() and not p.name.startswith(".")]
    else:
        raise FileNotFoundError(f"--data {source}: no such file or folder")
    return root, sorted(files, key=lambda p: p.relative_to(root).as_posix())


def split_files(root: pathlib.Path, files: list[pathlib.Path]) -> tuple[list[pathlib.Path], list[pathlib.Path]]:
    val = [p for p in files if zlib.crc32(p.relative_to(root).as_posix().encode()) % VAL_EVERY == 0]
    val_set = set(val)
    return [p for p in files if p not in val_set], val


def read_text_bytes(files: list[pathlib.Path]) -> bytes:
    """The files' bytes joined by SEPARATOR; binary files (with a NUL byte) are skipped."""
    return SEPARATOR.join(data for data in (p.read_bytes() for p in files) if b"\0" not in data)


class ByteTokenizer:
    """UTF-8 bytes as tokens (vocab 256)."""

    kind = "byte"
    vocab_size = 256

    def encode(self, text: str | bytes) -> list[int]:
        return list(text.encode("utf-8") if isinstance(text, str) else text)

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")

    def save(self, path: pathlib.Path) -> None:
        pass


class BPETokenizer:
    """A byte-level BPE of the `tokenizers` package, trained locally on the training text."""

    kind = "bpe"

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.vocab_size = tokenizer.get_vocab_size()

    @classmethod
    def train(cls, text: bytes, vocab_size: int) -> "BPETokenizer":
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                      show_progress=False)
        chunk = 1 << 20
        s = text.decode("utf-8", errors="replace")
        tok.train_from_iterator((s[i:i + chunk] for i in range(0, len(s), chunk)), trainer=trainer)
        return cls(tok)

    @classmethod
    def load(cls, path: pathlib.Path) -> "BPETokenizer":
        from tokenizers import Tokenizer

        return cls(Tokenizer.from_file(str(path)))

    def encode(self, text: str | bytes) -> list[int]:
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        return self.tok.encode(text).ids

    def decode(self, ids) -> str:
        return self.tok.decode([int(i) for i in ids])

    def save(self, path: pathlib.Path) -> None:
        self.tok.save(str(path))


def load_tokenizer(kind: str, folder: pathlib.Path):
    """The tokenizer saved in ``folder`` (a checkpoint or a data cache entry)."""
    return ByteTokenizer() if kind == "byte" else BPETokenizer.load(folder / "tokenizer.json")


@dataclass
class Dataset:
    train: np.ndarray  # memmap of token ids
    val: np.ndarray
    tokenizer: object
    folder: pathlib.Path  # the cache entry

    def batch(self, split: str, batch_size: int, block_size: int, generator: torch.Generator,
              device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """Random windows: x (B, T) and y = x shifted by one, int64 on ``device``."""
        return self.windows(split, self.starts(split, batch_size, block_size, generator), block_size, device)

    def starts(self, split: str, n: int, block_size: int, generator: torch.Generator) -> list[int]:
        """n random window starts (data-parallel ranks draw a global batch alike and read their slice)."""
        data = self.train if split == "train" else self.val
        if len(data) <= block_size + 1:
            raise DataError(f"the {split} split of the corpus in {self.folder} has {len(data)} tokens; windows of "
                            f"--block-size {block_size} need at least {block_size + 2}: give --data more text "
                            f"or a smaller --block-size")
        return torch.randint(len(data) - block_size - 1, (n,), generator=generator).tolist()

    def windows(self, split: str, starts: list[int], block_size: int,
                device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        data = self.train if split == "train" else self.val
        window = np.stack([np.asarray(data[s:s + block_size + 1], dtype=np.int64) for s in starts])
        w = torch.from_numpy(window).to(device)
        return w[:, :-1], w[:, 1:]


def _fingerprint(root: pathlib.Path, files: list[pathlib.Path], tokenizer: str, vocab_size: int) -> str:
    h = hashlib.sha1(f"{root.resolve()}|{tokenizer}|{vocab_size}|{VAL_EVERY}".encode())
    for p in files:
        st = p.stat()
        h.update(f"{p.relative_to(root).as_posix()}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def _write_tokens(path: pathlib.Path, ids, dtype) -> None:
    tmp = path.with_suffix(".tmp")
    np.asarray(ids, dtype=dtype).tofile(tmp)
    os.replace(tmp, path)


def load_dataset(data: str | None = None, cache_dir: str | None = None, tokenizer: str = "byte",
                 vocab_size: int = 4096, log=print) -> Dataset:
    """Tokenise (once) and open the corpus. ``data``: None (the stdlib), a text file or a folder."""
    root, files = list_files(pathlib.Path(data) if data else None)
    if not files:
        raise FileNotFoundError(f"no files found under {root}")
    vocab = 256 if tokenizer == "byte" else vocab_size
    folder = pathlib.Path(cache_dir) if cache_dir else default_cache_dir()
    folder = folder / f"{tokenizer}-{_fingerprint(root, files, tokenizer, vocab)}"
    meta_path = folder / "meta.json"
    if not meta_path.exists():
        train_files, val_files = split_files(root, files)
        if train_files and val_files:
            train_text, val_text = read_text_bytes(train_files), read_text_bytes(val_files)
        else:  # one file, or too few to split by file: the last 5 % of the text is val
            text = read_text_bytes(files)
            cut = len(text) - len(text) // VAL_EVERY
            train_text, val_text = text[:cut], text[cut:]
        if not train_text.strip(SEPARATOR) or not val_text:
            raise DataError(f"--data {data or root}: {len(files)} files, {len(train_text) + len(val_text)} bytes of "
                            f"text after skipping binary files (those with a NUL byte): too little for a train "
                            f"and a val split")
        folder.mkdir(parents=True, exist_ok=True)
        log(f"tokenising {len(files)} files under {root} ({(len(train_text) + len(val_text)) / 1e6:.1f} MB) "
            f"into {folder}")
        tok = ByteTokenizer() if tokenizer == "byte" else BPETokenizer.train(train_text, vocab_size)
        tok.save(folder / "tokenizer.json")
        dtype = np.uint8 if tok.vocab_size <= 256 else np.uint16
        if tokenizer == "byte":
            train_ids, val_ids = np.frombuffer(train_text, np.uint8), np.frombuffer(val_text, np.uint8)
        else:
            train_ids, val_ids = tok.encode(train_text), tok.encode(val_text)
        _write_tokens(folder / "train.bin", train_ids, dtype)
        _write_tokens(folder / "val.bin", val_ids, dtype)
        meta = {"tokenizer": tok.kind, "vocab_size": tok.vocab_size, "dtype": np.dtype(dtype).name,
                "root": str(root), "n_files": len(files)}
        tmp = meta_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(meta))
        os.replace(tmp, meta_path)  # the entry is complete once meta.json exists
    meta = json.loads(meta_path.read_text())
    dtype = np.dtype(meta["dtype"])
    train = np.memmap(folder / "train.bin", dtype=dtype, mode="r")
    val = np.memmap(folder / "val.bin", dtype=dtype, mode="r")
    return Dataset(train=train, val=val, tokenizer=load_tokenizer(meta["tokenizer"], folder), folder=folder)
