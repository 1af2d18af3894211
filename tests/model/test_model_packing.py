"""Packed documents and ragged batches (docs/math.md §Packed sequences): a training window cut at its
document boundaries attends as each document alone, nothing leaks across a boundary, a batch of prompts of
different lengths generates what each prompt generates alone, and the data layer knows where documents
start. Small configs on CPU, the default backend."""

import pathlib
import sysconfig

import numpy as np
import pytest
import torch
from test_model import make_model, rel_err
from test_model_train import micro_config, quiet

from tauformer_model import generate as gen_mod
from tauformer_model import train as train_mod
from tauformer_model.data import SEPARATOR, list_files, load_dataset, split_files
from tauformer_model.model import pack_windows

VARIANTS = [dict(attention="taumode", recency="learned"), dict(attention="taumode", recency="none"),
            dict(attention="taumode", recency="learned", lambda_term=False),
            dict(attention="dot", recency="none"), dict(attention="dot", recency="learned")]
IDS = ["taumode", "taumode-no-recency", "recency-only", "dot", "dot-recency"]


def two_windows():
    """Two windows of 48 tokens: documents of 20 + 28 tokens, and 7 + 30 + 11 (ids need not start at 0)."""
    idx = torch.randint(0, 256, (2, 48), generator=torch.Generator().manual_seed(3))
    doc_ids = torch.tensor([[0] * 20 + [1] * 28, [5] * 7 + [6] * 30 + [7] * 11])
    return idx, doc_ids, [[(0, 20), (20, 48)], [(0, 7), (7, 37), (37, 48)]]


@pytest.mark.parametrize("kw", VARIANTS, ids=IDS)
def test_packed_window_equals_each_document_alone(kw):
    model = make_model(**kw)
    idx, doc_ids, documents = two_windows()
    with torch.no_grad():
        packed = model(idx, doc_ids=doc_ids)
        for row, spans in enumerate(documents):
            for start, stop in spans:
                assert rel_err(packed[row, start:stop], model(idx[row:row + 1, start:stop])[0]) < 1e-5
        assert rel_err(packed[0, 20:], model(idx)[0, 20:]) > 1e-3  # unpacked, document 1 sees document 0
    loss = model.train()(idx, idx, doc_ids=doc_ids)  # and it trains: the packed backward runs
    loss.backward()
    assert model.blocks[0].attn.c_v.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("kw", VARIANTS, ids=IDS)
def test_nothing_leaks_across_a_document_boundary(kw):
    """Changing document A's tokens leaves document B's logits bitwise unchanged."""
    model = make_model(**kw)
    idx, doc_ids, _ = two_windows()
    other = idx.clone()
    other[0, :20] = torch.randint(0, 256, (20,), generator=torch.Generator().manual_seed(4))
    other[1, 7:37] = torch.flip(idx[1, 7:37], [0])
    with torch.no_grad():
        before, after = model(idx, doc_ids=doc_ids), model(other, doc_ids=doc_ids)
    assert torch.equal(before[0, 20:], after[0, 20:]) and not torch.equal(before[0, :20], after[0, :20])
    assert torch.equal(before[1, :7], after[1, :7]) and torch.equal(before[1, 37:], after[1, 37:])


def test_windows_without_a_boundary_take_the_dense_path():
    model = make_model()
    idx = torch.randint(0, 256, (2, 40))
    assert pack_windows(torch.full((2, 40), 3)) is None
    with torch.no_grad():
        assert torch.equal(model(idx, doc_ids=torch.tensor([[1], [2]]).expand(2, 40)), model(idx))
    positions, packing = pack_windows(torch.tensor([[0, 0, 1, 1, 1], [4, 5, 5, 5, 6]]))
    assert packing.cu_q.tolist() == [0, 2, 5, 6, 9, 10] and packing.max_q == packing.max_k == 3
    assert positions.tolist() == [[0, 1, 0, 1, 2], [0, 0, 1, 2, 0]]  # RoPE restarts per document


@pytest.mark.parametrize("kw", [VARIANTS[0], VARIANTS[3], VARIANTS[4]], ids=[IDS[0], IDS[3], IDS[4]])
def test_ragged_prompts_generate_what_each_prompt_generates_alone(kw):
    model = make_model(**kw)
    prompts = [torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(n)) for n in (5, 17, 1, 11)]
    together, stats = gen_mod.generate(model, prompts, 8, temperature=0)
    for prompt, out in zip(prompts, together):
        alone, _ = gen_mod.generate(model, prompt[None], 8, temperature=0)
        assert torch.equal(out, alone[0])
    padded = torch.stack([torch.cat([p, p.new_zeros(17 - len(p))]) for p in prompts])  # right-padded + lengths
    again, _ = gen_mod.generate(model, padded, 8, temperature=0, lengths=[len(p) for p in prompts])
    assert all(torch.equal(a, b) for a, b in zip(again, together))
    assert stats["cache_max_len"] == 17 + 8


@pytest.mark.parametrize("kw", VARIANTS, ids=IDS)
def test_ragged_cache_equals_the_full_forward(kw):
    """A right-padded prefill of rows of 9, 30, 1 and 17 tokens, then 12 decode steps: every row's logits are
    the full forward's over that row's growing sequence."""
    model = make_model(**kw)
    lengths, steps, gen = [9, 30, 1, 17], 12, torch.Generator().manual_seed(5)
    rows = [torch.randint(0, 256, (n + steps,), generator=gen) for n in lengths]
    full_batch = torch.stack([torch.cat([r, r.new_zeros(30 + steps - len(r))]) for r in rows])
    prompt = torch.stack([torch.cat([r[:n], r.new_zeros(30 - n)]) for r, n in zip(rows, lengths)])
    with torch.no_grad():
        full = model(full_batch)
        cache = model.new_cache(4, 30 + steps)
        pointers = [t.data_ptr() for t in cache.tensors()]
        prefill = model(prompt, cache=cache, lengths=lengths)
        decoded = [model(torch.stack([r[n + t] for r, n in zip(rows, lengths)])[:, None], cache=cache)[:, 0]
                   for t in range(steps)]
    for b, n in enumerate(lengths):
        assert rel_err(prefill[b, :n], full[b, :n]) < 1e-5
        assert rel_err(torch.stack([d[b] for d in decoded]), full[b, n:n + steps]) < 1e-5
    assert cache.lengths == [n + steps for n in lengths] and cache.length_tensor.tolist() == cache.lengths
    assert [t.data_ptr() for t in cache.tensors()] == pointers
    with pytest.raises(ValueError, match="different numbers"):
        cache.pos


def test_sorted_cache_refuses_ragged_prompts():
    model = make_model()
    with pytest.raises(ValueError, match="sorted cache holds rows of one length"):
        gen_mod.generate(model, [torch.arange(3), torch.arange(5)], 2, sorted_cache=True)
    out, _ = gen_mod.generate(model, [torch.arange(4), torch.arange(4) + 1], 3, temperature=0, sorted_cache=True)
    plain, _ = gen_mod.generate(model, torch.stack([torch.arange(4), torch.arange(4) + 1]), 3, temperature=0)
    assert torch.equal(torch.stack(out), plain)


@pytest.fixture(scope="module")
def short_documents(tmp_path_factory) -> pathlib.Path:
    """60 files of 30 to 150 bytes of stdlib source (a corpus of short documents: most windows hold a
    boundary), and one binary file, which the corpus skips."""
    text = (pathlib.Path(sysconfig.get_paths()["stdlib"]) / "os.py").read_bytes()
    folder = tmp_path_factory.mktemp("short")
    rng = np.random.default_rng(0)
    for i in range(60):
        start, size = int(rng.integers(0, len(text) - 300)), int(rng.integers(30, 150))
        (folder / f"doc{i:02d}.py").write_bytes(text[start:start + size])
    (folder / "blob.bin").write_bytes(b"\0\1\2")
    return folder


def document_texts(files: list[pathlib.Path]) -> list[bytes]:
    """Each kept file as its document holds it: the separator opens every document after the first."""
    kept = [p.read_bytes() for p in files if b"\0" not in p.read_bytes()]
    return [(SEPARATOR if i else b"") + d for i, d in enumerate(kept)]


def test_document_offsets_match_the_files(tmp_path, short_documents):
    ds = load_dataset(str(short_documents), str(tmp_path / "cache"), log=quiet)
    root, files = list_files(short_documents)
    train_files, val_files = split_files(root, files)
    assert train_files and val_files
    for tokens, offsets, split_files_ in ((ds.train, ds.train_docs, train_files), (ds.val, ds.val_docs, val_files)):
        bounds = list(offsets) + [len(tokens)]
        assert [bytes(tokens[a:b]) for a, b in zip(bounds, bounds[1:])] == document_texts(split_files_)
    # a window's document ids change exactly where a file starts
    starts = [int(ds.train_docs[3]) - 10, 0, int(ds.train_docs[1])]
    ids = ds.document_ids("train", starts, 64)
    for row, start in zip(ids.tolist(), starts):
        expected = [int(np.searchsorted(ds.train_docs, start + t, side="right")) - 1 for t in range(64)]
        assert row == expected
    assert ids[0, 9] == 2 and ids[0, 10] == 3 and ids[2, 0] == 1
    again = load_dataset(str(short_documents), str(tmp_path / "cache"), log=pytest.fail)  # cached, offsets too
    assert np.array_equal(again.train_docs, ds.train_docs)


def test_one_file_corpus_cut_into_train_and_val(tmp_path):
    (tmp_path / "one.txt").write_bytes(b"abc\n" * 400)
    ds = load_dataset(str(tmp_path / "one.txt"), str(tmp_path / "cache"), log=quiet)
    assert ds.train_docs.tolist() == [0] and ds.val_docs.tolist() == [0]  # the cut starts val's one document
    assert bytes(ds.train) + bytes(ds.val) == b"abc\n" * 400


def test_bpe_documents_are_encoded_alone(tmp_path, short_documents):
    pytest.importorskip("tokenizers")
    ds = load_dataset(str(short_documents), str(tmp_path / "cache"), tokenizer="bpe", vocab_size=300, log=quiet)
    root, files = list_files(short_documents)
    bounds = list(ds.train_docs) + [len(ds.train)]
    texts = [ds.tokenizer.decode(ds.train[a:b]).encode() for a, b in zip(bounds, bounds[1:])]
    assert texts == document_texts(split_files(root, files)[0])


def test_pack_documents_training_lowers_the_loss_and_resumes_packed(tmp_path, short_documents, capsys, monkeypatch):
    from tauformer_model import model as model_mod

    packs = []  # the packings the training forwards built (None: a batch without a boundary)
    monkeypatch.setattr(model_mod, "pack_windows", lambda *a: packs.append(pack_windows(*a)) or packs[-1])
    cache = tmp_path / "cache"
    full = train_mod.train(micro_config(tmp_path / "full", short_documents, cache, pack_documents=True), log=quiet)
    rows = train_mod.read_metrics(tmp_path / "full" / "metrics.jsonl")
    assert full["final_val_loss"] < rows[0]["val_loss"] - 0.3
    assert sum(p is not None for p in packs) > len(packs) // 2  # short documents: most batches are cut
    train_mod.train(micro_config(tmp_path / "part", short_documents, cache, pack_documents=True, stop_at=3), log=quiet)
    parser = train_mod.build_parser()
    tc = train_mod.config_from_args(parser.parse_args(["--resume", "--out", str(tmp_path / "part"), "--no-progress"]))
    assert tc.pack_documents  # the checkpoint's own flag, not the default
    train_mod.train(tc, log=quiet)
    resumed = train_mod.read_metrics(tmp_path / "part" / "metrics.jsonl")
    assert [r["val_loss"] for r in resumed] == [r["val_loss"] for r in rows]
    # a checkpoint from before the flag existed resumes unpacked
    state_path = tmp_path / "full" / "checkpoint" / "state.pt"
    state = torch.load(state_path, weights_only=True)
    del state["train_config"]["pack_documents"]
    torch.save(state, state_path)
    old = train_mod.config_from_args(parser.parse_args(["--resume", "--out", str(tmp_path / "full")]))
    assert not old.pack_documents
    # generation from it: a batch of prompts of different lengths from the command line
    assert gen_mod.main(["--checkpoint", str(tmp_path / "full"), "--prompt", "def ", "--prompt", "import os\n",
                         "--max-new-tokens", "6", "--temperature", "0"]) == 0
    printed = capsys.readouterr().out
    assert "sample 1 (prompt 1" in printed and "import os" in printed
